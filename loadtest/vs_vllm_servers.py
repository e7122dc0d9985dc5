"""The two systems of the vLLM comparison: how each is started, stopped and named over HTTP.

loraplex is `loadtest.server.Server` (its adapter store seeded by `workload.build`, as in bench.py). vLLM's
CPU build runs through the shared peer script (`vllm-cpu serve MODEL PORT ARGS`, its own venv), in a
process group of its own that is always killed whole: vLLM forks an engine-core and a worker process.
Both get the same scheduler limits (sequences, model length, batched tokens), so neither is handicapped
by a default the other does not share.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from loadtest import serving
from loadtest.runtime import Runtime
from loadtest.server import BASE_MODEL_NAME, Server, free_port, log_tail, wait_ready
from loadtest.workload import TENANT, BuiltWorkload

REPO_ROOT = Path(__file__).resolve().parents[1]
VLLM_BASE_NAME = "base"  # the peer script's --served-model-name


class VllmMissing(RuntimeError):
    """vLLM's CPU build is not set up here; the message says how to set it up."""


@dataclass(frozen=True)
class Limits:
    """Scheduler limits given to both servers alike."""

    max_num_seqs: int = 256
    max_model_len: int = 1024
    max_num_batched_tokens: int = 2048


def find_peer(explicit: Path | None = None) -> Path:
    """The `vllm-cpu` peer script: --vllm-peer, else `<shared>/peers/vllm-cpu` beside the checkout."""
    shared = os.environ.get("LORAPLEX_SHARED_DIR")
    candidates = [explicit] if explicit else [
        *([Path(shared) / "peers" / "vllm-cpu"] if shared else []),
        REPO_ROOT.parent / "shared" / "peers" / "vllm-cpu", REPO_ROOT.parents[1] / "shared" / "peers" / "vllm-cpu"]
    for path in candidates:
        if path.is_file():
            return path
    raise VllmMissing(f"the vLLM peer script was not found (looked at {', '.join(map(str, candidates))}); "
                      "pass --vllm-peer PATH or set LORAPLEX_SHARED_DIR")


def vllm_venv() -> Path:
    return Path(os.environ.get("VLLM_VENV") or Path.home() / ".cache" / "loraplex-peers" / "vllm-cpu")


def check_vllm_setup(peer: Path) -> Path:
    """The venv's python; VllmMissing with the setup command when vLLM is not installed (the peer's serve
    would otherwise pip-install it inside the timed start)."""
    venv = vllm_venv()
    if not (venv / "bin" / "vllm").exists():
        raise VllmMissing(f"vLLM's CPU build is not set up in {venv}: run `bash {peer} setup` first "
                          "(a few minutes; VLLM_VENV picks another venv)")
    return venv / "bin" / "python"


def peer_versions(python: Path) -> dict:
    code = "import torch, vllm; print(vllm.__version__, torch.__version__)"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300, check=True)
    vllm_version, torch_version = out.stdout.split()[-2:]
    return {"vllm": vllm_version, "vllm_torch": torch_version}


class VllmServer:
    """`with VllmServer(...) as server:`; the whole process group is gone on exit (also on Ctrl-C)."""

    def __init__(self, peer: Path, built: BuiltWorkload, limits: Limits, log_path: Path,
                 ready_timeout_s: float = 900.0):
        self.peer, self.built, self.limits, self.log_path = peer, built, limits, log_path
        self.ready_timeout_s = ready_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_s = 0.0
        self._proc: subprocess.Popen | None = None

    def args(self) -> list[str]:
        wl = self.built.workload
        modules = [f"{wl.adapter_name(i)}={self.built.adapter_dir(wl.adapter_name(i))}" for i in range(wl.num_adapters)]
        return ["--enable-lora", "--max-loras", str(wl.num_adapters), "--max-lora-rank", str(wl.lora_rank),
                "--max-num-seqs", str(self.limits.max_num_seqs), "--max-model-len", str(self.limits.max_model_len),
                "--max-num-batched-tokens", str(self.limits.max_num_batched_tokens), "--lora-modules", *modules]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def __enter__(self) -> VllmServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(["bash", str(self.peer), "serve", str(self.built.model_dir), str(self.port),
                                           *self.args()], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.startup_s = wait_ready(self.url, self._proc, self.log_path, self.ready_timeout_s, path="/health")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def version(self) -> str:
        try:
            return httpx.get(f"{self.url}/version", timeout=10).json().get("version", "?")
        except (httpx.HTTPError, ValueError):
            return "?"

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the group, SIGKILL to what is left after `grace_s`."""
        if self._proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self._proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _group_alive(self._proc.pid):
                self._proc.poll()
                time.sleep(0.2)
            if not _group_alive(self._proc.pid):
                break
        self._proc.wait()

    def log_tail(self, num_chars: int = 4000) -> str:
        return log_tail(self.log_path, num_chars)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies left for a non-reaping init do not count)."""
    if not Path("/proc").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in Path("/proc").iterdir():
        try:
            state, _ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


@dataclass(frozen=True)
class System:
    """One side of the comparison: its name, how to start it, what it calls the base model and adapters."""

    name: str  # "loraplex" / "vllm"
    base_model: str
    adapter_prefix: str  # model name = prefix + adapter name

    def model(self, adapter: str | None) -> str:
        return self.base_model if adapter is None else self.adapter_prefix + adapter


LORAPLEX = System("loraplex", BASE_MODEL_NAME, f"{TENANT}/")
VLLM = System("vllm", VLLM_BASE_NAME, "")


def start(system: System, built: BuiltWorkload, rt: Runtime, limits: Limits, peer: Path, log_dir: Path):
    """An unstarted server context for `system` (enter it with `with`)."""
    if system is VLLM:
        return VllmServer(peer, built, limits, log_dir / "vllm.log")
    config = replace(serving.server_config(built, rt), max_num_seqs=limits.max_num_seqs,
                     max_model_len=limits.max_model_len,
                     extra_env={"LORAPLEX_MAX_NUM_BATCHED_TOKENS": str(limits.max_num_batched_tokens)})
    return Server(config, log_dir / "loraplex.log")
