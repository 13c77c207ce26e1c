"""Retrieval quality with the standard Flickr 1k protocol.

Text-to-image: a caption hits when its own image is in the top K of all images.
Image-to-text: an image hits when any of its captions is in the top K of all captions.
"""
from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def _rank_of_first_hit(scores: np.ndarray, is_hit: np.ndarray) -> np.ndarray:
    """0-based rank of the best-scored hit in each row (rows: queries)."""
    best_hit = np.where(is_hit, scores, -np.inf).max(axis=1, keepdims=True)
    return (scores > best_hit).sum(axis=1)


def recall_at_k(image_emb: np.ndarray, text_emb: np.ndarray, caption_image: np.ndarray,
                ks: tuple[int, ...] = KS, chunk: int = 2048) -> dict[str, dict[str, float]]:
    """Recall@K (in %) both ways; caption_image[i] is the row in image_emb of caption i."""
    caption_image = np.asarray(caption_image)
    t2i_ranks = []
    for start in range(0, len(text_emb), chunk):
        scores = text_emb[start:start + chunk] @ image_emb.T
        own = caption_image[start:start + chunk]
        is_hit = np.zeros_like(scores, dtype=bool)
        is_hit[np.arange(len(own)), own] = True
        t2i_ranks.append(_rank_of_first_hit(scores, is_hit))
    i2t_ranks = []
    for start in range(0, len(image_emb), chunk):
        rows = np.arange(start, min(start + chunk, len(image_emb)))
        scores = image_emb[rows] @ text_emb.T
        is_hit = caption_image[None, :] == rows[:, None]
        i2t_ranks.append(_rank_of_first_hit(scores, is_hit))
    return recall_from_ranks(np.concatenate(t2i_ranks), np.concatenate(i2t_ranks), ks)


def recall_from_ranks(t2i: np.ndarray, i2t: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, dict[str, float]]:
    """Ranks are 0-based positions of the first hit (any value >= max(ks) is a miss)."""
    return {
        "text_to_image": {f"R@{k}": float((t2i < k).mean() * 100) for k in ks},
        "image_to_text": {f"R@{k}": float((i2t < k).mean() * 100) for k in ks},
    }


def _first_hit(neighbours: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Per row, the position of the first neighbour in `wanted[row]` (a set per row); len if none."""
    hits = np.array([[n in w for n in row] for row, w in zip(neighbours, wanted)], dtype=bool)
    return np.where(hits.any(1), hits.argmax(1), neighbours.shape[1])


def _top_ids(index, index_type: str, queries: np.ndarray, exact, penalties) -> np.ndarray:
    """Ids of the top max(KS) per query, ranked exactly as the search service ranks them."""
    from crossmodal.indexer.ranking import ranked

    depth = max(KS)
    top = []
    for row in ranked(index, index_type, queries, depth, exact, penalties):
        best = [i for i, _ in row]
        top.append(best + [-1] * (depth - len(best)))
    return np.array(top).reshape(len(queries), depth)


def evaluate_published(settings) -> dict:
    """Recall of the published build, measured through its own FAISS indexes (what users get)."""

    from crossmodal.indexer import faiss_index
    from crossmodal.indexer.ranking import exact_lookup
    from crossmodal.indexer.store import Store, vectors_from_bytes

    store = Store(settings.resolved_database_url())
    build = store.published_build()
    if build is None:
        raise RuntimeError(f"no published index in {settings.index_dir}: run `crossmodal index FOLDER` first")
    opened = faiss_index.open_build(settings, build.id)
    manifest, images, captions = opened.manifest, opened.images, opened.captions
    image_ids = set(faiss_index.indexed_ids(images, opened.image_vectors).tolist())
    caption_ids = set(faiss_index.indexed_ids(captions, opened.caption_vectors).tolist())
    rows = [r for r in store.captioned_images() if r[0] in caption_ids and r[1] in image_ids]
    if not rows:
        raise ValueError("the published collection has no captions: eval needs a captioned collection")
    text_keys = [r[2] for r in rows]
    query_images = sorted({(r[1], r[3]) for r in rows})
    text_blobs = store.embeddings(manifest.model, "text", list(set(text_keys)))
    image_blobs = store.embeddings(manifest.model, "image", list({h for _, h in query_images}))
    text_vectors = vectors_from_bytes([text_blobs[k] for k in text_keys], manifest.dim)
    image_vectors = vectors_from_bytes([image_blobs[h] for _, h in query_images], manifest.dim)
    t2i = _top_ids(images, manifest.image_index_type, text_vectors,
                   exact_lookup(opened.image_vectors, store, manifest.model, "image"), opened.image_penalties)
    t2i_ranks = _first_hit(t2i, [{r[1]} for r in rows])
    captions_of: dict[int, set[int]] = {}
    for caption_id, image_id, _, _ in rows:
        captions_of.setdefault(image_id, set()).add(caption_id)
    i2t = _top_ids(captions, manifest.caption_index_type, image_vectors,
                   exact_lookup(opened.caption_vectors, store, manifest.model, "caption"), opened.caption_penalties)
    i2t_ranks = _first_hit(i2t, [captions_of[i] for i, _ in query_images])
    return {"model": manifest.model, "build_id": build.id, "n_images": len(query_images), "n_captions": len(rows),
            "recall": recall_from_ranks(t2i_ranks, i2t_ranks)}


def format_table(result: dict[str, dict[str, float]]) -> str:
    ks = list(next(iter(result.values())).keys())
    lines = [f"{'direction':<15}" + "".join(f"{k:>8}" for k in ks)]
    for direction, row in result.items():
        lines.append(f"{direction:<15}" + "".join(f"{row[k]:>8.1f}" for k in ks))
    return "\n".join(lines)
