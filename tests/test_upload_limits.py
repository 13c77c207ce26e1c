"""What the worst uploads the limits let through cost a real `crossmodal serve` process.

Tiny files can claim huge or extreme images: a 7 KB PNG of 300,000x8 pixels, a JPEG of
80 megapixels, 16-bit and transparent images at the upload pixel limit. Each accepted one
may cost at most 300 MB of the service's peak memory (VmHWM) and at most a second of other
queries' time while several arrive at once.
"""
from __future__ import annotations

import io
import os
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from crossmodal.indexer.builder import IndexBuilder
from tests.conftest import service_process

MEMORY_BUDGET = 300 * 2**20
LATENCY_BUDGET = 1.0


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def worst_uploads() -> dict[str, bytes]:
    """Accepted by the default limits (80 MP in the header, 16 MP decoded, 20 MiB), each at an edge."""
    side = 3999  # 15.99 MP
    grey16 = Image.frombytes("I;16B", (side, side), np.full((side, side), 40_000, dtype=">u2").tobytes())
    return {
        "PNG 300,000x8 (7 KB)": encoded(Image.new("RGB", (300_000, 8), (200, 40, 40)), "PNG"),
        "PNG 8x300,000": encoded(Image.new("L", (8, 300_000), 90), "PNG"),
        "PNG RGBA 16 MP": encoded(Image.new("RGBA", (side, side), (10, 200, 10, 128)), "PNG"),
        "TIFF 16-bit big-endian grey 16 MP": encoded(grey16, "TIFF", compression="tiff_adobe_deflate"),
        "WebP 4 MP (counted 4x)": encoded(Image.new("RGB", (2_000, 1_999), (30, 30, 220)), "WEBP"),
        "WebP 16,000x250": encoded(Image.new("RGB", (16_000, 250), (30, 30, 220)), "WEBP"),
        "GIF 16 MP": encoded(Image.new("P", (side, side), 3), "GIF"),
        "JPEG 80 MP": encoded(Image.new("RGB", (8944, 8944), (120, 80, 40)), "JPEG", quality=50),
    }


def memory(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset_peak) of a process, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


def reset_peak(pid: int) -> int:
    """Start a new peak-memory measurement (Linux's clear_refs); returns the resident memory now."""
    with open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")
    return memory(pid, "VmRSS")


@pytest.fixture
def service(settings, encoder, collection):
    IndexBuilder(settings, encoder=encoder).build(collection)
    with service_process(settings.index_dir) as (base, process):
        yield base, process.pid, collection


def upload(http: httpx.Client, data: bytes) -> httpx.Response:
    return http.post("/v1/images/search", params={"k": 3}, files={"file": ("query", data, "image/png")})


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures peak memory through /proc (Linux)")
def test_worst_accepted_uploads_cost_bounded_memory_and_latency(service):
    base, pid, collection = service
    uploads = worst_uploads()
    with httpx.Client(base_url=base, timeout=120) as http:
        for _ in range(2):  # warm: the traced image tower, the text path, the thread pool
            assert upload(http, (collection / "horse.png").read_bytes()).status_code == 200
            assert http.get("/v1/images/search", params={"q": "a horse warming up"}).status_code == 200
        growth = {}
        for name, data in uploads.items():
            before = reset_peak(pid)
            response = upload(http, data)
            assert response.status_code == 200 and len(response.json()["results"]) == 3, (name, response.text)
            growth[name] = memory(pid, "VmHWM") - before
        print("\npeak memory growth (MB): " + ", ".join(f"{n} {g / 2**20:.0f}" for n, g in growth.items()))
        assert max(growth.values()) <= MEMORY_BUDGET, growth

        quiet = [query_seconds(http, f"a quiet query number {i}") for i in range(10)]
        latencies: list[float] = []
        stop = threading.Event()

        def attacker() -> None:
            with httpx.Client(base_url=base, timeout=300) as own:
                names = list(uploads)
                i = 0
                while not stop.is_set():
                    assert upload(own, uploads[names[i % len(names)]]).status_code == 200
                    i += 1

        before = reset_peak(pid)
        attackers = [threading.Thread(target=attacker) for _ in range(4)]
        for thread in attackers:
            thread.start()
        deadline = time.time() + 15
        i = 0
        while time.time() < deadline:
            latencies.append(query_seconds(http, f"a dog during the attack {i}"))
            i += 1
        stop.set()
        for thread in attackers:
            thread.join(120)
    print(f"text queries: quiet max {max(quiet) * 1000:.0f} ms; under 4 uploaders p50 "
          f"{sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
          f"({len(latencies)} queries)")
    assert max(latencies) <= max(quiet) + LATENCY_BUDGET
    under_attack = memory(pid, "VmHWM") - before
    print(f"peak memory growth with 4 uploaders: {under_attack / 2**20:.0f} MB")
    assert under_attack <= MEMORY_BUDGET * 2  # four at once, two decoding at a time


def query_seconds(http: httpx.Client, text: str) -> float:
    start = time.perf_counter()
    response = http.get("/v1/images/search", params={"q": text, "k": 5})
    assert response.status_code == 200, response.text
    return time.perf_counter() - start


def test_uploads_over_the_decoded_pixel_limit_are_refused_before_decoding(service):
    base, _, _ = service
    with httpx.Client(base_url=base, timeout=60) as http:
        response = upload(http, encoded(Image.new("RGB", (5000, 5000), (1, 2, 3)), "PNG"))
        assert response.status_code == 413 and "upload limit" in response.json()["detail"]
        response = upload(http, encoded(Image.new("RGB", (2000, 2001), (1, 2, 3)), "WEBP"))
        assert response.status_code == 413 and "counts 4x" in response.json()["detail"]
        response = upload(http, b"<svg xmlns='http://www.w3.org/2000/svg'/>")
        assert response.status_code == 415
