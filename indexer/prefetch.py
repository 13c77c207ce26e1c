"""Overlap image decoding with encoding.

Decoding and resizing (PIL releases the GIL) run on a small thread pool that stays a
couple of batches ahead of the encoder, so the model never waits for JPEG decoding.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetched_batches(items: Sequence[T], load: Callable[[T], R], batch_size: int,
                       threads: int = 2, ahead: int = 2) -> Iterator[list[tuple[T, R | Exception]]]:
    """Yield batches of (item, load(item) or the exception it raised), in input order."""
    def load_batch(batch: Sequence[T]) -> list[tuple[T, R | Exception]]:
        return list(zip(batch, pool.map(_catching(load), batch)))

    batches: Iterable[Sequence[T]] = (items[i:i + batch_size] for i in range(0, len(items), batch_size))
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool, ThreadPoolExecutor(max_workers=1) as driver:
        pending: deque[Future] = deque()
        for batch in batches:
            pending.append(driver.submit(load_batch, batch))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _catching(load: Callable[[T], R]) -> Callable[[T], R | Exception]:
    def wrapped(item: T) -> R | Exception:
        try:
            return load(item)
        except Exception as err:  # reported per item by the caller, never stops the batch
            return err
    return wrapped
