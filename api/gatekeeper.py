"""The ASGI middleware in front of every route (Gatekeeper): draining, API keys, body size and time, access log."""
from __future__ import annotations

import asyncio
import hmac
import logging
import time

from starlette.responses import Response

from .errors import BodyTimeout, error_response, shutting_down
from .metrics import Metrics
from .settings import CLIENT_CLOSED, ROUTES, ServerSettings

access_log = logging.getLogger("jitney.access")


class Gatekeeper:
    """ASGI middleware in front of every route: draining (503), API keys (401), body size (413), access log,
    and the HTTP status counter. Pure ASGI, so streaming responses pass through untouched."""

    def __init__(self, app, settings: ServerSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, path, status = time.perf_counter(), scope["path"], 500
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        deadline, body_done = time.monotonic() + self.settings.body_timeout_s, False

        async def receive_in_time():
            """receive(), but the body must be whole by the deadline (a trickled or endless body: 408).
            After the body, receive() only waits for a disconnect, which may take as long as it likes."""
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout() from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        try:
            if rejection := self.reject(path, headers):
                await rejection(scope, receive, send_and_note)
            else:
                await self.app(scope, receive_in_time, send_and_note)
        finally:
            if scope.get("state", {}).get("client_closed"):
                status = CLIENT_CLOSED
            label = path if path in ROUTES else "other"
            self.metrics.http.labels(label, str(status)).inc()
            u = scope.get("state", {}).get("usage") or {}
            client = scope.get("client") or ("-", 0)
            ms = 1000 * (time.perf_counter() - start)
            access_log.info('%s "%s %s" %d %.1fms prompt_tokens=%s completion_tokens=%s', client[0], scope["method"],
                            path, status, ms, u.get("prompt_tokens", "-"), u.get("completion_tokens", "-"),
                            extra={"client": client[0], "method": scope["method"], "path": path, "status": status,
                                   "duration_ms": round(ms, 1), "prompt_tokens": u.get("prompt_tokens"),
                                   "completion_tokens": u.get("completion_tokens")})  # fields of a JSON line

    def reject(self, path: str, headers: dict[str, str]) -> Response | None:
        s = self.settings
        if path == "/health":
            return None
        if s.draining:
            return shutting_down("the server is shutting down").response()
        if s.api_keys:
            auth = headers.get("authorization", "")
            key = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not any(hmac.compare_digest(key.encode(), k.encode()) for k in s.api_keys):
                return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                      "authentication_error", "invalid_api_key")
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > s.max_body_bytes:
            return error_response(413, f"the body is larger than {s.max_body_bytes} bytes", code="body_too_large",
                                  headers={"Connection": "close"})
        return None
