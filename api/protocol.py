"""Connection-level limits, in uvicorn's HTTP protocol itself: what no ASGI app can see, since an app is only
called once a request's headers are complete.

uvicorn (httptools) bounds none of these on its own: a client may send headers forever, a byte at a time
(slowloris), or one endless header line, each held in memory; it may open a connection and send nothing; and
after an early answer (401, 413, 408) the rest of a body it keeps sending is read and dropped while the
connection stays open. This subclass adds, each a `jitney serve` flag:

  --max-header-bytes, --max-headers   bytes and count of the request line and headers: 431, then close
  --header-timeout-s                  the headers must be whole this long after their first byte (or after
                                      the connection opens): 408, then close
  --max-connections                   open connections: one more is answered 503 and closed
  a request answered before its body was read (401, 415, 413, a route that ignores bodies): up to
  DRAIN_BYTES more of the body are read and dropped within --header-timeout-s, then the connection closes.
  (Closing at once would be simpler, but a socket closed with unread bytes in it is reset, and the reset can
  destroy the answer before the client reads it.)

The body deadline (--body-timeout-s) is kept by the app's middleware (api/gatekeeper.py), which can answer 408 in
JSON through the normal path. uvicorn's own answer to malformed HTTP (a plain-text 400) is JSON here too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    header_timeout_s: float = 10.0
    max_connections: int = 1024


DRAIN_BYTES = 64 * 1024


class _TooLarge(Exception):
    """Raised inside a parser callback to stop parsing; httptools hands it to data_received as a parse error."""


def json_error(status: int, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 response in the API's error shape, for answers sent before any app is involved."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": code}}).encode()
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    limits = ConnectionLimits()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._refusal: tuple[int, str, str] | None = None
        self._waiting_headers, self._pending_bytes, self._header_bytes, self._header_count = True, 0, 0, 0
        self._header_timer = self._drain_timer = None
        self._drain_left = 0
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, f"this server holds at most {self.limits.max_connections} connections; retry later",
                         "too_many_connections")
            return
        self._arm_header_timer()  # a connection that never sends a byte is closed too

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        self._stop_draining()
        super().connection_lost(exc)

    # --- headers: size, count, deadline ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._drain_timer is not None:
            self._drain_left -= len(data)
            if self._drain_left < 0:
                self.transport.close()
                return
        elif self._waiting_headers and self._pending_bytes == 0:
            self._arm_header_timer()  # the first byte of a request starts its header clock
        super().data_received(data)
        if self._waiting_headers and self._drain_timer is None and not self.transport.is_closing():
            # Bytes held while the headers are incomplete (httptools buffers a partial header line whole).
            self._pending_bytes += len(data)
            if self._pending_bytes > self.limits.max_header_bytes:
                self._refuse(431, self._size_message(), "headers_too_large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes, self._header_count = 0, 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count(len(url), 0)

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._count(len(name) + len(value) + 4, 1)

    def _count(self, size: int, headers: int) -> None:
        self._header_bytes += size
        self._header_count += headers
        if self._header_bytes > self.limits.max_header_bytes:
            self._refusal = (431, self._size_message(), "headers_too_large")
            raise _TooLarge()
        if self._header_count > self.limits.max_headers:
            self._refusal = (431, f"more than {self.limits.max_headers} request headers", "too_many_headers")
            raise _TooLarge()

    def _size_message(self) -> str:
        return f"the request line and headers are larger than {self.limits.max_header_bytes} bytes"

    def on_headers_complete(self) -> None:
        self._waiting_headers, self._pending_bytes = False, 0
        self._cancel_header_timer()
        super().on_headers_complete()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self._waiting_headers or self.transport.is_closing():
            return
        if self._pending_bytes:  # a request was started and not finished: say why it is dropped
            self._refuse(408, f"the request headers did not arrive within {self.limits.header_timeout_s:g} s",
                         "header_timeout")
        else:
            self.transport.close()

    # --- after the answer -----------------------------------------------------------------------------

    def on_response_complete(self) -> None:
        draining = self.cycle is not None and self.cycle.more_body and not self.transport.is_closing()
        if draining:  # answered before its body was read: read out a little more of it, then close
            self._drain_left = DRAIN_BYTES
            self._drain_timer = self.loop.call_later(self.limits.header_timeout_s, self.transport.close)
        super().on_response_complete()
        if not draining and not self.transport.is_closing():
            self._waiting_headers, self._pending_bytes = True, 0  # keep-alive: uvicorn's idle timer runs

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._drain_timer is not None:  # the dropped body ended in time: the connection lives on
            self._stop_draining()
            self._waiting_headers, self._pending_bytes = True, 0

    def _stop_draining(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None

    # --- answers uvicorn would give in plain text ------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        status, message, code = self._refusal or (400, "malformed HTTP request: " + msg.rstrip("."), "bad_http")
        self._refuse(status, message, code)

    def _refuse(self, status: int, message: str, code: str) -> None:
        self._cancel_header_timer()
        self.logger.info("refused a connection: %d %s", status, message)
        if not self.transport.is_closing():
            self.transport.write(json_error(status, message, code))
            self.transport.close()


def limited_protocol(limits: ConnectionLimits) -> type[LimitedHttpToolsProtocol]:
    """The protocol class uvicorn instantiates per connection, carrying these limits."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})
