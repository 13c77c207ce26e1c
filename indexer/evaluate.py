"""Retrieval quality, measured through the published FAISS indexes exactly as the service ranks.

Two protocols:
- retrieval (Flickr 1k): text-to-image, a caption hits when its own image is in the top K of
  all images; image-to-text, an image hits when any of its captions is in the top K.
- zero-shot classes (a folder laid out like caltech101-dev: one caption per image, naming its
  class, so each class caption is shared by all its images): text-to-image precision@10 of each
  class caption, averaged over classes; image-to-caption top-1, the share of images whose best
  caption is their own class's (zero-shot classification accuracy).
Text queries are encoded as the service encodes them (with the int8 query tower by default: see
Settings.text_query_precision); captions and images are the vectors the build indexed.
"""
from __future__ import annotations

from collections.abc import Callable

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

    return _top_of(ranked(index, index_type, queries, max(KS), exact, penalties))


def _top_of(rankings: list[list[tuple[int, float]]]) -> np.ndarray:
    """The ids of each ranking's top max(KS), one row each, padded with -1."""
    depth = max(KS)
    top = [[i for i, _ in ranking[:depth]] for ranking in rankings]
    return np.array([row + [-1] * (depth - len(row)) for row in top], dtype=np.int64).reshape(len(rankings), depth)


def _published_rows(settings):
    """(store, opened build, captioned rows whose caption and image are both indexed)."""
    from crossmodal.indexer import faiss_index
    from crossmodal.indexer.store import Store

    store = Store(settings.resolved_database_url())
    build = store.published_build()
    if build is None:
        raise RuntimeError(f"no published index in {settings.index_dir}: run `crossmodal index FOLDER` first")
    opened = faiss_index.open_build(settings, build.id)
    image_ids = set(faiss_index.indexed_ids(opened.images, opened.image_vectors).tolist())
    caption_ids = set(faiss_index.indexed_ids(opened.captions, opened.caption_vectors).tolist())
    rows = [r for r in store.captioned_images() if r[0] in caption_ids and r[1] in image_ids]
    if not rows:
        raise ValueError("the published collection has no captions: eval needs a captioned collection")
    return store, opened, rows


def _stored_vectors(store, manifest, kind: str, keys: list[str]) -> np.ndarray:
    from crossmodal.indexer.store import vectors_from_bytes

    blobs = store.embeddings(manifest.model, kind, list(set(keys)))
    return vectors_from_bytes([blobs[k] for k in keys], manifest.dim)


def _text_queries(settings, store, manifest, keys: list[str],
                  texts: Callable[[], list[str]]) -> tuple[np.ndarray, str]:
    """(vectors, precision) of text queries as the service encodes them: through the int8 query tower where
    search uses one (onnx_text, Settings.text_query_precision), else the vectors the build stored (`keys`).
    `texts` gives the queries' texts, read only for the tower."""
    from crossmodal.indexer import onnx_text

    tower = None if settings.text_query_precision == "float32" else \
        onnx_text.load(settings.index_dir, manifest.model, settings.text_query_precision)
    if tower is None or tower.precision == "float32":
        return _stored_vectors(store, manifest, "text", keys), "float32"
    return tower.encode_texts(texts()), tower.precision


def _caption_texts(store, caption_ids: list[int]) -> list[str]:
    hits = store.caption_hits(caption_ids)
    return [hits[i][0] for i in caption_ids]


def _search_images(store, opened, queries: np.ndarray) -> np.ndarray:
    from crossmodal.indexer.ranking import exact_lookup

    exact = exact_lookup(opened.image_vectors, store, opened.manifest.model, "image")
    return _top_ids(opened.images, opened.manifest.image_index_type, queries, exact, opened.image_penalties)


def _search_captions(store, opened, queries: np.ndarray) -> np.ndarray:
    from crossmodal.indexer.ranking import exact_lookup

    exact = exact_lookup(opened.caption_vectors, store, opened.manifest.model, "caption")
    return _top_ids(opened.captions, opened.manifest.caption_index_type, queries, exact, opened.caption_penalties)


