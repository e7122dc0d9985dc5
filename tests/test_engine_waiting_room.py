"""One tenant's flood cannot crowd another out of the waiting room.

Unit tests of the policy (`engine/waiting_room.py`, no model), then the fault itself against a real
`loraplex serve` process with the default room (32 rows, 256 waiting): tenant A holds 288 open streams
(its 320 tries, the rest 429), then tenant B's 30 small requests must all succeed. Before the per-tenant
share, 23 of B's 30 got 429 `queue_full`. B's latencies are printed (`-s`) for README.
"""
from __future__ import annotations

import asyncio
import re
import statistics
import time

import httpx
import pytest

from loraplex.engine.errors import QueueFullError
from loraplex.engine.waiting_room import WaitingRoom
from tests.server_process import running_server

KEYS = {"acme": "key-acme", "globex": "key-globex", "admin": "key-admin"}
SERVER_SETTINGS = dict(api_keys=f"{KEYS['acme']}:acme,{KEYS['globex']}:globex", admin_key=KEYS["admin"],
                       max_num_seqs=32, max_queue=256, max_model_len=128, log_level="warning")
NUM_FLOOD, NUM_SMALL = 320, 30
FLOOD = {"model": "demo", "prompt": "flood", "max_tokens": 48, "temperature": 0, "ignore_eos": True, "stream": True}
SMALL = {"model": "demo", "prompt": "hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True}


def fill(room: WaitingRoom, tenant: str, num_running: int = 0) -> int:
    """Enter requests for `tenant` until refused; returns how many got in."""
    entered = 0
    while True:
        num_waiting = sum(room.open_by_tenant.values()) - num_running
        try:
            room.enter(tenant, num_waiting)
        except QueueFullError:
            return entered
        entered += 1


def test_a_lone_tenant_may_use_the_whole_room():
    room = WaitingRoom(max_queue=8, max_num_seqs=2)
    assert fill(room, "a", num_running=2) == 10  # 2 running + 8 waiting


def test_a_newcomer_gets_its_share_of_a_full_room():
    room = WaitingRoom(max_queue=8, max_num_seqs=2)
    fill(room, "a", num_running=2)
    assert fill(room, "b", num_running=2) == 5  # half the capacity of 10
    assert fill(room, "a", num_running=2) == 0  # the flooder is held until the room drains
    assert fill(room, "c", num_running=2) == 3  # a third tenant: 10 // 3
    assert sum(room.open_by_tenant.values()) - 2 <= 2 * room.max_queue


def test_leaving_frees_the_share():
    room = WaitingRoom(max_queue=4, max_num_seqs=0)
    fill(room, "a")
    fill(room, "b")
    for _ in range(room.open_by_tenant["a"]):
        room.leave("a")
    assert "a" not in room.open_by_tenant
    assert fill(room, "a") == 2  # in while the room has space, then held at its share, 4 // 2


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_model_dir):
    with running_server(tmp_path_factory.mktemp("room-data"), model=demo_model_dir, **SERVER_SETTINGS) as process:
        yield process


async def open_requests(client: httpx.AsyncClient) -> int:
    text = (await client.get("/metrics", headers=auth("admin"))).text
    gauges = {name: float(value) for name, value in re.findall(r"^(vllm:num_requests_(?:running|waiting)) (\S+)$", text, re.M)}
    return int(gauges["vllm:num_requests_running"] + gauges["vllm:num_requests_waiting"])


async def hold_stream(client: httpx.AsyncClient, statuses: list[int]) -> None:
    async with client.stream("POST", "/v1/completions", headers=auth("acme"), json=FLOOD) as response:
        statuses.append(response.status_code)
        async for _ in response.aiter_bytes():
            pass


async def small_request(client: httpx.AsyncClient) -> tuple[int, float]:
    start = time.perf_counter()
    response = await client.post("/v1/completions", headers=auth("globex"), json=SMALL)
    return response.status_code, time.perf_counter() - start


async def flood_then_small(url: str) -> tuple[int, list[int], list[float]]:
    limits = httpx.Limits(max_connections=NUM_FLOOD + NUM_SMALL + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        flood_statuses: list[int] = []
        flood = [asyncio.create_task(hold_stream(client, flood_statuses)) for _ in range(NUM_FLOOD)]
        deadline = time.monotonic() + 60
        held = 0
        while held < 288 and time.monotonic() < deadline:  # 32 running + 256 waiting: the room is full
            await asyncio.sleep(0.1)
            held = await open_requests(client)
        small = await asyncio.gather(*(small_request(client) for _ in range(NUM_SMALL)))
        for task in flood:
            task.cancel()  # a disconnect aborts A's requests
        await asyncio.gather(*flood, return_exceptions=True)
    return held, [status for status, _ in small], [seconds for _, seconds in small]


def test_a_flood_does_not_crowd_out_another_tenant(server):
    held, statuses, latencies = asyncio.run(flood_then_small(server.url))
    assert held >= 288, f"tenant A held only {held} open requests"
    assert statuses == [200] * NUM_SMALL, f"B's statuses: {sorted(statuses)}"
    latencies.sort()
    print(f"B's {NUM_SMALL} requests while A holds {held} open: p50 {statistics.median(latencies):.2f}s, "
          f"max {latencies[-1]:.2f}s")
