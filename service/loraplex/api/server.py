"""Run the app under uvicorn with a graceful drain on SIGTERM.

First SIGTERM: readiness turns false and new requests get 503 at once, in-flight requests (streams
included) run to completion for up to `drain_grace_s`; streams still open then get an error event and
their end frame (`[DONE]`); then uvicorn shuts down and the process exits 0.
A second signal (or SIGINT) skips the wait.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import socket

import uvicorn
from fastapi import FastAPI

from loraplex.config import Settings

log = logging.getLogger(__name__)

STREAM_END_S = 2.0  # after the grace period: time for open streams to send their error and end frames


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, grace_s: float):
        super().__init__(config)
        self.app, self.grace_s = app, grace_s
        self._is_draining = False

    def handle_exit(self, sig: int, frame) -> None:
        loop = getattr(self.app.state, "loop", None)
        if sig != signal.SIGTERM or self._is_draining or loop is None:
            return super().handle_exit(sig, frame)
        self._is_draining = True
        self.app.state.drain.begin()
        loop.call_soon_threadsafe(lambda: loop.create_task(self._exit_when_drained(sig)))

    async def _exit_when_drained(self, sig: int) -> None:
        if not await self.app.state.drain.wait_idle(self.grace_s):
            await self.app.state.drain.wait_idle(STREAM_END_S)  # streams send their last frames and close
        # Not super().handle_exit: uvicorn would re-raise the captured SIGTERM after shutdown and the
        # process would die "killed by SIGTERM"; a completed drain is a clean exit (status 0).
        self.should_exit = True


def serve(app: FastAPI, settings: Settings, graceful_shutdown_s: float) -> None:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=settings.log_level.lower(),
        log_config=None,  # keep our logging setup (JSON lines)
        access_log=False,  # the observability middleware writes one structured line per request
        lifespan="on",  # a failed startup (model load) must stop the server, not be ignored
        timeout_graceful_shutdown=graceful_shutdown_s,
    )
    sockets = None
    if settings.metrics_port is not None:  # one server, two sockets: the app tells them apart by local port
        sockets = [config.bind_socket(), _bind(settings.host, settings.metrics_port)]
    asyncio.run(DrainingServer(config, app, settings.drain_grace_s).serve(sockets=sockets))


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock
