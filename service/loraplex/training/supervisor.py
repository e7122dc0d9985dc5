"""Supervising the embedded worker process from the server: start it with the first job, stop it with the
server. Light on purpose: the API imports this module, never `worker` (which holds torch and the trainer).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from loraplex.config import Settings

log = logging.getLogger(__name__)

PARENT_PID_ENV = "_LORAPLEX_WORKER_PARENT_PID"  # set by LocalWorkerProcess; not a setting


class LocalWorkerProcess:
    """The embedded default: one `loraplex worker` child of the server, with the server's settings.
    Started with the first job (or at startup when jobs are pending), so a server that never fine-tunes
    never pays for a second process holding torch."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def ensure_running(self) -> None:
        with self._lock:
            if self.process is None or self.process.poll() is not None:
                self.process = start_worker_process(self.settings)
                log.info("started fine-tuning worker process %d", self.process.pid)

    def has_died(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (a running job goes back to the queue), then SIGKILL if it does not exit in time."""
        with self._lock:
            process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_worker_process(settings: Settings) -> subprocess.Popen:
    import loraplex

    env = {**os.environ, **settings_env(settings), PARENT_PID_ENV: str(os.getpid())}
    package_root = str(Path(loraplex.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-m", "loraplex", "worker"], env=env)


def settings_env(settings: Settings) -> dict[str, str]:
    """`LORAPLEX_*` variables that rebuild these settings in a child process."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"LORAPLEX_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env
