"""How a published index ranks: the one place, used by search (the engine) and by `crossmodal eval`.

FAISS proposes candidates; a lossy index's candidates are re-scored with their exact vectors
(which also makes every returned score exact); the hubness penalties, where they apply, are
subtracted; the best `depth` remain. `eval` therefore measures what users get, on any index type.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import faiss
import numpy as np

from crossmodal.indexer import faiss_index, hubness
from crossmodal.indexer.hubness import Penalties
from crossmodal.indexer.store import Store

ExactLookup = Callable[[list[int]], dict[int, np.ndarray]]  # ids -> their exact vectors (absent: unknown)


def exact_lookup(files: faiss_index.ExactVectors | None, store: Store, model: str, kind: str) -> ExactLookup:
    """A lossy index's exact vectors: the build's files, or the database for builds made before them."""
    return files.get if files is not None else partial(store.vectors_by_id, model, kind)


def ranked(index: faiss.Index, index_type: str, queries: np.ndarray, depth: int, exact: ExactLookup | None,
           penalties: Penalties | None = None,
           timings: dict[str, float] | None = None) -> list[list[tuple[int, float]]]:
    """For each query row, the top `depth` (id, score), best first; `timings` gets the seconds
    spent in "faiss" and in "rerank" (the service's metrics)."""
    rerank = faiss_index.rerank_depth(index_type)
    candidates = max(depth, rerank, hubness.CANDIDATES if penalties is not None else 0)
    start = time.perf_counter()
    scores, ids = faiss_index.search(index, queries, candidates)
    searched = time.perf_counter()
    results = []
    for query, row_scores, row_ids in zip(np.asarray(queries, dtype=np.float32), scores, ids):
        found = [(int(i), float(s)) for s, i in zip(row_scores, row_ids) if i >= 0]
        if rerank and found and exact is not None:
            vectors = exact([i for i, _ in found])
            found = sorted(((i, float(vectors[i] @ query) if i in vectors else s) for i, s in found),
                           key=lambda item: -item[1])
        results.append(hubness.corrected(found, penalties)[:depth])
    if timings is not None:
        timings["faiss"], timings["rerank"] = searched - start, time.perf_counter() - searched
    return results
