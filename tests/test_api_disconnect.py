"""A client that goes away frees its batch slot: the engine request is aborted, streaming or not."""
from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

import httpx

from tests.api_fixtures import wait_until

LONG = {"model": "demo", "prompt": "The river ran", "max_tokens": 400, "ignore_eos": True, "temperature": 0}


def num_in_engine(engine) -> int:
    """Requests the engine is still working on for some caller (queued or running)."""
    return engine.stats()["num_pending"]


def test_streaming_disconnect_aborts(api_server_url, api_engine):
    assert wait_until(lambda: num_in_engine(api_engine) == 0)
    with httpx.Client(base_url=api_server_url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()  # kept referenced: a collected iterator closes the connection
            assert next(lines).startswith("data: ")  # first chunk arrived: the request is running
            assert num_in_engine(api_engine) == 1
    closed_at = time.monotonic()
    assert wait_until(lambda: num_in_engine(api_engine) == 0, timeout_s=5)
    assert time.monotonic() - closed_at < 1.0
    assert wait_until(lambda: api_engine.stats()["num_running"] == 0, timeout_s=1)


def test_non_streaming_disconnect_aborts(api_server_url, api_engine):
    assert wait_until(lambda: num_in_engine(api_engine) == 0)
    url = urlparse(api_server_url)
    body = json.dumps(LONG).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(head.encode() + body)
        assert wait_until(lambda: api_engine.stats()["num_running"] == 1, timeout_s=5)
    closed_at = time.monotonic()
    assert wait_until(lambda: num_in_engine(api_engine) == 0, timeout_s=5)
    assert time.monotonic() - closed_at < 1.0  # long before 400 tokens could have been generated
    assert wait_until(lambda: api_engine.stats()["num_running"] == 0, timeout_s=1)
