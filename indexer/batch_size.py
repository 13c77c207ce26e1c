"""The CPU batch size of each model, measured on the build's own photos instead of one constant.

On a CPU the best batch depends on the model: on this project's 2-core VM `crossmodal-lite-2` ran
fastest at 4 images a batch (67.9 images/s; 56.4 at 8), open_clip's ViT-B-32 at 16 (21.3; 19.0 at
4). A build with enough new photos tries each size on its first photos (their vectors are kept:
nothing is embedded twice), keeps the fastest, and remembers it in the index directory per model,
torch version and core count, so later builds start at the right size. GPUs keep their fixed
large batch.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

CANDIDATES = (1, 2, 4, 8, 16, 32)
DEFAULT = 4  # the best for crossmodal-lite, used until a size is measured
WARM_UP_CALLS = 2  # a traced model re-optimises for each new batch shape: these calls are not timed
TIMED_IMAGES = 16  # images timed per size, at least two batches
MIN_NEW_IMAGES = 500  # fewer new photos than this: not worth measuring, the default or the known size serves
FILE = "batch_sizes.json"


def machine_key(model: str) -> str:
    from importlib.metadata import version

    return f"{model} | torch {version('torch')} | {os.cpu_count()} cpus"


def known(index_dir: Path, model: str) -> int | None:
    """The size measured before for this model on this machine, if any."""
    try:
        return int(json.loads((index_dir / FILE).read_text())[machine_key(model)])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class BatchTuner:
    """Hands out batch sizes while measuring each candidate, then the fastest.

    `size()` says how many images the next batch should hold; `observe(n, seconds)` reports how that
    batch went. Each candidate gets WARM_UP_CALLS untimed batches, then at least TIMED_IMAGES timed
    images in two or more batches. Once a size runs at under 3/4 of the best rate so far, the larger
    ones are not tried (past its best, every model measured only got slower).
    """

    def __init__(self, index_dir: Path, model: str):
        self.index_dir, self.model = index_dir, model
        self.pending = list(CANDIDATES)
        self.calls, self.images, self.seconds = 0, 0, 0.0
        self.rates: dict[int, float] = {}

    @property
    def done(self) -> bool:
        return not self.pending

    def size(self) -> int:
        return self.pending[0] if self.pending else self.best()

    def best(self) -> int:
        return max(self.rates, key=self.rates.get) if self.rates else DEFAULT

    def observe(self, n: int, seconds: float) -> None:
        if not self.pending:
            return
        size = self.pending[0]
        self.calls += 1
        if n != size or self.calls <= WARM_UP_CALLS:
            return  # a short last batch of a transaction, or a warm-up call
        self.images += n
        self.seconds += seconds
        if self.images >= max(TIMED_IMAGES, 2 * size):
            self.rates[size] = self.images / self.seconds
            self.pending.pop(0)
            self.calls, self.images, self.seconds = 0, 0, 0.0
            if self.rates[size] < 0.75 * max(self.rates.values()):
                self.pending.clear()
            if not self.pending:
                self._remember()

    def _remember(self) -> None:
        best = self.best()
        log.info("CPU batch size for %s: %d (images/s by size: %s)", self.model, best,
                 ", ".join(f"{size}: {rate:.1f}" for size, rate in self.rates.items()))
        path = self.index_dir / FILE
        try:
            sizes = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            sizes = {}
        sizes[machine_key(self.model)] = best
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(sizes, indent=2))
        except OSError as err:
            log.warning("the measured batch size was not saved (%s)", err)