def evaluate_published(settings) -> dict:
    """Recall of the published build, measured through its own FAISS indexes (what users get)."""
    store, opened, rows = _published_rows(settings)
    manifest = opened.manifest
    query_images = sorted({(r[1], r[3]) for r in rows})
    text_vectors, query_precision = _text_queries(settings, store, manifest, [r[2] for r in rows],
                                                  lambda: _caption_texts(store, [r[0] for r in rows]))
    image_vectors = _stored_vectors(store, manifest, "image", [h for _, h in query_images])
    t2i_ranks = _first_hit(_search_images(store, opened, text_vectors), [{r[1]} for r in rows])
    captions_of: dict[int, set[int]] = {}
    for caption_id, image_id, _, _ in rows:
        captions_of.setdefault(image_id, set()).add(caption_id)
    i2t = _search_captions(store, opened, image_vectors)
    i2t_ranks = _first_hit(i2t, [captions_of[i] for i, _ in query_images])
    return {"model": manifest.model, "build_id": manifest.build_id, "text_queries": query_precision,
            "n_images": len(query_images), "n_captions": len(rows), "recall": recall_from_ranks(t2i_ranks, i2t_ranks)}


MODES = ("vector", "keyword", "hybrid")


def evaluate_modes(settings, chunk: int = 256) -> dict:
    """Text-to-image Recall@K of each search mode, ranked as the service ranks (ranking.fused over
    fusion_depth), in two settings of the keyword index: each query caption held out of it (the photo
    keeps its other captions: a captioned collection), and every caption of the query's photo held out
    (the photos searched for have no captions; the rest of the collection keeps theirs)."""
    from crossmodal.indexer import faiss_index
    from crossmodal.indexer.ranking import exact_lookup, fused, fusion_depth, ranked

    store, opened, rows = _published_rows(settings)
    manifest = opened.manifest
    texts = dict(zip([r[0] for r in rows], _caption_texts(store, [r[0] for r in rows])))
    captions_of: dict[int, list[int]] = {}
    for caption_id, image_id, _, _ in rows:
        captions_of.setdefault(image_id, []).append(caption_id)
    depth = fusion_depth(settings)
    indexed = set(faiss_index.indexed_ids(opened.images, opened.image_vectors).tolist())
    exact = exact_lookup(opened.image_vectors, store, manifest.model, "image")
    queries, query_precision = _text_queries(settings, store, manifest, [r[2] for r in rows],
                                             lambda: [texts[r[0]] for r in rows])
    vector_lists = []
    for start in range(0, len(rows), chunk):
        vector_lists += ranked(opened.images, manifest.image_index_type, queries[start:start + chunk], depth, exact,
                               opened.image_penalties)
    wanted = [{r[1]} for r in rows]
    result = {"model": manifest.model, "text_queries": query_precision, "n_images": len(captions_of),
              "n_captions": len(rows), "vector": _recall(vector_lists, wanted)}
    for setting, held_out in (("query_caption_held_out", lambda r: [r[0]]),
                              ("query_photo_uncaptioned", lambda r: captions_of[r[1]])):
        keyword_lists = [[(i, s) for i, s in store.keyword_search(texts[r[0]], depth, held_out(r)) if i in indexed]
                         for r in rows]
        result[setting] = {"keyword": _recall(keyword_lists, wanted),
                           "hybrid": _recall([fused([v, k]) for v, k in zip(vector_lists, keyword_lists)], wanted)}
    return result


def _recall(rankings: list[list[tuple[int, float]]], wanted: list[set[int]]) -> dict[str, float]:
    ranks = _first_hit(_top_of(rankings), wanted)
    return {f"R@{k}": float((ranks < k).mean() * 100) for k in KS}


