"""Idle and slow connections against the real service under uvicorn (as `crossmodal serve` runs it).

Hundreds of sockets that never send a request, and clients that send their headers a byte
at a time, must neither starve normal requests nor stay open past their deadlines.
"""
from __future__ import annotations

import socket
import threading
import time

import httpx

from crossmodal.search.engine import SearchEngine
from crossmodal.search.service import create_app
from tests.conftest import serving

IDLE_SOCKETS = 300
SLOW_CLIENTS = 20


def closed_by_server(conn: socket.socket) -> bool:
    conn.settimeout(0.01)
    try:
        return conn.recv(1024) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (TimeoutError, BlockingIOError):
        return False


def test_idle_and_slow_connections_are_closed_and_never_starve_requests(indexed, encoder):
    settings = indexed.model_copy(update={"request_head_timeout": 2.0, "request_body_timeout": 3.0})
    with serving(create_app(settings, SearchEngine(settings, encoder=encoder))) as base:
        port = int(base.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(IDLE_SOCKETS)]
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(SLOW_CLIENTS)]
        stop = threading.Event()

        def trickle() -> None:  # slowloris: a request head that never ends
            for conn in slow:
                conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            while not stop.wait(0.2):
                for conn in slow:
                    try:
                        conn.sendall(b"X")
                    except OSError:
                        pass

        thread = threading.Thread(target=trickle)
        thread.start()
        start = time.time()
        try:
            with httpx.Client(base_url=base, timeout=5) as http:
                while time.time() - start < 1.5:  # meanwhile, normal requests are answered
                    assert http.get("/v1/images/search", params={"q": "a cat", "k": 3}).status_code == 200
            time.sleep(2.0 + 1.0 - (time.time() - start))  # past the head deadline
            still_open = [c for c in idle + slow if not closed_by_server(c)]
            assert not still_open, f"{len(still_open)} of {len(idle) + len(slow)} connections are still open"
            assert httpx.get(f"{base}/health", timeout=5).status_code == 200
        finally:
            stop.set()
            thread.join(5)
            for conn in idle + slow:
                conn.close()


def test_a_slow_upload_body_is_cut_off_at_its_deadline(indexed, encoder):
    settings = indexed.model_copy(update={"request_head_timeout": 2.0, "request_body_timeout": 2.0})
    with serving(create_app(settings, SearchEngine(settings, encoder=encoder))) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"POST /v1/images/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
                         b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")
            start = time.time()
            answer = b""
            conn.settimeout(0.5)
            while time.time() - start < 10:
                try:
                    conn.sendall(b"x")
                    chunk = conn.recv(4096)
                except TimeoutError:
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    break
                if not chunk:
                    break
                answer += chunk
            assert time.time() - start < 6, "the trickling upload was never cut off"
