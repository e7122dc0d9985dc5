"""Start the loraplex server as a subprocess, wait for /readyz, stop it cleanly."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
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
    max_batch_size: int = 32
    max_model_len: int = 256
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, port: int) -> dict[str, str]:
        settings = {
            "MODEL": str(self.model_dir), "SERVED_MODEL_NAME": BASE_MODEL_NAME, "DATA_DIR": str(self.data_dir),
            "DEVICE": self.device, "DTYPE": self.dtype, "PORT": str(port), "HOST": "127.0.0.1",
            "MAX_LORAS": str(self.max_loras), "MAX_LORA_RANK": str(self.max_lora_rank),
            "MAX_BATCH_SIZE": str(self.max_batch_size), "MAX_MODEL_LEN": str(self.max_model_len),
            "LOG_LEVEL": "warning",
        }
        env = {**os.environ, **{f"LORAPLEX_{k}": v for k, v in settings.items()}, **self.extra_env}
        # The package lives in service/; work from a checkout whether or not it is pip-installed.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "service"), env.get("PYTHONPATH")]))
        return env


class Server:
    """`with Server(config, log_path) as server:` ... `server.url` ...; the process dies on exit."""

    def __init__(self, config: ServerConfig, log_path: Path, ready_timeout_s: float = 600.0):
        self.config, self.log_path, self.ready_timeout_s = config, log_path, ready_timeout_s
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None
        self.startup_s = 0.0  # spawn to first 200 from /readyz

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self._proc = subprocess.Popen([sys.executable, "-m", "loraplex", "serve"], cwd=REPO_ROOT,
                                      env=self.config.env(self.port), stdout=log, stderr=subprocess.STDOUT)
        log.close()  # the child holds its own descriptor
        self.startup_s = self._wait_ready()

    def stop(self, grace_s: float = 30.0) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def _wait_ready(self) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < self.ready_timeout_s:
            if self._proc.poll() is not None:
                raise RuntimeError(f"server exited with {self._proc.returncode}; log:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"server not ready after {self.ready_timeout_s:.0f}s; log:\n{self.log_tail()}")

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:] if self.log_path.exists() else ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
