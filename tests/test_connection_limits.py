"""Connection-level limits (issue 11, section 2), over raw sockets against a real server: headers bounded in
size and count, deadlines for headers and bodies (slowloris, endless and unterminated chunked bodies), a cap on
connections, and uvicorn's own answers in JSON. Each test checks behaviour (the answer, the connection closed),
never how long it took; the deadlines are short so the tests are, and the waits generous.
"""
import json
import socket
import time

import httpx
import pytest

from .server_helpers import jitney_server
from .test_api import ENV, TINY

LIMITS = ("--max-header-bytes", "4096", "--max-headers", "20", "--header-timeout-s", "1", "--body-timeout-s", "1",
          "--max-connections", "6")


@pytest.fixture(scope="module")
def server():
    with jitney_server(*TINY, *LIMITS, env=ENV) as s:
        yield s


def connect(server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    return s


def read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a 15 s socket timeout fails the test)."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def json_answer(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    assert b"content-type: application/json" in head.lower(), raw[:500]
    return status, json.loads(body)


def test_headers_too_large_is_431(server):
    with connect(server) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n")
        status, body = json_answer(read_until_closed(s))
    assert status == 431 and body["error"]["code"] == "headers_too_large"


def test_too_many_headers_is_431(server):
    with connect(server) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(50)) + b"\r\n")
        status, body = json_answer(read_until_closed(s))
    assert status == 431 and body["error"]["code"] == "too_many_headers"


def test_an_endless_header_line_is_cut_off(server):
    """Memory stays bounded: a header that never ends is refused once it passes the limit, not buffered."""
    sent = 0
    with connect(server) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        with pytest.raises(OSError):  # the server closes: a reset or a broken pipe, long before 10 MB
            for _ in range(10_000):
                s.sendall(b"a" * 1024)
                sent += 1024
            read_until_closed(s)
            raise OSError("the server kept reading")
    assert sent < 10_000 * 1024


def test_slowloris_headers_get_408_and_close(server):
    with connect(server) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")
        for _ in range(3):  # a header now and then keeps no connection alive past the deadline
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
            time.sleep(0.3)
        status, body = json_answer(read_until_closed(s))
    assert status == 408 and body["error"]["code"] == "header_timeout"


def test_a_connection_that_sends_nothing_is_closed(server):
    with connect(server) as s:
        assert read_until_closed(s) == b""


@pytest.mark.parametrize("framing,start", [
    ("Content-Length: 1000", b'{"prompt": "'),                          # a body that never ends
    ("Transfer-Encoding: chunked", b'c\r\n{"prompt": "\r\n'),             # chunked, no last chunk
])
def test_a_body_that_does_not_arrive_in_time_gets_408(server, framing, start):
    with connect(server) as s:
        s.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}\r\n\r\n".encode()
                  + start)
        status, body = json_answer(read_until_closed(s))
    assert status == 408 and body["error"]["code"] == "body_timeout"


def test_a_body_after_the_answer_does_not_hold_the_connection(server):
    """A route that ignores bodies answers at once; the endless body behind it is not read forever."""
    with connect(server) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n" + b"a" * 1000)
        raw = b""
        with pytest.raises(OSError):
            for _ in range(100_000):
                s.sendall(b"a" * 1000)
            raise OSError("the server kept reading")
        try:
            raw = read_until_closed(s)
        except OSError:
            pass
    assert raw == b"" or raw.startswith(b"HTTP/1.1 200")


def test_connections_beyond_the_cap_get_503(server):
    held = [connect(server) for _ in range(6)]
    try:
        for s in held:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # started, not finished: each holds its slot
        with connect(server) as extra:
            status, body = json_answer(read_until_closed(extra))
        assert status == 503 and body["error"]["code"] == "too_many_connections"
    finally:
        for s in held:
            s.close()


def test_malformed_http_is_answered_in_json(server):
    with connect(server) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        status, body = json_answer(read_until_closed(s))
    assert status == 400 and body["error"]["code"] == "bad_http"


def test_still_serving_and_no_traceback(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        assert c.get("/health").status_code == 200
        r = c.post("/generate", json={"prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200, r.text
    assert "Traceback" not in server.output()
