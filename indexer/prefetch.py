"""Image decoding, overlapped with encoding where that pays.

With threads, decoding and resizing (PIL releases the GIL) run on a small pool that
stays a couple of batches ahead of the encoder, so a GPU never waits for JPEG decoding.
When the model runs on the CPU it already uses every core, and overlapping gains nothing
(measured: see builder.decode_threads), so batches are then loaded inline.
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
    """Yield batches of (item, load(item) or the exception it raised), in input order.

    threads=0 loads each batch inline, only when it is asked for (no overlap, no contention).
    """
    safe_load = _catching(load)
    if threads <= 0:
        for start in range(0, len(items), batch_size):
            yield [(item, safe_load(item)) for item in items[start:start + batch_size]]
        return

    def load_batch(batch: Sequence[T]) -> list[tuple[T, R | Exception]]:
        return list(zip(batch, pool.map(safe_load, batch)))

    batches: Iterable[Sequence[T]] = (items[i:i + batch_size] for i in range(0, len(items), batch_size))
    with ThreadPoolExecutor(max_workers=threads) as pool, ThreadPoolExecutor(max_workers=1) as driver:
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
