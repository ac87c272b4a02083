"""Running the app under uvicorn, with a graceful drain on SIGTERM/SIGINT.

On the first signal: /health turns 503 and new requests get 503, in-flight requests may finish for up to
grace_s, the rest are aborted (streams get a final error event), then uvicorn closes and the process exits 0.
A second signal exits at once.
"""
from __future__ import annotations

import asyncio
import logging

import uvicorn

from batcher.engine import Engine
from batcher.request import EndReason

from .app import ServerSettings
from .protocol import ConnectionLimits, limited_protocol

log = logging.getLogger("jitney.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine, settings: ServerSettings, grace_s: float):
        super().__init__(config)
        self.engine, self.settings, self.grace_s = engine, settings, grace_s
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._drain_task is not None:  # a second signal: abort everything and stop now
            for request_id in list(self.engine.requests):
                self.engine.abort(request_id, EndReason.SHUT_DOWN)
            self.force_exit = self.should_exit = True
            return
        log.info("shutting down: draining in-flight requests for up to %.0fs", self.grace_s)
        self.settings.draining = True
        self._drain_task = asyncio.get_event_loop().create_task(self._drain())

    async def _drain(self) -> None:
        await self.engine.stop(self.grace_s)
        await asyncio.sleep(0.1)  # let handlers flush their final events before uvicorn closes connections
        self.should_exit = True


def serve(app, engine: Engine, settings: ServerSettings, host: str, port: int, grace_s: float,
          ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
          limits: ConnectionLimits = ConnectionLimits(), keep_alive_s: float = 5.0) -> None:
    # Our protocol class (api/protocol.py) is uvicorn's httptools one with limits on headers and connections.
    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_level="info", lifespan="on",
                            timeout_graceful_shutdown=5, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                            http=limited_protocol(limits), timeout_keep_alive=keep_alive_s)
    DrainingServer(config, engine, settings, grace_s).run()
