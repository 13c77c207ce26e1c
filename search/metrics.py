"""The service's Prometheus metrics (`GET /metrics`), in a registry of its own per app.

Labels carry route templates (`/v1/images/{image_id}`), never paths or query text, so the
endpoint needs no token.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Histogram("crossmodal_http_request_duration_seconds", "HTTP requests by route and status",
                                  ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.text_batch = Histogram("crossmodal_text_encoder_batch_size", "Queries encoded in one text-tower pass",
                                    buckets=(1, 2, 4, 8, 16, 32), registry=r)
        self.text_wait = Histogram("crossmodal_text_encoder_queue_wait_seconds",
                                   "Time a text query waited for the text encoder", buckets=LATENCY_BUCKETS, registry=r)
        self.search_stage = Histogram("crossmodal_search_stage_seconds", "FAISS search and exact re-rank per query",
                                      ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.served_build = Gauge("crossmodal_served_build_id", "Id of the build being served", registry=r)
        self.index_vectors = Gauge("crossmodal_index_vectors", "Vectors in the served indexes", ["kind"], registry=r)
        self.swaps = Counter("crossmodal_build_swaps", "Builds swapped in while serving", registry=r)
        self.rebuilds = Counter("crossmodal_rebuilds", "Rebuild jobs finished, by outcome", ["outcome"], registry=r)
        self.rebuild_seconds = Histogram("crossmodal_rebuild_duration_seconds", "Rebuild jobs' durations",
                                         buckets=(1, 5, 15, 60, 300, 900, 3600, 14400), registry=r)
        self.rebuild_done = Gauge("crossmodal_rebuild_items_done", "Items done in the running rebuild's phase",
                                  ["phase"], registry=r)
        self.rebuild_total = Gauge("crossmodal_rebuild_items_total", "Items in the running rebuild's phase",
                                   ["phase"], registry=r)


class RequestMetrics:
    """ASGI middleware: each request's latency, labelled by its route's template and its status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status[0])).observe(time.perf_counter() - start)
