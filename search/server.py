"""How the service is served: uvicorn with deadlines on every connection and a connection cap.

uvicorn closes an idle keep-alive connection after a request, but not one that never
sends a request, nor one that sends its headers a byte at a time: 1,100 such sockets made
every normal request time out. Here each connection must deliver a request's headers
within `request_head_timeout` seconds of opening (or of its previous response) and its
body within `request_body_timeout`; past `max_connections`, uvicorn answers 503. Per-client
limits and TLS belong to a reverse proxy in front (see SECURITY.md).
"""
from __future__ import annotations

import asyncio
import contextlib
import resource

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from crossmodal.indexer.settings import Settings


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections that are too slow to send a request."""

    head_timeout = 10.0
    body_timeout = 60.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm(self.head_timeout)

    def data_received(self, data: bytes) -> None:
        waiting_for_head = self.conn.their_state is h11.IDLE
        super().data_received(data)
        if waiting_for_head and self.conn.their_state is h11.SEND_BODY:
            self._arm(self.body_timeout)  # the head arrived; the body has its own deadline
        elif self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()  # the whole request is in

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm(self.head_timeout)  # the next request's head, on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        """Still waiting for this client's request (its head or its body): close the connection."""
        self._deadline = None
        if not self.transport.is_closing() and self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            self.transport.close()


def server_config(app, settings: Settings, port: int | None = None, log_level: str = "info") -> uvicorn.Config:
    """The uvicorn configuration `crossmodal serve` (and the tests) run the app with."""
    protocol = type("ServiceProtocol", (DeadlineH11Protocol,), {
        "head_timeout": settings.request_head_timeout, "body_timeout": settings.request_body_timeout})
    return uvicorn.Config(app, host=settings.host, port=settings.port if port is None else port, http=protocol,
                          limit_concurrency=settings.max_connections, timeout_keep_alive=5, log_level=log_level)


def raise_open_file_limit() -> None:
    """Every connection is a file descriptor: take the hard limit, so the cap, not EMFILE, decides."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
