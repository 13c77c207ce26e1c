"""Shared fixtures: one real encoder per session, real sample photos, a fresh index dir per test."""
from __future__ import annotations

import contextlib
import os
import uuid
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from crossmodal.indexer.builder import IndexBuilder
from crossmodal.indexer.encoder import Encoder, load_encoder
from crossmodal.indexer.model_names import CURRENT_DEFAULT_MODEL
from crossmodal.indexer.sample_collection import write_sample_collection
from crossmodal.indexer.settings import Settings
from crossmodal.search.engine import SearchEngine
from crossmodal.search.server import server_config
from crossmodal.search.service import create_app
from tests.postgres_server import INSTALL_HINT, PostgresServer, find_bindir

FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "flickr8k"


@pytest.fixture(scope="session")
def encoder() -> Encoder:
    return load_encoder(CURRENT_DEFAULT_MODEL, device="cpu")


@pytest.fixture(scope="session")
def sample_source(tmp_path_factory) -> Path:
    return write_sample_collection(tmp_path_factory.mktemp("sample"))


@pytest.fixture
def collection(tmp_path, sample_source) -> Path:
    """A private copy of the sample collection plus two generated images, safe to modify."""
    root = tmp_path / "collection"
    root.mkdir()
    for item in sample_source.iterdir():
        (root / item.name).write_bytes(item.read_bytes())
    nested = root / "generated"
    nested.mkdir()
    solid_image((200, 30, 30)).save(nested / "red.png")
    solid_image((30, 30, 200)).save(nested / "blue.jpg")
    return root


def pytest_generate_tests(metafunc) -> None:
    """A module that sets `DATABASES = BOTH_DATABASES` runs each test once per database; others use SQLite."""
    if "database" in metafunc.fixturenames:
        metafunc.parametrize("database", getattr(metafunc.module, "DATABASES", ["sqlite"]), indirect=True)


BOTH_DATABASES = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session; skipped where none is installed, except under CI=true."""
    bindir = find_bindir()
    if bindir is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is not installed: {INSTALL_HINT}")
        pytest.skip(f"PostgreSQL is not installed: {INSTALL_HINT}")
    server = PostgresServer(bindir, free_port()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def database(request, tmp_path) -> Iterator[str]:
    """The metadata database URL: a SQLite file in the index dir, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index' / 'metadata.db'}"
        return
    server = request.getfixturevalue("postgres")
    name = f"test_{uuid.uuid4().hex[:12]}"
    url = server.create_database(name)
    try:
        yield url
    finally:
        server.drop_database(name)


@pytest.fixture
def settings(tmp_path, database) -> Settings:
    # FastAPI's TestClient sends `Host: testserver`. The text tower's ONNX export (1.5 s and 90 MB a
    # build) is left to the tests that look at it (test_onnx_text.py) and to the CLI's.
    return Settings(index_dir=tmp_path / "index", database_url=database, device="cpu", export_text_tower=False,
                    allowed_hosts=[*Settings().allowed_hosts, "testserver"])


def tiny_open_clip(folder: Path, arch: str, vision: dict | None = None, text: dict | None = None) -> str:
    """A tiny open_clip ViT CLIP registered as `arch`, seeded random weights saved in `folder`: its model
    name ("ARCH:/path.pt"), the form users give their own checkpoints. `vision`/`text` override the config."""
    import json

    import open_clip
    import torch

    config = {"embed_dim": 32,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16,
                             **(vision or {})},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                           **(text or {})}}
    (folder / f"{arch}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{arch}.json")
    torch.manual_seed(0)
    torch.save({"state_dict": open_clip.create_model(arch).state_dict()}, folder / f"{arch}.pt")
    return f"{arch}:{folder / f'{arch}.pt'}"


def solid_image(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> Image.Image:
    noise = np.random.default_rng(sum(color)).integers(0, 12, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.array(color) + noise, 0, 255).astype(np.uint8))


def caltech101_dev() -> Path:
    folder = FLICKR8K.parent / "caltech101-dev"
    if not (folder / "captions.tsv").is_file():
        pytest.skip(f"{folder} not present (../shared/datasets/caltech101-dev is only beside CI and dev checkouts)")
    return folder


def flickr8k_split(name: str) -> Path:
    split = FLICKR8K / name
    if not (split / "captions.tsv").is_file():
        pytest.skip(f"{split} not present (../shared/datasets/flickr8k is only beside CI and dev checkouts)")
    return split


@pytest.fixture
def indexed(settings, encoder, collection) -> Settings:
    """Settings whose index dir holds a published build of `collection`."""
    IndexBuilder(settings, encoder=encoder).build(collection)
    return settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answers(url: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout} s")


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """The app under a real uvicorn on 127.0.0.1 (a thread), until the block ends; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(server_config(app, app.state.service.settings, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(f"{base}/ready")
        yield base
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def service_process(index_dir: Path, **settings: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`crossmodal serve` as an operator starts it, in its own process; yields its base URL and the process.
    `settings` become CROSSMODAL_ environment variables (database_url="postgresql+psycopg://...")."""
    port = free_port()
    env = {**os.environ, "CROSSMODAL_DEVICE": "cpu", **{f"CROSSMODAL_{k.upper()}": v for k, v in settings.items()}}
    process = subprocess.Popen([sys.executable, "-m", "crossmodal.cli", "serve", "--index-dir", str(index_dir),
                                "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_answers(f"{base}/ready", timeout=120)
        yield base, process
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture
def live_server(indexed, encoder):
    """The real service over HTTP, for tests that need concurrent clients or a UI."""
    with serving(create_app(indexed, SearchEngine(indexed, encoder=encoder))) as base:
        yield base


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory) -> Iterator[str]:
    """A real local Ray cluster (head node, 2 CPUs) for the session; yields its address."""
    from tests import ray_cluster as cluster

    if cluster.ray_command() is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Ray is not installed: {cluster.INSTALL_HINT}")
        pytest.skip(f"Ray is not installed: {cluster.INSTALL_HINT}")
    address = cluster.start_head(free_port(), tmp_path_factory.mktemp("ray") / "auth_token")
    try:
        yield address
    finally:
        import ray

        ray.shutdown()
        cluster.stop()
