"""Image embedding on a Ray cluster (`crossmodal index --ray auto|ADDRESS`), with Ray Data.

The builder's driver keeps the incremental scan and decides by content hash what is new,
exactly as in-process builds do; only those images go to Ray, as one streaming pipeline:

    rows (path, content hash)  ->  map_batches(decode_and_prepare)   CPU tasks: read, check the
                                                                      hash, decode, resize and crop
                               ->  map_batches(EncodeImages)          an actor pool, the model loaded
                                                                      once per actor (1 GPU each
                                                                      where the cluster has GPUs)
                               ->  iter_batches                       vectors streamed back to the
                                                                      driver, written in batches

Nothing is materialised whole: Ray Data keeps a bounded number of blocks in flight. A task
whose worker dies is retried by Ray, and an encoder actor is restarted; a driver killed
mid-run loses only the batches not yet written, and the next build resumes from the database.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from crossmodal.indexer.collection import BadImage, decode_for_model, hash_bytes, read_regular_file
from crossmodal.indexer.encoder import ImagePreparer

log = logging.getLogger(__name__)

BATCH = 64  # images per Ray Data batch: the builder's transaction size


@dataclass(frozen=True)
class Embedded:
    """One image back from the cluster: its vector, or why it could not be embedded."""

    path: str  # absolute path, as sent
    key: str  # content hash
    width: int
    height: int
    vector: np.ndarray | None
    error: str


def connect(address: str) -> None:
    """Join the Ray cluster at `address`; "auto" joins the running one (`ray start`, RAY_ADDRESS)
    and starts a local one where none runs. Workers must be able to import crossmodal."""
    import ray

    if ray.is_initialized():
        return
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address == "auto":
        try:
            ray.init(address="auto", **quiet)
            return
        except ConnectionError:
            log.warning("no Ray cluster is running: starting a local one on this machine")
            ray.init(**quiet)
            return
    ray.init(address=address, **quiet)


def decode_and_prepare(batch: dict[str, np.ndarray], preparer: ImagePreparer, max_bytes: int,
                       max_pixels: int) -> dict[str, np.ndarray]:
    """A CPU task: read each file, check it is still the content the driver hashed, decode, prepare."""
    prepared, widths, heights, errors = [], [], [], []
    for path, key in zip(batch["path"], batch["key"]):
        pixels, error = None, ""
        try:
            data = read_regular_file(str(path), max_bytes)
            if hash_bytes(data) != key:
                raise BadImage("changed while it was being indexed; the next `crossmodal index` takes it")
            decoded, width, height = decode_for_model(data, max_pixels, preparer.decode_side)
            pixels = preparer(decoded).numpy()
            heights.append(height)
            widths.append(width)
        except (BadImage, OSError) as err:
            error = str(err) if isinstance(err, BadImage) else f"unreadable: {err.strerror or err}"
            heights.append(0)
            widths.append(0)
        prepared.append(pixels)
        errors.append(error)
    shape = next((p.shape for p in prepared if p is not None), None)
    dtype = next((p.dtype for p in prepared if p is not None), np.uint8)
    blank = np.zeros(shape or (0,), dtype=dtype)
    return {"path": batch["path"], "key": batch["key"], "width": np.array(widths), "height": np.array(heights),
            "error": np.array(errors, dtype=object),
            "pixels": np.stack([p if p is not None else blank for p in prepared])}


class EncodeImages:
    """An actor of the encoder pool: the model is loaded once, in the constructor."""

    def __init__(self, model: str, device: str, threads: int):
        import torch

        from crossmodal.indexer.encoder import keep_freed_memory, load_encoder

        if device == "cpu":  # Ray sets OMP_NUM_THREADS to the actor's 1 CPU; torch should use the node's cores
            torch.set_num_threads(threads or os.cpu_count() or 1)
        keep_freed_memory()
        self.encoder = load_encoder(model, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ok = np.array([not e for e in batch["error"]], dtype=bool)
        vectors = np.zeros((len(ok), self.encoder.dim), dtype=np.float32)
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            size = self.encoder.image_batch_size
            vectors[ok] = np.concatenate([self.encoder.encode_image_tensors(pixels[i:i + size])
                                          for i in range(0, len(pixels), size)])
        return {"path": batch["path"], "key": batch["key"], "width": batch["width"], "height": batch["height"],
                "error": batch["error"], "vector": vectors}


def encoder_pool() -> tuple[int, int]:
    """(actors, GPUs per actor): one actor per GPU where the cluster has GPUs, else one per node
    (each runs torch on its node's cores, and decode tasks take the CPUs left)."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return gpus, 1
    return max(1, sum(1 for node in ray.nodes() if node.get("Alive"))), 0


def embed_on_ray(items: list[tuple[str, str]], model: str, preparer: ImagePreparer, max_bytes: int,
                 max_pixels: int, threads_per_encoder: int = 0) -> Iterator[list[Embedded]]:
    """Embed (absolute path, content hash) items on the connected cluster; yields batches as they land."""
    import ray

    if not items:
        return
    ray.data.DataContext.get_current().enable_progress_bars = False  # the build shows its own
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    actors, gpus_each = encoder_pool()
    device = "cuda" if gpus_each else "cpu"
    # Blocks of at most BATCH rows: a block of BATCH + 3 would leave a batch of 3 behind each
    # full one, and a pass over 3 images costs about 5 % of a pass over 64.
    dataset = ray.data.from_items([{"path": path, "key": key} for path, key in items],
                                  override_num_blocks=-(-len(items) // BATCH))
    dataset = dataset.map_batches(decode_and_prepare, batch_size=BATCH, batch_format="numpy", num_cpus=1,
                                  fn_kwargs={"preparer": preparer, "max_bytes": max_bytes, "max_pixels": max_pixels})
    # Ray Data restarts a dead actor and retries its batches by default (max_restarts=-1).
    # enable_true_multi_threading: otherwise Ray Data calls the encoder on a thread of its own, and a
    # traced tower runs ~20 % slower on CPU off the main thread (57-64 against 72-75 images/s, measured
    # in plain Python too); one call runs at a time either way, and the encoder's lock serialises passes.
    pool = ray.data.ActorPoolStrategy(size=actors, enable_true_multi_threading=True)
    dataset = dataset.map_batches(EncodeImages, batch_size=BATCH, batch_format="numpy", compute=pool, num_cpus=1,
                                  num_gpus=gpus_each or None,
                                  fn_constructor_kwargs={"model": model, "device": device, "threads": threads_per_encoder})
    for batch in dataset.iter_batches(batch_size=BATCH, batch_format="numpy", prefetch_batches=1):
        yield [Embedded(str(path), str(key), int(w), int(h), None if error else vector, str(error))
               for path, key, w, h, error, vector in zip(batch["path"], batch["key"], batch["width"],
                                                          batch["height"], batch["error"], batch["vector"])]
