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
from crossmodal.indexer.attributes import Selection
from crossmodal.indexer.hubness import Penalties
from crossmodal.indexer.store import Store

ExactLookup = Callable[[list[int]], dict[int, np.ndarray]]  # ids -> their exact vectors (absent: unknown)


def exact_lookup(files: faiss_index.ExactVectors | None, store: Store, model: str, kind: str) -> ExactLookup:
    """A lossy index's exact vectors: the build's files, or the database for builds made before them."""
    return files.get if files is not None else partial(store.vectors_by_id, model, kind)


def ranked(index: faiss.Index, index_type: str, queries: np.ndarray, depth: int, exact: ExactLookup | None,
           penalties: Penalties | None = None, timings: dict[str, float] | None = None,
           selection: Selection | None = None) -> list[list[tuple[int, float]]]:
    """For each query row, the top `depth` (id, score), best first, among the `selection` where one
    is given (a filter); `timings` gets the seconds spent in "faiss" and in "rerank" (the service's metrics)."""
    rerank = faiss_index.rerank_depth(index_type)
    candidates = max(depth, rerank, hubness.CANDIDATES if penalties is not None else 0)
    start = time.perf_counter()
    if selection is None:
        scores, ids = faiss_index.search(index, queries, candidates)
    else:
        scores, ids = faiss_index.search_selected(index, queries, candidates, selection)
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


def fusion_depth(settings) -> int:
    """How deep each ranking goes into a fusion: the service's deepest page, so every page of a hybrid
    query is cut from one fused list (and `eval` fuses exactly as the service does)."""
    return settings.max_offset + settings.max_k


RRF_K = 60  # reciprocal-rank fusion's constant (Cormack et al. 2009): a rank's weight is 1 / (RRF_K + rank)


def fused(rankings: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion: each id scores the sum of 1 / (RRF_K + its rank) over the rankings it is in
    (ranks from 1); best first, ties by id. Scores of different kinds (cosine, BM25) need no scaling."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, (item, _) in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


SCALE_QUERIES = 512  # typical queries whose best scores describe "a good match" in a collection


def score_scale(index: faiss.Index, index_type: str, queries: np.ndarray, exact: ExactLookup | None,
                penalties: Penalties | None) -> dict[str, float]:
    """What a best match scores in this collection, for typical text queries (the hubness bank's texts):
    the median best score, and the 10th percentile under which a query's best match is weak. Scores are
    model- and collection-specific (crossmodal-lite's, hubness-corrected, run from about -0.1 to 0.3), so
    a raw score says little to a person; these two put it on a scale (issue 20 item 9)."""
    sample = queries[np.random.default_rng(0).permutation(len(queries))[:SCALE_QUERIES]]
    best = [found[0][1] for found in ranked(index, index_type, sample, 1, exact, penalties) if found]
    if not best:
        return {}
    return {"typical_best": float(np.median(best)), "weak_below": float(np.percentile(best, 10))}
