"""A real `loraplex serve` subprocess for tests that need signals, probes and a real port
(spawned and awaited by the same helpers as the load tests' servers, loadtest/server.py)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loadtest.server import REPO_ROOT, free_port, serve_env, spawn_serve, wait_ready

__all__ = ["REPO_ROOT", "ServerProcess", "free_port", "running_server"]


class ServerProcess:
    def __init__(self, data_dir: Path, log_path: Path, **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir, self.log_path = data_dir, log_path
        self.proc = spawn_serve(serve_env({"data_dir": data_dir, "port": self.port, **settings}), log_path)

    def wait_ready(self, timeout_s: float = 120) -> None:
        wait_ready(self.url, self.proc, self.log_path, timeout_s)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def running_server(data_dir: Path, **settings) -> Iterator[ServerProcess]:
    """A ready server on `data_dir` (its log beside it), killed on exit: a module fixture's whole body."""
    process = ServerProcess(data_dir, data_dir.parent / f"{data_dir.name}.log", **settings)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()
