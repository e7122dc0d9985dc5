"""Named crash points compiled into the code, armed only by an environment variable (tests, chaos drills).

    failpoint("versioned_store.after_rename")     # does nothing unless armed

    LORAPLEX_FAILPOINTS="versioned_store.after_rename=kill;local_jobs.before_claim_write=enospc"

Actions: `kill` (SIGKILL this process: a crash, no cleanup), `sleep(<seconds>)`, `enospc` (raise the
OSError a full disk raises), `raise` (a RuntimeError), `block(<path>)` (create `<path>`, then wait until
the test removes it, at most 60 s: the test acts while the process stands exactly at this point).
Like etcd's gofail or TiKV's fail-rs, the points stay in production code and cost one dict lookup; the
variable is read on each call, so a test can arm a point in its own process too.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

ENV_VAR = "LORAPLEX_FAILPOINTS"
MAX_BLOCK_S = 60.0
_ACTION = re.compile(r"^(kill|enospc|raise|sleep\(([0-9.]+)\)|block\((.+)\))$")
_parsed: tuple[str, dict[str, str]] = ("", {})


class FailpointError(RuntimeError):
    """What `raise` throws."""


def failpoint(name: str) -> None:
    action = _armed().get(name)
    if action is not None:
        _fire(name, action)


def delay_s(name: str) -> float:
    """For async code, which must not block in `time.sleep`: the seconds of an armed `sleep(<s>)`, else 0."""
    match = _ACTION.fullmatch(_armed().get(name, ""))
    return float(match[2]) if match is not None and match[2] is not None else 0.0


def _armed() -> dict[str, str]:
    global _parsed
    spec = os.environ.get(ENV_VAR, "")
    if spec != _parsed[0]:
        pairs = (item.partition("=") for item in spec.split(";") if item.strip())
        _parsed = (spec, {name.strip(): action.strip() for name, _, action in pairs})
    return _parsed[1]


def _fire(name: str, action: str) -> None:
    match = _ACTION.fullmatch(action)
    if match is None:
        raise ValueError(f"{ENV_VAR}: unknown action {action!r} for {name}")
    log.warning("failpoint %s: %s", name, action)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (failpoint {name})")
    elif action == "raise":
        raise FailpointError(f"failpoint {name}")
    elif match[2] is not None:
        time.sleep(float(match[2]))
    else:
        _block(Path(match[3]))


def _block(marker: Path) -> None:
    marker.touch()
    deadline = time.monotonic() + MAX_BLOCK_S
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