def format_modes_table(result: dict) -> str:
    lines = [f"{'text -> image':<54}" + "".join(f"{'R@' + str(k):>8}" for k in KS)]
    rows = [("vector", result["vector"])]
    for setting, label in (("query_caption_held_out", "captioned (query's own caption held out)"),
                           ("query_photo_uncaptioned", "query photos uncaptioned")):
        rows += [(f"{mode}, {label}", result[setting][mode]) for mode in ("keyword", "hybrid")]
    for name, recall in rows:
        lines.append(f"{name:<54}" + "".join(f"{recall[f'R@{k}']:>8.1f}" for k in KS))
    return "\n".join(lines)


def evaluate_classes(settings) -> dict:
    """Zero-shot classification figures of the published build (see the module docstring)."""
    store, opened, rows = _published_rows(settings)
    manifest = opened.manifest
    keys_of: dict[int, set[str]] = {}
    for _, image_id, key, _ in rows:
        keys_of.setdefault(image_id, set()).add(key)
    mixed = sum(len(keys) > 1 for keys in keys_of.values())
    if mixed:
        raise ValueError(f"{mixed} images have more than one distinct caption: the zero-shot protocol needs one "
                         "caption per image naming its class (a folder laid out like caltech101-dev)")
    image_class = {image_id: next(iter(keys)) for image_id, keys in keys_of.items()}
    caption_class = {caption_id: key for caption_id, _, key, _ in rows}
    class_keys = sorted(set(image_class.values()))
    one_caption = {key: caption_id for caption_id, key in caption_class.items()}
    texts = {caption_class[cid]: text for cid, (text, *_) in store.caption_hits(list(one_caption.values())).items()}
    query_images = sorted({(r[1], r[3]) for r in rows})
    class_vectors, query_precision = _text_queries(settings, store, manifest, class_keys,
                                                   lambda: [texts[k] for k in class_keys])
    t2i = _search_images(store, opened, class_vectors)
    i2c = _search_captions(store, opened, _stored_vectors(store, manifest, "image", [h for _, h in query_images]))
    t2i_hits = np.array([[image_class.get(int(i)) == key for i in row] for row, key in zip(t2i, class_keys)])
    truth = [image_class[i] for i, _ in query_images]
    i2c_correct = np.array([caption_class.get(int(row[0])) == key for row, key in zip(i2c, truth)])
    return {"model": manifest.model, "build_id": manifest.build_id, "text_queries": query_precision,
            **class_metrics(t2i_hits, i2c_correct, [texts[k] for k in class_keys], [texts[k] for k in truth])}


def class_metrics(t2i_hits: np.ndarray, i2c_correct: np.ndarray, class_names: list[str],
                  image_classes: list[str]) -> dict:
    """The zero-shot figures from hits: t2i_hits[c, r] says whether class c's r-th image is of class c;
    i2c_correct[i] whether image i's top caption names its class. Per-class rows are worst first."""
    precision = t2i_hits.mean(axis=1)
    per_class = []
    for name, p in zip(class_names, precision):
        mine = np.array([c == name for c in image_classes])
        per_class.append({"class": name, "images": int(mine.sum()), "precision_at_10": float(p),
                          "top1": float(i2c_correct[mine].mean()) if mine.any() else 0.0})
    per_class.sort(key=lambda row: (row["precision_at_10"] + row["top1"], row["class"]))
    return {"n_images": len(image_classes), "n_classes": len(class_names),
            "text_to_image_precision_at_10": float(precision.mean()),
            "image_to_caption_top1": float(i2c_correct.mean()), "classes": per_class}


def format_class_table(result: dict) -> str:
    lines = [f"{'class':<40}{'images':>8}{'P@10':>8}{'top-1':>8}"]
    for row in result["classes"]:
        lines.append(f"{row['class'][:39]:<40}{row['images']:>8}{row['precision_at_10']:>8.2f}{row['top1']:>8.2f}")
    return "\n".join(lines)


def format_table(result: dict[str, dict[str, float]]) -> str:
    ks = list(next(iter(result.values())).keys())
    lines = [f"{'direction':<15}" + "".join(f"{k:>8}" for k in ks)]
    for direction, row in result.items():
        lines.append(f"{direction:<15}" + "".join(f"{row[k]:>8.1f}" for k in ks))
    return "\n".join(lines)
