"""The one settings object: every knob, read from `CROSSMODAL_*` environment variables.

CLI options and the service override these per call; nothing else in the code reads
the environment directly, so this file is the complete list of what can be configured.
"""
from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


# Files shipped inside the package (crossmodal.data, the repository's data/ folder): the default
# model and the sample captions. On disk in a wheel's install and in an editable one alike.
DATA_DIR = Path(str(resources.files("crossmodal.data")))


def _default_index_dir() -> Path:
    """XDG data dir, so an index outlives the checkout it was built from."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "crossmodal"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CROSSMODAL_", env_file=None, extra="ignore")

    # Where builds, the metadata database and the thumbnail cache live.
    index_dir: Path = Field(default_factory=_default_index_dir)
    # Any SQLAlchemy URL; empty means a SQLite file inside index_dir.
    database_url: str = ""

    # Encoder: "crossmodal-lite" (offline default), "ARCH:PRETRAINED_TAG" (open_clip, downloads),
    # "ARCH:/path/to/checkpoint.pt", or open_clip's "local-dir:/path" / "hf-hub:org/repo"; any of them
    # with "+int8" or "+onnx" is a compressed CPU variant (indexer/onnx_towers.py).
    model: str = "crossmodal-lite"
    device: str = "auto"  # "auto" picks CUDA when present, else CPU
    batch_size: int = 64
    # Export the model's text tower to ONNX beside the index (indexer/onnx_text.py), so text queries
    # start without torch: a one-shot search in about a second instead of eight.
    export_text_tower: bool = True
    # Text queries through the exported tower with int8 weights ("int8", where one was written) or as
    # exported ("float32"). int8: a query costs 3.4 instead of 5.5 ms of CPU, Flickr8k Recall@1 and @10
    # within 0.2 points (README, "Fast start"). Indexed captions are always the model's own vectors.
    text_query_precision: Literal["int8", "float32"] = "int8"
    # Image decoding threads, overlapped with encoding; -1 = automatic: several beside a GPU; on
    # the CPU two for camera-sized photos (most files over 500 KB), none for small ones (the model
    # already uses every core: see builder.decode_threads).
    decode_threads: int = -1

    # Embed new images on a Ray cluster (indexer/ray_embedding.py): "" = in this process, "auto" =
    # the running cluster (or a local one), or the head's address ("HOST:6379", "ray://HOST:10001").
    ray_address: str = ""
    ray_encoder_threads: int = 0  # torch threads per CPU encoder actor; 0 = the node's cores

    # FAISS: an index-factory string forces the type; otherwise it is chosen by size.
    index_factory: str = ""
    exact_search_max: int = 50_000  # collections up to this size get exact (Flat) search
    use_gpu_faiss: bool = True  # only has an effect where a GPU FAISS build is installed
    # Past this many vectors an index is built without holding them all in memory: IVF-PQ trained on
    # a sample, vectors added in shards of ondisk_shard_vectors (Ray tasks with --ray), merged into
    # inverted lists on disk that search memory-maps; its exact re-rank vectors are float16.
    ondisk_min_vectors: int = 2_000_000
    ondisk_shard_vectors: int = 1_000_000
    # IVF lists a query probes; 0 = the build's choice (nlist/16, 16 to 64). More: better recall, slower.
    search_nprobe: int = 0
    # Subtract each item's hubness penalty in text->image and image->caption search, for models
    # that ship a hubness bank (see indexer/hubness.py). Helps on photos like the training data's.
    hubness_correction: bool = True

    # Limits on what the indexer will open.
    max_file_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 80_000_000  # checked before decoding (decompression bombs)
    max_captions_bytes: int = 512 * 1024 * 1024  # a captions file's size, checked before it is read

    # Search service.
    host: str = "127.0.0.1"
    port: int = 8000
    # Connections: seconds for a client to send a request's headers (also idle, before its first
    # request or after a response) and its body; at most this many open at once (then 503).
    request_head_timeout: float = 10.0
    request_body_timeout: float = 60.0
    max_connections: int = 512
    # Threads answering requests at once (FastAPI's pool for the plain-def endpoints); 0 = cores + 1.
    # More only add contention for the cores: searches are CPU work (search/service.py). Raise it where
    # requests mostly wait on a distant database.
    request_threads: int = Field(default=0, ge=0)
    max_upload_bytes: int = 20 * 1024 * 1024
    # Pixels an upload may decode to (after a JPEG's reduced-scale decoding): bounds its memory.
    max_upload_pixels: int = 16_000_000
    # Uploads and thumbnails decoded at once; more wait their turn (each may take ~100 MB briefly).
    max_concurrent_decodes: int = 2
    max_query_chars: int = 500
    # Seconds between looks for a build published elsewhere (by `crossmodal index`, or by another
    # replica sharing the database and index directory), which is then swapped in; 0 = never.
    reload_interval: float = 2.0
    max_k: int = 100
    max_offset: int = 1000
    thumbnail_size: int = 256
    cors_origins: list[str] = ["http://localhost:8501", "http://127.0.0.1:8501"]  # the UI's default origin
    # When set, rebuild endpoints need `Authorization: Bearer <token>`; set it whenever the
    # service listens beyond localhost. The UI holds none: its users type it into the rebuild form.
    admin_token: str = ""
    # Models a rebuild request may name, besides `model`: a request can otherwise make the
    # service download and run anything open_clip can load.
    allowed_models: list[str] = []

    # Host names (the Host header) the service and the UI answer to (the UI's own settings, where
    # it listens and the service it calls, are in ui/settings.py); others get 400. A web page
    # whose name resolves to 127.0.0.1 (DNS rebinding) otherwise drives both from a browser.
    # Add the names you reach them by when they listen beyond localhost ("*" accepts any).
    allowed_hosts: list[str] = ["localhost", "127.0.0.1", "::1"]

    def answered_hosts(self, *also_listening: str) -> list[str]:
        """allowed_hosts, plus the addresses the service (and the UI beside it) listen on, never a wildcard."""
        listening = [h for h in (self.host, *also_listening) if h not in ("0.0.0.0", "::", "")]
        return list(dict.fromkeys([*self.allowed_hosts, *listening]))

    def rebuild_models(self) -> list[str]:
        return [self.model, *(m for m in self.allowed_models if m != self.model)]

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.index_dir / 'metadata.db'}"

    def resolved_request_threads(self) -> int:
        return self.request_threads or (os.cpu_count() or 1) + 1

    @property
    def compressed_tower_dir(self) -> Path:
        """Where a compressed model variant's towers are exported once ("crossmodal-lite+int8": onnx_towers.py)."""
        return self.index_dir / "compressed_towers"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
