"""A request's body: JSON only, read within its size and time limits, its fields checked before any is read."""
from __future__ import annotations

from starlette.requests import ClientDisconnect, Request

from .errors import APIError, BodyTimeout, ClientGone
from .jsonbody import parse_json
from .schemas import check_fields, check_rules
from .settings import ServerSettings


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) as soon as it passes the limit, whatever Content-Length claimed."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the body is larger than {limit} bytes", code="body_too_large",
                               headers={"Connection": "close"})  # the rest of it is not worth reading
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    except BodyTimeout:
        raise APIError(408, "the request body did not arrive in time; send it whole and promptly",
                       code="body_timeout", headers={"Connection": "close"}) from None
    return b"".join(chunks)


def check_content_type(request: Request) -> None:
    """JSON bodies only. This also keeps web pages out: a browser sends a cross-origin POST without asking
    first only for "simple" content types (text/plain, forms), never for application/json."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise APIError(415, f"send the body as JSON with 'Content-Type: application/json' (got "
                            f"{media[:60] or 'none'!r})", code="unsupported_media_type")


async def body_bytes(request: Request, settings: ServerSettings) -> bytes:
    check_content_type(request)
    return await read_body(request, settings.max_body_bytes)


def parse_body(raw: bytes, route: str) -> dict:
    """The body as JSON, its fields checked: work that grows with the body (see api/routes.py prepared())."""
    body = parse_json(raw)
    check_fields(body, route)
    check_rules(body, route)  # conditions between fields (fields.RULES), before any field is read
    return body
