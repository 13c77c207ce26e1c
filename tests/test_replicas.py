"""Replicas: `crossmodal serve` processes sharing one index directory and one PostgreSQL database.

A build published through any of them (or by the CLI) is served by every replica within
5 s, and no query fails meanwhile.
"""
from __future__ import annotations

import contextlib
import threading
import time

import httpx

from tests.conftest import service_process, solid_image

DATABASES = ["postgresql"]
SWAP_WITHIN_SECONDS = 5.0


def test_two_replicas_serve_a_rebuild_started_on_one_within_five_seconds(indexed, collection):
    for i in range(12):
        solid_image((20 * i, 240 - 20 * i, 120)).save(collection / f"replica{i}.png")
    url = indexed.resolved_database_url()
    with contextlib.ExitStack() as stack:
        replicas = [stack.enter_context(service_process(indexed.index_dir, database_url=url))[0] for _ in range(2)]
        first_build = httpx.get(f"{replicas[0]}/v1/stats").json()["build_id"]
        assert httpx.get(f"{replicas[1]}/v1/stats").json()["build_id"] == first_build
        failures, answered, stop = [], [0, 0], threading.Event()

        def query(replica: int) -> None:
            with httpx.Client(base_url=replicas[replica], timeout=30) as http:
                n = 0
                while not stop.is_set():
                    n += 1
                    response = http.get("/v1/images/search", params={"q": f"a photo number {n}", "k": 5})
                    if response.status_code != 200 or not response.json()["results"]:
                        failures.append((replica, response.status_code))
                    answered[replica] += 1

        clients = [threading.Thread(target=query, args=(i % 2,)) for i in range(4)]
        for client in clients:
            client.start()
        try:
            job = httpx.post(f"{replicas[0]}/v1/index/jobs", json={"collection": str(collection)}).json()
            deadline = time.time() + 300
            while (state := httpx.get(f"{replicas[1]}/v1/index/jobs/{job['id']}").json())["state"] not in (
                    "done", "failed") and time.time() < deadline:
                time.sleep(0.05)  # followed on the other replica: jobs live in the database
            published = time.time()
            assert state["state"] == "done", state
            served = {}
            while len(served) < 2 and time.time() < published + 30:
                for i, base in enumerate(replicas):
                    if i not in served and httpx.get(f"{base}/v1/stats").json()["build_id"] == state["build_id"]:
                        served[i] = time.time() - published
                time.sleep(0.05)
        finally:
            stop.set()
            for client in clients:
                client.join(60)
    print(f"replicas served build {state['build_id']} after {served} s; queries answered {answered}")
    assert state["build_id"] > first_build and len(served) == 2, served
    assert max(served.values()) <= SWAP_WITHIN_SECONDS, served
    assert not failures and min(answered) > 10, (failures, answered)
