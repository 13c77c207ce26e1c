"""Image decoding, overlapped with encoding where that pays, and files read ahead.

With threads, decoding and resizing (PIL releases the GIL) run on a small pool that
stays a couple of batches ahead of the encoder, so a GPU never waits for JPEG decoding.
When the model runs on the CPU it already uses every core, and overlapping gains nothing
(measured: see builder.decode_threads), so batches are then loaded inline. Either way the
next batch's files are read ahead by the kernel, which costs no CPU time.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


READ_AHEAD_WINDOW = 8 * 1024 * 1024  # one advice reads ahead only a few MB, so large files go window by window


def read_ahead(paths: Iterable[Path]) -> None:
    """Ask the kernel to start reading these files into its page cache.

    On files not yet cached, a Flickr8k photo took 89 us to read against 10 us once cached;
    the advice costs 9 us. Where the OS has no posix_fadvise, or a file is gone, it does nothing.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the read-ahead
            try:
                for offset in range(0, max(os.fstat(fd).st_size, 1), READ_AHEAD_WINDOW):
                    os.posix_fadvise(fd, offset, READ_AHEAD_WINDOW, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)


def read_ahead_in_background(paths: Iterable[Path]) -> None:
    """read_ahead on a daemon thread: for files of gigabytes, where the advice itself takes a while."""
    threading.Thread(target=read_ahead, args=(list(paths),), name="read-ahead", daemon=True).start()


def read_ahead_in_child_process(paths: Iterable[Path]) -> subprocess.Popen:
    """read_ahead in a short-lived child process: for files that another library holds locked.

    On Linux, closing any descriptor of a file drops every POSIX lock this process holds on
    it. SQLite keeps its database's locks that way, so opening and closing `metadata.db`
    beside a live connection let another process's SQLite believe it was alone, and delete
    the write-ahead log under the service (lost builds). A child's descriptors are its own.
    """
    code = "import sys; from pathlib import Path; from crossmodal.indexer.prefetch import read_ahead; " \
           "read_ahead(Path(p) for p in sys.argv[1:])"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, paths)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)


def prefetched_batches(items: Sequence[T], load: Callable[[T], R], batch_size: int, threads: int = 2,
                       ahead: int = 2, read: Callable[[Sequence[T]], None] | None = None,
                       ) -> Iterator[list[tuple[T, R | Exception]]]:
    """Yield batches of (item, load(item) or the exception it raised), in input order.

    threads=0 loads each batch inline, only when it is asked for (no overlap, no contention);
    there `read(batch)`, when given, is called one batch before the batch is loaded (read_ahead),
    so the disk works while the model does. Load threads wait on the disk by themselves.
    """
    safe_load = _catching(load)
    if threads <= 0:
        for start in range(0, len(items), batch_size):
            if read is not None:
                read(items[start + batch_size:start + 2 * batch_size])
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
