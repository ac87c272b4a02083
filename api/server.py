"""Running the app under uvicorn, with a graceful drain on SIGTERM/SIGINT.

On the first signal: /health turns 503 and new requests get 503, in-flight requests may finish for up to
grace_s, the rest are aborted (streams get a final error event), then uvicorn closes and the process exits 0.
A second signal exits at once.

The listening socket is bound before the model loads (bind(), called by jitney/cli.py): a port in use, or an
address this machine does not have, is a one-line error in milliseconds instead of after the load. uvicorn is
handed that socket, listens on it at start-up, and only then is the "serving on" line printed.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys

import uvicorn

from batcher.engine_client import EngineClient
from batcher.request import EndReason
from model_runner.errors import InvalidRequestError

from .settings import ServerSettings
from .logs import log_line
from .protocol import ConnectionLimits, limited_protocol

log = logging.getLogger("jitney.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: EngineClient, settings: ServerSettings, grace_s: float,
                 ready: str = ""):
        super().__init__(config)
        self.engine, self.settings, self.grace_s, self.ready = engine, settings, grace_s, ready
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.ready:  # listening now: the line may say so
            log_line(self.ready)

    def handle_exit(self, sig, frame) -> None:
        if self._drain_task is not None:  # a second signal: abort everything and stop now
            for request_id in list(self.engine.requests):
                self.engine.abort(request_id, EndReason.SHUT_DOWN)
            self.force_exit = self.should_exit = True
            return
        log.info("shutting down: draining in-flight requests for up to %.0fs", self.grace_s)
        self.settings.draining = True
        self._drain_task = asyncio.get_event_loop().create_task(self._drain())

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)
        if self.force_exit:
            # uvicorn skips the app's shutdown on a forced exit, leaving its lifespan task to be cancelled at the
            # loop's end (a CancelledError traceback in the log). Every request is aborted by now, so the app's
            # own shutdown (engine stop, prep thread) is quick: run it, and exit cleanly.
            await self.lifespan.shutdown()

    async def _drain(self) -> None:
        await self.engine.stop(self.grace_s)
        await asyncio.sleep(0.1)  # let handlers flush their final events before uvicorn closes connections
        self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound (not yet listening: a client gets 'connection refused' while the model loads,
    not a connection that hangs). SO_REUSEADDR as uvicorn sets it: a restart is not refused by the last run's
    connections in TIME_WAIT, while a port another process listens on still is."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, UnicodeError) as e:  # UnicodeError: a host name idna cannot encode
        sock.close()
        why = getattr(e, "strerror", None) or str(e)
        code = getattr(e, "errno", None)
        hint = ("another process listens there: stop it, or give another --port (0 = any free one)"
                if code == errno.EADDRINUSE else
                "ports below 1024 need privileges: give a --port from 1024 up" if code == errno.EACCES else
                "give an address of this machine with --host")
        raise InvalidRequestError(f"cannot listen on {host}:{port} ({why}): {hint}") from None
    return sock


# The engine steps on its own thread and takes the GIL back between its kernels (which release it); while the
# event loop holds it (streaming tokens to many clients), the engine waits for the interpreter's switch interval,
# 5 ms by default, several times a step. At 0.5 ms the 128-at-once burst over HTTP went from 113 to 121 output
# tokens/s (1 ms: 120) against 125 in-process, on AMD Zen 3, 2 cores, float32 (jitney bench --start-server).
GIL_SWITCH_S = 0.0005


def serve(app, engine: EngineClient, settings: ServerSettings, sock: socket.socket, grace_s: float,
          ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
          limits: ConnectionLimits = ConnectionLimits(), keep_alive_s: float = 5.0, ready: str = "") -> None:
    """Serves on `sock` (from bind()); prints `ready` once uvicorn listens on it."""
    sys.setswitchinterval(GIL_SWITCH_S)
    # Our protocol class (api/protocol.py) is uvicorn's httptools one with limits on headers and connections.
    # log_config=None: uvicorn's loggers propagate to the one handler api/logs.py set (text or JSON lines).
    config = uvicorn.Config(app, access_log=False, log_level="info", lifespan="on", log_config=None,
                            timeout_graceful_shutdown=5, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                            http=limited_protocol(limits), timeout_keep_alive=keep_alive_s)
    DrainingServer(config, engine, settings, grace_s, ready).run(sockets=[sock])
