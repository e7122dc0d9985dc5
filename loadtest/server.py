"""Start the loraplex server as a subprocess, wait for /readyz, stop it cleanly."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_MODEL_NAME = "bench-base"


@dataclass
class ServerConfig:
    model_dir: Path
    data_dir: Path
    device: str  # "cpu" / "cuda": the benchmark's own pick, passed on so both sides agree
    dtype: str  # "float32" / "bfloat16"
    max_loras: int = 16
    max_lora_rank: int = 8
    max_num_seqs: int = 32
    max_model_len: int = 256
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, port: int) -> dict[str, str]:
        settings = {
            "model": self.model_dir, "served_model_name": BASE_MODEL_NAME, "data_dir": self.data_dir,
            "device": self.device, "dtype": self.dtype, "port": port, "host": "127.0.0.1",
            "max_loras": self.max_loras, "max_lora_rank": self.max_lora_rank,
            "max_num_seqs": self.max_num_seqs, "max_model_len": self.max_model_len, "log_level": "warning",
        }
        return {**serve_env(settings), **self.extra_env}


def serve_env(settings: Mapping[str, object]) -> dict[str, str]:
    """This process's environment plus `LORAPLEX_<NAME>` for each setting; the package lives in service/,
    so a checkout works whether or not it is pip-installed."""
    env = {**os.environ, **{f"LORAPLEX_{name.upper()}": str(value) for name, value in settings.items()}}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "service"), env.get("PYTHONPATH")]))
    return env


def spawn_serve(env: Mapping[str, str], log_path: Path) -> subprocess.Popen:
    """`python -m loraplex serve` from the repo root, stdout and stderr into `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:  # the child holds its own descriptor
        return subprocess.Popen([sys.executable, "-m", "loraplex", "serve"], cwd=REPO_ROOT, env=dict(env),
                                stdout=log, stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float, poll_s: float = 0.2,
               path: str = "/readyz") -> float:
    """Seconds until `url` + `path` answers 200; RuntimeError if the process exits, TimeoutError after
    `timeout_s`, both quoting the end of the log."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log:\n{log_tail(log_path)}")
        try:
            if httpx.get(f"{url}{path}", timeout=2.0).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"server not ready after {timeout_s:.0f}s; log:\n{log_tail(log_path)}")


def log_tail(log_path: Path, num_chars: int = 4000) -> str:
    return log_path.read_text(errors="replace")[-num_chars:] if log_path.exists() else ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`with Server(config, log_path) as server:` ... `server.url` ...; the process dies on exit."""

    def __init__(self, config: ServerConfig, log_path: Path, ready_timeout_s: float = 600.0):
        self.config, self.log_path, self.ready_timeout_s = config, log_path, ready_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None
        self.startup_s = 0.0  # spawn to first 200 from /readyz

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._proc = spawn_serve(self.config.env(self.port), self.log_path)
        try:
            self.startup_s = wait_ready(self.url, self._proc, self.log_path, self.ready_timeout_s, poll_s=0.25)
        except BaseException:  # a timeout, or Ctrl-C while waiting: no server is left behind
            self.stop()
            raise

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self, grace_s: float = 30.0) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def log_tail(self, num_chars: int = 4000) -> str:
        return log_tail(self.log_path, num_chars)
