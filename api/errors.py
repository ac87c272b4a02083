"""Every error leaves the server as OpenAI-shaped JSON: {"error": {"message", "type", "code"}}."""
from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from batcher.request import RequestOutput

from .settings import CLIENT_CLOSED


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.code, self.headers)


def error_response(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}}, status_code=status,
                        headers=headers)


def unsupported(message: str) -> APIError:
    """A field or value this server knows of but does not implement: refused, never silently ignored."""
    return APIError(400, message, "invalid_request_error", "unsupported_field")


def invalid(message: str, code: str = "invalid_value") -> APIError:
    """A body that parsed but holds a wrong type, a missing field or a value out of range."""
    return APIError(422, message, "invalid_request_error", code)


class ClientGone(Exception):
    """The client closed the connection before its request was answered: there is no one to send a status
    to, so none is sent; the access log and the status counter record 499 (nginx's "client closed request")."""


class BodyTimeout(Exception):
    """The request body did not arrive in full within --body-timeout-s."""


# --- the engine's error kinds, as the API tells them ------------------------------------------------------

@dataclass(frozen=True)
class ErrorKind:
    """How the API tells a client of one of the engine's error kinds (RequestOutput.error)."""
    status: int
    type: str
    code: str
    message: str | None = None  # a fixed message; None: the engine's own (RequestOutput.text)
    at_end: bool = False        # in a stream: told once, after the last chunk and usage, not in place of a chunk


ERRORS = {"timeout": ErrorKind(504, "timeout", "queue_timeout"),
          "internal": ErrorKind(500, "server_error", "internal_error"),
          "shutdown": ErrorKind(503, "unavailable", "shutting_down",
                                "the server shut down before the request finished", at_end=True),
          "unavailable": ErrorKind(503, "unavailable", "replica_unavailable"),  # replicas/: its replica is gone
          # response_format: the grammar engine failed mid-output, or the finished document fails the schema
          "invalid_output": ErrorKind(500, "server_error", "invalid_output")}


def shutting_down(message: str) -> APIError:
    """The 503 of a server that is stopping (a request refused by the drain, or by the engine): ERRORS' own."""
    kind = ERRORS["shutdown"]
    return APIError(kind.status, message, kind.type, kind.code)


def failure(out: RequestOutput) -> APIError | None:
    """The HTTP error for a request the engine ended with an error (its kind says which), else None.

    A request the drain cut (kind shutdown) gets a 503 before a response starts, a final error event in a stream
    that has started; a stream cut before its first token still starts, so every stream ends the same way."""
    if out.error is None:
        return None
    kind = ERRORS[out.error]
    return APIError(kind.status, kind.message or out.text, kind.type, kind.code)


def told_at_end(out: RequestOutput) -> bool:
    """A failure a stream reports after its last chunk (ErrorKind.at_end), not where the output comes."""
    return out.error is not None and ERRORS[out.error].at_end


# --- the app's exception handlers (all async: Starlette runs a plain function in its thread pool) ------------

class NoResponse(Response):
    """Sends nothing: the client is gone (see ClientGone)."""

    def __init__(self) -> None:
        super().__init__(status_code=CLIENT_CLOSED)

    async def __call__(self, scope, receive, send) -> None:
        return None


async def client_gone(request: Request, exc: ClientGone) -> Response:
    request.state.client_closed = True
    return NoResponse()


async def api_error(request: Request, exc: APIError) -> Response:
    return exc.response()


async def internal_error(request: Request, exc: Exception) -> Response:
    return error_response(500, "internal error (logged on the server)", "server_error", "internal_error")


async def not_found(request: Request, exc: Exception) -> Response:
    return error_response(404, f"no route {request.url.path}", code="not_found")


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    # RFC 9110 15.5.6: a 405 must say which methods the route takes (Starlette's Route puts them in exc.headers).
    allow = ", ".join(sorted((getattr(exc, "headers", None) or {}).get("Allow", "").replace(" ", "").split(",")))
    return error_response(405, f"{request.method} is not allowed on {request.url.path} (allowed: {allow})",
                          code="method_not_allowed", headers={"Allow": allow})


HANDLERS = {APIError: api_error, ClientGone: client_gone, Exception: internal_error, 404: not_found,
            405: method_not_allowed}
