"""Crash-safe rebuilds: SIGKILL a real `crossmodal index` process at several points of its work.

After every kill the published index must still be served and consistent (`crossmodal
check`), and the next run must reuse the embeddings the killed runs committed.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable

from sqlalchemy import func, select
from typer.testing import CliRunner

from crossmodal.indexer.builder import IndexBuilder
from crossmodal.indexer.check import check_index
from crossmodal.cli import app
from crossmodal.indexer.faiss_index import build_dir_for
from crossmodal.indexer.store import Build, CaptionRow, Embedding, Store
from crossmodal.search.engine import SearchEngine
from tests.conftest import solid_image


def image_embeddings(store: Store) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(Embedding).where(Embedding.kind == "image"))


def newest_build(store: Store) -> int:
    with store.session() as s:
        return s.scalar(select(func.max(Build.id))) or 0


def run_and_kill(settings, collection, when: Callable[[], bool], timeout: float = 240) -> bool:
    """Start `crossmodal index`, SIGKILL it once `when()` holds; False if it finished first."""
    process = subprocess.Popen([sys.executable, "-m", "crossmodal.cli", "index", str(collection), "--index-dir",
                                str(settings.index_dir), "--device", "cpu", "--json"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while process.poll() is None and time.time() < deadline:
            if when():
                process.send_signal(signal.SIGKILL)
                process.wait(30)
                return True
            time.sleep(0.01)
        return False
    finally:
        if process.poll() is None:
            process.kill()


def add_images(collection, round_no: int, n: int) -> None:
    """n images whose contents differ from every other round's (equal contents are embedded once)."""
    for i in range(n):
        color = (7 * i % 256, (40 + 50 * round_no) % 256, 255 - 7 * i % 256)
        solid_image(color, size=(160, 120)).save(collection / f"r{round_no}-{i:02d}.png")


def test_sigkill_at_any_point_leaves_the_published_index_servable_and_the_next_run_resumes(
        settings, encoder, collection):
    first = IndexBuilder(settings, encoder=encoder).build(collection)
    store = Store(settings.resolved_database_url())
    base = image_embeddings(store)
    kill_points = {
        "while loading the model": lambda: newest_build(store) > first.build_id,
        "after some images were embedded": lambda: image_embeddings(store) >= base + 8,
        "after more images were embedded": lambda: image_embeddings(store) >= base + 40,
        "while writing the new index": lambda: build_dir_for(settings.index_dir, newest_build(store)).exists()
        and newest_build(store) > first.build_id,
    }
    killed_before_publish = 0
    for round_no, (name, when) in enumerate(kill_points.items()):
        add_images(collection, round_no, 24)
        before = store.published_build().id
        assert run_and_kill(settings, collection, when), f"the build finished before the kill point: {name}"
        served = SearchEngine(settings, encoder=encoder)
        killed_before_publish += served.snapshot.build.id == before
        assert served.snapshot.build.id >= before, name  # never an older or half-written build
        assert served.images_by_text("a man with a camera", k=1)[0].path == "camera.png", name
        report = check_index(settings)
        assert report.ok, (name, report.problems)
    assert killed_before_publish >= 3

    embedded_by_killed_runs = image_embeddings(store) - base
    assert embedded_by_killed_runs >= 40
    final = IndexBuilder(settings, encoder=encoder).build(collection)
    assert final.n_images == 18 + 4 * 24
    assert final.n_embedded <= 4 * 24 - embedded_by_killed_runs  # committed work was reused, not redone
    code = CliRunner().invoke(app, ["check", "--index-dir", str(settings.index_dir)])
    assert code.exit_code == 0 and "ok: build" in code.output and "interrupted" not in code.output


def text_embeddings(store: Store) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(Embedding).where(Embedding.kind == "text"))


def caption_rows(store: Store) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(CaptionRow))


def many_captions(collection, round_no: int, n: int = 3000) -> None:
    """Enough new captions that the captions phase takes seconds (texts are embedded 1,024 at a time)."""
    names = sorted(p.name for p in collection.glob("*.*") if p.suffix != ".tsv")
    with open(collection / "captions.tsv", "a") as captions:
        for i in range(n):
            thing = i * 7919 % 997
            captions.write(f"{names[i % len(names)]}\tround {round_no}, caption {i}: a photo of thing {thing}\n")


def test_check_passes_after_a_kill_in_any_phase_and_the_resume_passes_too(settings, encoder, collection):
    """Images, captions and indexing phases, killed at two points each: `check` accepts the
    published build every time (an interrupted build's rows are warnings, not problems)."""
    IndexBuilder(settings, encoder=encoder).build(collection)
    store = Store(settings.resolved_database_url())
    published_captions = store.published_build().n_captions
    phases = {
        "images, early": lambda s: image_embeddings(store) >= s["images"] + 4,
        "images, late": lambda s: image_embeddings(store) >= s["images"] + 40,
        "captions, rows written": lambda s: caption_rows(store) > published_captions + 100,
        "captions, some embedded": lambda s: text_embeddings(store) >= s["texts"] + 1024,
        "indexing": lambda s: newest_build(store) > s["build"]
        and build_dir_for(settings.index_dir, newest_build(store)).exists(),
    }
    for round_no, (phase, when) in enumerate(phases.items()):
        add_images(collection, 10 + round_no, 48)
        many_captions(collection, round_no)
        start = {"images": image_embeddings(store), "texts": text_embeddings(store), "build": newest_build(store)}
        assert run_and_kill(settings, collection, lambda: when(start)), f"finished before the kill point: {phase}"
        report = check_index(settings)
        assert report.ok, (phase, report.problems)
        published_captions = store.published_build().n_captions
    final = IndexBuilder(settings, encoder=encoder).build(collection)
    report = check_index(settings)
    assert report.ok and not report.problems, report.problems
    assert final.n_captions == caption_rows(store) and final.n_images == 18 + 5 * 48
