"""Batched loading, inline (CPU builds) and on threads ahead of the consumer (GPU builds)."""
from __future__ import annotations

import pytest

from crossmodal.indexer.prefetch import prefetched_batches


def load(x: int) -> int:
    if x == 3:
        raise ValueError("bad item")
    return x * 10


@pytest.mark.parametrize("threads", [0, 2])
def test_batches_keep_order_and_turn_failures_into_values(threads):
    batches = list(prefetched_batches(list(range(7)), load, 3, threads=threads))
    assert [len(b) for b in batches] == [3, 3, 1]
    flat = [pair for batch in batches for pair in batch]
    assert [item for item, _ in flat] == list(range(7))
    assert [r for _, r in flat if not isinstance(r, Exception)] == [0, 10, 20, 40, 50, 60]
    assert isinstance(flat[3][1], ValueError) and str(flat[3][1]) == "bad item"


def test_inline_loading_reads_each_batch_ahead_of_loading_it():
    events = []
    batches = prefetched_batches(list(range(5)), lambda x: events.append(("load", x)), 2, threads=0,
                                 read=lambda batch: events.append(("read", list(batch))))
    for _ in batches:
        events.append(("model",))
    assert events == [("read", [2, 3]), ("load", 0), ("load", 1), ("model",),
                      ("read", [4]), ("load", 2), ("load", 3), ("model",),
                      ("read", []), ("load", 4), ("model",)]

