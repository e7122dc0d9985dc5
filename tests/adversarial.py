"""Helpers of the adversarial tenant suite: id forms an attacker would try, and responses compared byte
for byte once the echoed id (and nothing else) is masked.

A probe asks for one id through one route. Two probes that differ only in which id they ask for must
get the same status, the same headers (but `x-request-id` and `date`) and the same body once every
spelling of the asked-for id in the body is replaced by `<ID>`: the raw id, its `repr` (messages
quote ids with `!r`) and, for path parameters, the id after the server's percent-decoding.
"""
from __future__ import annotations

import http.client
import json
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

import uvicorn

VOLATILE_HEADERS = {"x-request-id", "date"}
ENVELOPE_FIELDS = {"message", "type", "param", "code"}


def _cyrillic(text: str) -> str:
    """Look-alike letters: Cyrillic а, е, о, с, р, х for their Latin twins."""
    return text.translate(str.maketrans("aeocpx", "\u0430\u0435\u043e\u0441\u0440\u0445"))


def _fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


# Forms of `<tenant>/<name>` adapter ids: (tenant, name) -> the id as sent. In URL paths the id is
# percent-quoted except for `/`, `%` and `@`, so `%2F` / `%2E` spellings arrive as such and get decoded once.
ADAPTER_ID_FORMS: dict[str, Callable[[str, str], str]] = {
    "name": lambda t, n: n,
    "name@v": lambda t, n: f"{n}@1",
    "tenant/name": lambda t, n: f"{t}/{n}",
    "tenant/name@1": lambda t, n: f"{t}/{n}@1",
    "tenant/name@2": lambda t, n: f"{t}/{n}@2",
    "@0": lambda t, n: f"{t}/{n}@0",
    "@01": lambda t, n: f"{t}/{n}@01",
    "@-1": lambda t, n: f"{t}/{n}@-1",
    "@1.0": lambda t, n: f"{t}/{n}@1.0",
    "@arabic-one": lambda t, n: f"{t}/{n}@\u0661",
    "@empty": lambda t, n: f"{t}/{n}@",
    "@huge": lambda t, n: f"{t}/{n}@{'9' * 40}",
    "@@": lambda t, n: f"{t}/{n}@1@1",
    "%2F": lambda t, n: f"{t}%2F{n}",
    "%2f": lambda t, n: f"{t}%2f{n}",
    "%252F": lambda t, n: f"{t}%252F{n}",
    "%2F@1": lambda t, n: f"{t}%2F{n}%401",
    "UPPER": lambda t, n: f"{t.upper()}/{n.upper()}",
    "Title tenant": lambda t, n: f"{t.title()}/{n}",
    "upper name": lambda t, n: f"{t}/{n.upper()}",
    "dotdot": lambda t, n: f"{t}/../{t}/{n}",
    "dot": lambda t, n: f"{t}/./{n}",
    "dotdot %2E": lambda t, n: f"{t}/%2E%2E/{t}/{n}",
    "dot %2E": lambda t, n: f"{t}/%2E/{n}",
    "leading ./": lambda t, n: f"%2E/{t}/{n}",
    "trailing /..": lambda t, n: f"{t}/{n}/%2E%2E",
    "double slash": lambda t, n: f"{t}//{n}",
    "trailing slash": lambda t, n: f"{t}/{n}/",
    "leading slash": lambda t, n: f"/{t}/{n}",
    "backslash": lambda t, n: f"{t}\\{n}",
    "leading space": lambda t, n: f" {t}/{n}",
    "trailing space": lambda t, n: f"{t}/{n} ",
    "space inside": lambda t, n: f"{t}/ {n}",
    "newline": lambda t, n: f"{t}/{n}\n",
    "tab": lambda t, n: f"\t{t}/{n}",
    "nbsp": lambda t, n: f"{t}/{n}\u00a0",
    "zero-width space": lambda t, n: f"{t}/\u200b{n}",
    "nul": lambda t, n: f"{t}/{n}\x00",
    "cyrillic look-alike": lambda t, n: f"{_cyrillic(t)}/{n}",
    "fullwidth solidus": lambda t, n: f"{t}\uff0f{n}",
    "division slash": lambda t, n: f"{t}\u2215{n}",
    "fullwidth letters": lambda t, n: f"{_fullwidth(t)}/{_fullwidth(n)}",
    "combining accent": lambda t, n: f"{t}/{n}\u0301",
    "long name": lambda t, n: f"{t}/{n}{'a' * 3000}",
    "long id": lambda t, n: f"{t}/{n}@{'1' * 3000}",
}

