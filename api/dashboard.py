"""GET /dashboard (one self-contained page: api/static/dashboard.html) and GET /v1/engine/steps (its feed: Server-Sent
Events of step summaries, batcher/step_view.py). `jitney serve --no-dashboard` leaves both out; `jitney view`
(api/view.py) serves the same page over recordings.

Both routes sit behind the Gatekeeper's API-key check like every other one. A browser cannot add a header to the
address it is told to open, so GET /dashboard also takes the key as ?api_key=KEY (as Jupyter takes its token): the
page then drops it from the address bar and sends it as 'Authorization: Bearer' on its stream request. Only that
one page's GET reads the query; every other route still needs the header.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from batcher.engine_client import EngineClient
from batcher.step_view import StepHub, TooManyViewers

from .errors import error_response

PAGE = Path(__file__).parent / "static" / "dashboard.html"
MAX_VIEWERS = 4          # live viewers at once; one more gets 429
BUFFER_EVENTS = 1024     # a viewer this many step events behind is dropped
IDLE_STATE_S = 1.0       # between steps, a state event this often (the queue and KV cache as they are now)
FINAL_SEND_S = 2.0       # a dropped viewer's connection gets this long to take its last bytes, then is cut


def page(config: dict) -> str:
    """The page with its configuration (live stream or recordings) written in."""
    return PAGE.read_text().replace("/*CONFIG*/null", json.dumps(config))


class KeyFromQuery:
    """ASGI wrapper, outside the Gatekeeper: GET /dashboard?api_key=KEY is treated as if it carried the header."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope["path"] == "/dashboard" and scope["method"] in ("GET", "HEAD")
                and scope.get("query_string")):
            keys = parse_qs(scope["query_string"].decode("latin-1")).get("api_key")
            if keys and not any(k.lower() == b"authorization" for k, _ in scope["headers"]):
                scope = dict(scope, headers=[*scope["headers"], (b"authorization", f"Bearer {keys[0]}".encode())])
        return await self.app(scope, receive, send)


class StepStream:
    """One viewer's SSE response: hello, the current state, then every step as it runs (a state event each second
    while idle). Ends when the client goes, or when the viewer is dropped for falling behind."""

    def __init__(self, hub: StepHub):
        self.hub = hub

    async def __call__(self, scope, receive, send) -> None:
        try:
            viewer = self.hub.join()
        except TooManyViewers as e:
            return await error_response(429, str(e), "rate_limit_error", "too_many_viewers",
                                        headers={"Retry-After": "5"})(scope, receive, send)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
                                (b"x-accel-buffering", b"no")]})

        async def pump() -> None:
            """Until the viewer is dropped or the server stops accepting (a drain ends the stream, not waits on it)."""
            await send({"type": "http.response.body", "body": frame(self.hub.opening()), "more_body": True})
            while self.hub.live:
                lines = await viewer.take(IDLE_STATE_S)
                if viewer.dropped:
                    return
                lines = lines or [self.hub.state_now()]
                await send({"type": "http.response.body", "body": frame(lines), "more_body": True})

        async def gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.create_task(pump()), asyncio.create_task(gone()), asyncio.create_task(viewer.gone.wait())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            self.hub.leave(viewer)
        if tasks[1] in done:  # the client left
            return
        # Dropped, or the server is stopping: the end of the stream, if the client takes it soon; else uvicorn
        # cuts the connection (a stalled client never reads it).
        try:
            await asyncio.wait_for(send({"type": "http.response.body", "body": b"", "more_body": False}),
                                   FINAL_SEND_S)
        except (TimeoutError, OSError):
            pass


def frame(lines: list[str]) -> bytes:
    return "".join(f"data: {line}\n\n" for line in lines).encode()


def dashboard_routes(engine: EngineClient) -> list[Route]:
    """The page and its stream over an engine that has steps to watch (EngineClient.step_hub); where it has
    none (over replicas) the stream answers 501."""
    hub = engine.step_hub(MAX_VIEWERS, BUFFER_EVENTS)

    async def dashboard(request: Request) -> Response:
        html = page({"mode": "live", "stream": "/v1/engine/steps"})
        return Response(html, media_type="text/html; charset=utf-8",
                        headers={"cache-control": "no-store", "referrer-policy": "no-referrer",
                                 "content-security-policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                                            "style-src 'unsafe-inline'; img-src data:"})

    return [Route("/dashboard", dashboard, methods=["GET"]),
            Route("/v1/engine/steps", StepsEndpoint(hub), methods=["GET"])]


class StepsEndpoint:
    """GET /v1/engine/steps as a plain ASGI app (Route passes a non-function endpoint scope, receive and send)."""

    def __init__(self, hub: StepHub | None):
        self.hub = hub

    async def __call__(self, scope, receive, send) -> None:
        if self.hub is None:
            return await error_response(501, "the step stream watches one in-process engine; it is not available "
                                             "under --replicas", code="not_implemented")(scope, receive, send)
        await StepStream(self.hub)(scope, receive, send)
