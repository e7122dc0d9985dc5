"""Tenant-written regexes in adapter configs (rank_pattern / alpha_pattern keys, a target_modules string)
cannot stall the server: against a real server process, a catastrophic-backtracking pattern in every
field is accepted and served or refused with a 400 naming the key, each call in under 100 ms, while
/healthz from another client stays under 100 ms throughout. Python's `re` needs minutes for `(.+)+X`
on a module path; before RE2 this test hung on its first upload.

Also: the RE2 lookup gives PEFT's own answer (`peft.utils.other.get_pattern_key`) for ordinary keys.
"""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from loraplex.engine.module_patterns import MAX_PATTERN_CHARS, PatternError, PatternTable
from loraplex.models.demo import make_demo_adapter
from tests.server_process import running_server

KEYS = {"acme": "key-acme", "globex": "key-globex"}
SERVER_SETTINGS = dict(api_keys=f"{KEYS['acme']}:acme,{KEYS['globex']}:globex", max_lora_rank=8,
                       max_model_len=128, max_num_seqs=4, log_level="warning")
MAX_CALL_S = 0.1
EVIL = "(.+)+X"  # exponential for a backtracking matcher on any path without an X
# (field, value, refused_param): served when refused_param is None, else a 400 with that `param` whose
# message names `field`.
CASES = [
    ("rank_pattern", {EVIL: 2}, None),
    ("alpha_pattern", {EVIL: 32}, None),
    ("alpha_pattern", {"(.+)+q_proj": 32}, None),  # matches q_proj: the engine scales with it
    ("target_modules", "(.+)+(q_proj|v_proj)", None),
    ("target_modules", EVIL, "adapter_config.json"),  # a safe regex matching no stored module: a wrong config
    ("alpha_pattern", {"(": 2}, "alpha_pattern"),  # not a regex: accepted before, then every use failed
    ("rank_pattern", {r"(q)\1_proj": 4}, "rank_pattern"),  # backreference: no linear-time matcher exists
    ("alpha_pattern", {"(?=q)q_proj": 4}, "alpha_pattern"),  # lookahead
    ("target_modules", r"(?!x).*q_proj\Z", "target_modules"),
    ("alpha_pattern", {"q" * (MAX_PATTERN_CHARS + 1): 4}, "alpha_pattern"),
]


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_model_dir):
    with running_server(tmp_path_factory.mktemp("pattern-data"), model=demo_model_dir, **SERVER_SETTINGS) as process:
        yield process


