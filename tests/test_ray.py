"""`crossmodal index --ray`: the same vectors as in-process, a killed worker retried, a killed driver resumed.

Every test runs on a real Ray cluster that the session starts (`ray start --head`, 2 CPUs).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from crossmodal.indexer.builder import IndexBuilder
from crossmodal.indexer.settings import Settings
from crossmodal.indexer.store import Embedding, Store
from tests.conftest import flickr8k_split


def noise_photos(folder, n: int, seed: int = 0) -> None:
    """Real JPEG files of random pixels: each distinct, none in the sample collection."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(folder / f"noise{i:04d}.jpg")


def stored_vectors(settings: Settings) -> dict[str, np.ndarray]:
    store = Store(settings.resolved_database_url())
    keys = store.image_keys()
    found = store.embeddings("crossmodal-lite-4", "image", list(set(keys.values())))
    store.close()
    return {key: np.frombuffer(blob, dtype=np.float32) for key, blob in found.items()}


def on_ray(settings: Settings, address: str) -> Settings:
    return settings.model_copy(update={"ray_address": address})


def test_ray_gives_the_in_process_vectors_skips_bad_files_and_reuses_by_content(
        ray_cluster, settings, encoder, collection, tmp_path):
    (collection / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    local = settings.model_copy(update={"index_dir": tmp_path / "local", "database_url": ""})
    expected = IndexBuilder(local, encoder=encoder).build(collection)
    report = IndexBuilder(on_ray(settings, ray_cluster), encoder=encoder).build(collection)
    assert report.n_images == expected.n_images == 18 and report.n_embedded == 18
    assert [s.path for s in report.skipped] == ["broken.jpg"] and report.skipped[0].reason == expected.skipped[0].reason
    ray_vectors, local_vectors = stored_vectors(settings), stored_vectors(local)
    assert ray_vectors.keys() == local_vectors.keys()
    assert max(np.abs(ray_vectors[k] - local_vectors[k]).max() for k in ray_vectors) <= 1e-5

    (collection / "horse.png").rename(collection / "renamed-horse.png")  # known content: not embedded again
    again = IndexBuilder(on_ray(settings, ray_cluster), encoder=encoder).build(collection)
    assert again.n_embedded == 0 and again.n_images == 18


def test_ray_vectors_equal_in_process_on_200_photos(ray_cluster, settings, encoder, tmp_path):
    source = flickr8k_split("dev")
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted((source / "images").iterdir())[:200]:
        shutil.copyfile(path, photos / path.name)
    local = settings.model_copy(update={"index_dir": tmp_path / "local", "database_url": ""})
    IndexBuilder(local, encoder=encoder).build(photos, captions_file=None)
    report = IndexBuilder(on_ray(settings, ray_cluster), encoder=encoder).build(photos)
    ray_vectors, local_vectors = stored_vectors(settings), stored_vectors(local)
    assert report.n_embedded == len(ray_vectors) == len(local_vectors) == 200
    difference = max(np.abs(ray_vectors[k] - local_vectors[k]).max() for k in local_vectors)
    print(f"200 Flickr8k photos: max abs difference {difference:.2e}")
    assert difference <= 1e-5


def encoder_actor_processes() -> list[int]:
    """Ray titles an actor's worker process after its class: ray::MapWorker(MapBatches(EncodeImages))."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"EncodeImages" in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def test_a_killed_ray_worker_is_retried_and_nothing_is_lost(ray_cluster, settings, encoder, tmp_path):
    import ray

    photos = tmp_path / "photos"
    noise_photos(photos, 400)
    killed, progress = [], []

    def kill_the_encoder_once_images_flow(p) -> None:
        progress.append(p)
        if p.phase == "images" and p.done >= 64 and not killed:
            for pid in encoder_actor_processes():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    report = IndexBuilder(on_ray(settings, ray_cluster), encoder=encoder).build(
        photos, progress=kill_the_encoder_once_images_flow)
    assert killed and ray.is_initialized()
    assert report.n_images == report.n_embedded == 400 and not report.skipped
    assert len(stored_vectors(settings)) == 400


def test_a_killed_driver_resumes_and_embeds_nothing_twice(ray_cluster, settings, tmp_path):
    photos = tmp_path / "photos"
    noise_photos(photos, 400, seed=1)
    env = {**os.environ, "CROSSMODAL_DEVICE": "cpu", "CROSSMODAL_DATABASE_URL": settings.resolved_database_url()}
    command = [sys.executable, "-m", "crossmodal.cli", "index", str(photos), "--index-dir", str(settings.index_dir),
               "--ray", ray_cluster]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = Store(settings.resolved_database_url())
    deadline = time.time() + 300
    while _count(store) < 128 and driver.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait(30)
    before = _count(store)
    assert 0 < before < 400, before
    resumed = IndexBuilder(on_ray(settings, ray_cluster)).build(photos)
    assert resumed.n_embedded == 400 - before and resumed.n_images == 400  # each photo embedded once
    assert _count(store) == 400


def _count(store: Store) -> int:
    from sqlalchemy import func, select

    with store.session() as s:
        return s.scalar(select(func.count()).select_from(Embedding).where(Embedding.kind == "image"))



def test_an_on_disk_index_adds_its_shards_in_ray_tasks(ray_cluster, settings, encoder, collection, tmp_path):
    from crossmodal.indexer.faiss_index import IMAGES_FILE, ONDISK_FILES, build_dir_for
    from crossmodal.search.engine import SearchEngine

    local = settings.model_copy(update={"index_dir": tmp_path / "local", "database_url": ""})
    IndexBuilder(local, encoder=encoder).build(collection)
    ondisk = on_ray(settings, ray_cluster).model_copy(update={
        "index_factory": "IVF2,PQ64x4", "ondisk_min_vectors": 10, "ondisk_shard_vectors": 7})
    report = IndexBuilder(ondisk, encoder=encoder).build(collection)
    assert (build_dir_for(ondisk.index_dir, report.build_id) / ONDISK_FILES[IMAGES_FILE]).is_file()
    served, expected = SearchEngine(ondisk, encoder=encoder), SearchEngine(local, encoder=encoder)
    for query in ("a man with a camera", "an animal"):
        assert [h.path for h in served.images_by_text(query, k=8)] == [h.path for h in expected.images_by_text(query, k=8)]
