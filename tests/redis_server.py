"""A real, throwaway `redis-server` per test: free loopback port, no persistence, killed at teardown.

    from tests.redis_server import redis_server, redis_url  # noqa: F401  (fixtures)

`redis_url` is the URL; `redis_server` is the `RedisServer` behind it, for fault tests: `stop()` kills it
(connections are refused), `start()` brings it back on the same port (empty: no persistence), `pause()`
/ `resume()` freeze it with SIGSTOP / SIGCONT (connections hang until the client's timeout).
Missing binary: the test is skipped, unless `CI` is set, where it fails (CI installs redis-server).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = "redis-server"
START_TIMEOUT_S = 10.0


def require_redis_server() -> str:
    """Path of the binary; skip (fail under CI) without it."""
    binary = shutil.which(REDIS_SERVER)
    if binary is None:
        reason = f"`{REDIS_SERVER}` is not on PATH (apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI must run the Redis tests")
        pytest.skip(reason)
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers_ping(port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, binary: str, workdir: Path):
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start on `self.port` and wait until it answers PING."""
        assert self._process is None, "already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log"),
        ]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers_ping(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}: {self.log_tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGKILL: a crash, not a clean shutdown."""
        if self._process is None:
            return
        self._process.kill()  # SIGKILL also ends a paused (SIGSTOPped) server
        self._process.wait(timeout=10)
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze the process: the port stays open but nothing is answered (a hung or partitioned server)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def log_tail(self, num_chars: int = 2000) -> str:
        try:
            return (self.workdir / "redis.log").read_text()[-num_chars:]
        except OSError:
            return "(no log)"


@pytest.fixture
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(require_redis_server(), tmp_path_factory.mktemp("redis"))
    try:
        server.start()
    except RuntimeError:  # the free port was taken meanwhile: one more try on another
        server = RedisServer(server.binary, server.workdir)
        server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url
