"""The database file is read ahead into the page cache for search, only where that is safe."""
from __future__ import annotations

import threading
import time

from crossmodal.indexer.store import Store


def test_prefetch_starts_for_a_sqlite_file_and_skips_what_it_cannot_or_should_not_read(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'metadata.db'}")
    assert store.prefetch_into_page_cache()
    deadline = time.time() + 10
    while any(t.name == "db-prefetch" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "db-prefetch" for t in threading.enumerate())  # it finished, without error
    assert not store.prefetch_into_page_cache(max_share_of_free_memory=0.0)  # too big for the memory share
    assert not Store("sqlite://").prefetch_into_page_cache()  # in memory: nothing to read