@pytest.fixture(scope="module")
def adapter_files(demo_model_dir, tmp_path_factory) -> dict[str, bytes]:
    out = make_demo_adapter(demo_model_dir, tmp_path_factory.mktemp("pattern-adapter"), r=4, seed=7)
    return {name: (out / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


class HealthProbe(threading.Thread):
    """Polls /healthz on its own connection and keeps the slowest answer; `start()` returns once it answered."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.slowest_s, self.statuses = url, 0.0, []
        self.answered, self.stopped = threading.Event(), threading.Event()

    def start(self) -> None:
        super().start()
        assert self.answered.wait(10), "/healthz never answered"

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stopped.is_set():
                start = time.perf_counter()
                self.statuses.append(client.get("/healthz").status_code)
                self.slowest_s = max(self.slowest_s, time.perf_counter() - start)
                self.answered.set()
                time.sleep(0.02)  # a stall over 100 ms cannot fall between two polls


def timed(call):
    start = time.perf_counter()
    response = call()
    return response, time.perf_counter() - start


def upload(client: httpx.Client, name: str, files: dict[str, bytes], **config_changes):
    config = {**json.loads(files["adapter_config.json"]), **config_changes}
    parts = [("files", ("adapter_config.json", json.dumps(config).encode())),
             ("files", ("adapter_model.safetensors", files["adapter_model.safetensors"]))]
    return timed(lambda: client.post("/v1/adapters", headers=auth("acme"), data={"name": name}, files=parts))


def use(client: httpx.Client, name: str):
    body = {"model": f"acme/{name}", "prompt": "hello", "max_tokens": 1, "temperature": 0}
    return timed(lambda: client.post("/v1/completions", headers=auth("acme"), json=body))


def run_round(client: httpx.Client, server_url: str, round_index: int, files: dict[str, bytes]) -> tuple[dict[str, float], float]:
    """A plain adapter (the control), then every case, under a /healthz probe: (seconds per call, slowest /healthz)."""
    timings = {}
    probe = HealthProbe(server_url)
    probe.start()
    try:
        for index, (field, value, refused_param) in enumerate([("lora_alpha", 16, None), *CASES]):
            name = f"case-{round_index}-{index}"
            response, timings[f"{field} {value} upload"] = upload(client, name, files, **{field: value})
            if refused_param is not None:
                assert response.status_code == 400, (field, value, response.text)
                error = response.json()["error"]
                assert error["param"] == refused_param and field in error["message"], error
                continue
            assert response.status_code == 201, (field, value, response.text)
            completion, timings[f"{field} {value} use"] = use(client, name)
            assert completion.status_code == 200, completion.text
    finally:
        probe.stopped.set()
        probe.join()
    assert len(probe.statuses) >= 3 and set(probe.statuses) == {200}, probe.statuses
    return timings, probe.slowest_s


def test_backtracking_patterns_neither_stall_nor_break_serving(server, adapter_files):
    """Up to 3 rounds, each call's best time kept: a backtracking matcher stalls every round for seconds
    to minutes; a burst of load from other processes on a shared machine does not repeat per call.
    Each call is held to MAX_CALL_S beyond the same call for a plain adapter (the control, `lora_alpha`),
    so that a loaded test machine's slow cold loads are not blamed on the patterns; both are reported."""
    best: dict[str, float] = {}
    best_health_s = float("inf")
    with httpx.Client(base_url=server.url, timeout=10) as client:
        # A plain adapter first, untimed: the first upload and first load warm their code paths.
        assert [response.status_code for response, _ in (upload(client, "plain", adapter_files), use(client, "plain"))] == [201, 200]
        for round_index in range(3):
            timings, slowest_health_s = run_round(client, server.url, round_index, adapter_files)
            best = {what: min(s, best.get(what, s)) for what, s in timings.items()}
            best_health_s = min(best_health_s, slowest_health_s)
            slow = over_control(best)
            if not slow and best_health_s < MAX_CALL_S:
                break
    print(f"best seconds per call: { {what: round(s, 3) for what, s in best.items()} }; slowest /healthz {best_health_s:.3f}")
    assert not slow, f"calls over the control + {MAX_CALL_S}s in every round: {slow}"
    assert best_health_s < MAX_CALL_S, f"/healthz took {best_health_s:.3f}s at worst in the best round"


def over_control(best: dict[str, float]) -> dict[str, float]:
    control = {kind: best[f"lora_alpha 16 {kind}"] for kind in ("upload", "use")}
    return {what: round(s, 3) for what, s in best.items() if s - control[what.rsplit(" ", 1)[1]] >= MAX_CALL_S}


MODULE_PATHS = [f"base_model.model.model.layers.{layer}.{block}.{leaf}" for layer in range(12)
                for block, leaf in (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj"))]


@pytest.mark.parametrize("keys", [
    ["q_proj"], ["v_proj", "q_proj"], ["layers.1.self_attn.q_proj", "q_proj"], [r"layers\.1\d\..*", "down_proj"],
    ["mlp.down_proj|v_proj"], ["(q|v)_proj"], ["proj"], ["model.layers.3.mlp.down_proj"], [".*layers.[0-4]..*"],
])
def test_lookup_is_peft_first_matching_key(keys):
    from peft.utils.other import get_pattern_key

    patterns = {key: index for index, key in enumerate(keys)}
    table = PatternTable("rank_pattern", patterns)
    for path in MODULE_PATHS:
        expected = patterns.get(get_pattern_key(keys, path), "default")
        assert table.lookup(path, "default") == expected, (keys, path)


@pytest.mark.parametrize("patterns, says", [
    ({"a)|(b": 1}, "is not a regex"),  # compiles only once wrapped as `(.*\.)?(key)`: refused on its own
    ([1, 2], "must be an object"),
    ({f"k{i}": 1 for i in range(300)}, "exceeds the limit"),
])
def test_table_refuses_with_the_field_named(patterns, says):
    with pytest.raises(PatternError, match=says) as caught:
        PatternTable("alpha_pattern", patterns)
    assert caught.value.field == "alpha_pattern" and "alpha_pattern" in str(caught.value)


def test_unreadable_adapter_files_do_not_name_server_paths(server, adapter_files):
    """An adapter whose files vanished behind the server's back (an operator, a crash mid-cleanup) fails
    its use with the OS error's text, never the absolute path under the data dir."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response, _ = upload(client, "vanishing", adapter_files)
        assert response.status_code == 201, response.text
        [config_path] = server.data_dir.glob("**/vanishing/v1/adapter_config.json")
        config_path.unlink()
        completion, _ = use(client, "vanishing")
    assert completion.status_code == 400, completion.text
    message = completion.json()["error"]["message"]
    assert "adapter_config.json" in message and "No such file" in message, message
    assert str(server.data_dir) not in message and "/" not in message.split("adapter_config.json", 1)[1], message