# Forms of server-made ids (`file-<24 hex>`, `ftjob-<24 hex>`).
OPAQUE_ID_FORMS: dict[str, Callable[[str], str]] = {
    "id": lambda i: i,
    "UPPER": lambda i: i.upper(),
    "upper prefix": lambda i: i.split("-")[0].upper() + "-" + i.split("-", 1)[1],
    "one shorter": lambda i: i[:-1],
    "one longer": lambda i: i + "0",
    "suffix .json": lambda i: i + ".json",
    "suffix .jsonl": lambda i: i + ".jsonl",
    "tenant/id": lambda i: f"acme%2F{i}",
    "../tenant/id": lambda i: f"%2E%2E%2Facme%2F{i}",
    "raw ../tenant/id": lambda i: f"../acme/{i}",
    "./id": lambda i: f"%2E%2F{i}",
    "%252F": lambda i: f"acme%252F{i}",
    "leading space": lambda i: f" {i}",
    "trailing newline": lambda i: f"{i}\n",
    "nul": lambda i: f"{i}\x00",
    "cyrillic look-alike": lambda i: _cyrillic(i),
    "fullwidth digits": lambda i: i[:-1] + _fullwidth(i[-1]) if i[-1].isdigit() else i[:-1] + "\uff10",
    "long": lambda i: i + "0" * 3000,
}


def path_quote(identifier: str) -> str:
    return quote(identifier, safe="/%@")


@contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """The app behind a real uvicorn server on 127.0.0.1: what the HTTP layer does to paths is tested
    too (Starlette's TestClient percent-decodes paths twice, so it cannot tell `%252F` from `/`)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@dataclass(frozen=True)
class RawResponse:
    status_code: int
    headers: dict[str, str]
    content: bytes

    def json(self):
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


class RawClient:
    """Sends the request target exactly as given (no dot-segment removal, no re-quoting), one
    keep-alive connection; the bytes an attacker would send."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self._conn = http.client.HTTPConnection(self.host, self.port, timeout=60)

    def request(self, method: str, target: str, headers: dict[str, str] | None = None, json_body=None) -> RawResponse:
        body = None if json_body is None else json.dumps(json_body).encode()
        all_headers = {**(headers or {}), **({"Content-Type": "application/json"} if body is not None else {})}
        for attempt in range(2):  # the server may close an idle keep-alive connection
            try:
                self._conn.request(method, target, body=body, headers=all_headers)
                response = self._conn.getresponse()
                return RawResponse(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._conn.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._conn.close()


@dataclass(frozen=True)
class Probe:
    method: str
    path: str  # the request target, already percent-quoted
    body: dict | None = None  # JSON

    def send(self, client: RawClient, headers: dict[str, str]) -> RawResponse:
        return client.request(self.method, self.path, headers, self.body)


def spellings(identifier: str) -> list[str]:
    """Every way a body may spell the id it echoes, longest first."""
    decoded = unquote(identifier)
    seen = {identifier, decoded}
    forms = set()
    for text in seen:
        for variant in (text, repr(text)[1:-1]):
            forms.add(json.dumps(variant, ensure_ascii=False)[1:-1])
            forms.add(json.dumps(variant)[1:-1])
            forms.add(variant)
    return sorted((f for f in forms if f), key=len, reverse=True)


@dataclass(frozen=True)
class Snapshot:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def snapshot(response, identifier: str) -> Snapshot:
    body = response.content
    for spelling in spellings(identifier):
        body = body.replace(spelling.encode(), b"<ID>")
    headers = tuple(sorted((k.lower(), v) for k, v in response.headers.items() if k.lower() not in VOLATILE_HEADERS
                           and k.lower() != "content-length"))
    return Snapshot(response.status_code, headers, body)


def assert_envelope(response) -> None:
    """Every refusal is the one error envelope (streams refuse before their first byte)."""
    assert response.status_code >= 400, response.text
    error = response.json()["error"]
    assert set(error) == ENVELOPE_FIELDS and error["message"], response.text


def interleaved_medians(send_a: Callable[[], object], send_b: Callable[[], object], num_pairs: int,
                        before_pair: Callable[[], object] | None = None) -> tuple[float, float]:
    """Median seconds of `send_a` and `send_b`, run in pairs whose order alternates (drift hits both)."""
    times_a, times_b = [], []
    for i in range(num_pairs):
        if before_pair is not None:
            before_pair()
        order = ((send_a, times_a), (send_b, times_b)) if i % 2 == 0 else ((send_b, times_b), (send_a, times_a))
        for send, times in order:
            started = time.perf_counter()
            send()
            times.append(time.perf_counter() - started)
    return statistics.median(times_a), statistics.median(times_b)
