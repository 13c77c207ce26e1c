"""`crossmodal serve` and other `crossmodal` commands on one index directory at once.

Real processes, as an operator runs them: the service, CLI searches and checks beside it,
two rebuilds through the API, a restart. Nothing may be lost: SQLite keeps its locks (and
so its write-ahead log) only while no code in the serving process opens the database file
outside SQLite (closing any descriptor of a file drops all of a process's POSIX locks on it).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx

from tests.conftest import service_process, solid_image


def cli(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crossmodal.cli", *args, "--index-dir", str(settings.index_dir)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "CROSSMODAL_DEVICE": "cpu"})


@contextmanager
def service(settings):
    with service_process(settings.index_dir) as (base, _):
        yield base


def rebuild(base: str, collection) -> int:
    job = httpx.post(f"{base}/v1/index/jobs", json={"collection": str(collection)}, timeout=30).json()
    deadline = time.time() + 300
    while (state := httpx.get(f"{base}/v1/index/jobs/{job['id']}", timeout=30).json())["state"] in ("queued",
                                                                                                   "running"):
        assert time.time() < deadline, "the rebuild did not finish"
        time.sleep(0.2)
    assert state["state"] == "done", state
    return state["build_id"]


def test_cli_commands_beside_the_service_lose_nothing(settings, collection):
    # Every database connection lives in a child process: one held here would keep SQLite's locks for them.
    assert cli(settings, "index", str(collection)).returncode == 0
    wal = settings.index_dir / "metadata.db-wal"
    with service(settings) as base:
        for round_no in range(2):
            assert wal.exists(), "the service's write-ahead log is gone"
            searched = cli(settings, "search", "a man with a camera", "-k", "1")
            assert searched.returncode == 0 and "camera.png" in searched.stdout, searched.stderr
            checked = cli(settings, "check")
            assert checked.returncode == 0, checked.stdout + checked.stderr
            assert wal.exists(), "a CLI command beside the service removed its write-ahead log"
            solid_image((40 + 90 * round_no, 200, 90), size=(96, 96)).save(collection / f"new{round_no}.png")
            last = rebuild(base, collection)
            served = httpx.get(f"{base}/v1/images/search", params={"q": "a horse", "k": 3}, timeout=30)
            assert served.status_code == 200, served.text
        assert httpx.get(f"{base}/v1/stats", timeout=30).json()["build_id"] == last
    checked = cli(settings, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with service(settings) as base:  # after a restart, the last rebuild is still what is served
        stats = httpx.get(f"{base}/v1/stats", timeout=30).json()
        assert stats["build_id"] == last and stats["images"] == 18 + 2


def test_the_port_opens_before_the_model_has_loaded(indexed):
    """`crossmodal serve` answers at once: /ready and searches say "loading" (503, with the reason)
    until the model and the index are in, then search. A UI or a load balancer sees a service
    that is loading, not one that is down."""
    from tests.conftest import free_port

    base = f"http://127.0.0.1:{(port := free_port())}"
    process = subprocess.Popen([sys.executable, "-m", "crossmodal.cli", "serve", "--index-dir", str(indexed.index_dir),
                                "--port", str(port)], env={**os.environ, "CROSSMODAL_DEVICE": "cpu"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = None
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                ready = httpx.get(f"{base}/ready", timeout=5)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            first = first or (ready, httpx.get(f"{base}/v1/images/search", params={"q": "a dog"}, timeout=5))
            if ready.status_code == 200:
                break
            time.sleep(0.05)
        first_ready, first_search = first
        assert first_ready.status_code == 503 and first_ready.json()["reason"] == "loading the model and the index"
        assert first_search.status_code == 503 and first_search.json()["detail"] == "loading the model and the index"
        assert ready.status_code == 200
        assert httpx.get(f"{base}/v1/images/search", params={"q": "a dog"}, timeout=30).json()["results"]
    finally:
        process.terminate()
        process.wait(30)
