"""Every error leaves the server as OpenAI-shaped JSON: {"error": {"message", "type", "code"}}."""
from __future__ import annotations

from starlette.responses import JSONResponse


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
