"""FAISS indexes: type choice, id mapping, exactness, persistence."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from crossmodal.indexer import faiss_index


def unit_vectors(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_index_type_follows_size_unless_forced():
    assert faiss_index.choose_index_type(1_000, 512) == "Flat"
    assert faiss_index.choose_index_type(1_000_000, 512) == "IVF1024,PQ128"
    assert faiss_index.choose_index_type(100_000, 512) == "IVF256,PQ128"
    assert faiss_index.choose_index_type(10, 512, forced="HNSW32") == "HNSW32"
    assert faiss_index.default_search_params("IVF1024,PQ128") == {"nprobe": 64}
    assert faiss_index.default_search_params("IVF4096,PQ128") == {"nprobe": 64}  # capped: latency at 10M
    assert faiss_index.default_search_params("IVF256,PQ128") == {"nprobe": 16}
    assert faiss_index.ondisk_index_type(10_000_000, 512) == "IVF4096,PQ128"
    assert faiss_index.rerank_depth("IVF1024,PQ128") == 100 and faiss_index.rerank_depth("Flat") == 0


def test_flat_index_is_exact_and_returns_database_ids(tmp_path):
    vectors, ids = unit_vectors(500), np.arange(1000, 1500)
    index = faiss_index.build_index(vectors, ids, "Flat")
    queries = unit_vectors(5, seed=1)
    scores, found = faiss_index.search(index, queries, 10)
    expected = np.argsort(-(queries @ vectors.T), axis=1)[:, :10] + 1000
    np.testing.assert_array_equal(found, expected)
    faiss_index.write_index(index, tmp_path / "i.faiss")
    reloaded = faiss_index.read_index(tmp_path / "i.faiss", {})
    np.testing.assert_array_equal(faiss_index.search(reloaded, queries, 10)[1], expected)
    np.testing.assert_allclose(reloaded.reconstruct(1007), vectors[7], atol=1e-6)


@pytest.mark.parametrize("index_type", ["IVF16,SQ8", "HNSW16"])
def test_approximate_indexes_find_most_true_neighbours(index_type):
    vectors = unit_vectors(5000)
    index = faiss_index.build_index(vectors, np.arange(5000), index_type)
    faiss_index.apply_search_params(index, faiss_index.default_search_params(index_type))
    queries = vectors[:50] + 0.05 * unit_vectors(50, seed=3)
    _, found = faiss_index.search(index, queries, 10)
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert recall > 0.9


def test_empty_index_searches_to_nothing():
    index = faiss_index.build_index(np.zeros((0, 8), np.float32), np.zeros(0, np.int64), "Flat")
    scores, ids = faiss_index.search(index, unit_vectors(1, 8), 5)
    assert (ids < 0).all()


def test_manifest_round_trip(tmp_path):
    manifest = faiss_index.Manifest(3, "m", 8, "Flat", "IVF4,SQ8", 10, 20, {"nprobe": 4})
    manifest.write(tmp_path)
    assert faiss_index.Manifest.read(tmp_path) == manifest


@pytest.mark.parametrize("index_type", ["Flat", "IVF16,SQ8", "HNSW16"])
def test_stored_vectors_can_be_reconstructed_by_id_after_reload(tmp_path, index_type):
    """Similar-image and captions-of-an-image queries read an indexed vector back by its id."""
    vectors = unit_vectors(2000)
    index = faiss_index.build_index(vectors, np.arange(7, 2007), index_type)
    faiss_index.write_index(index, tmp_path / "i.faiss")
    reloaded = faiss_index.read_index(tmp_path / "i.faiss", {})
    np.testing.assert_allclose(reloaded.reconstruct(7 + 1234), vectors[1234], atol=0.02)


def test_search_parameters_apply_only_to_indexes_that_have_them(tmp_path):
    """One manifest's parameters serve an IVF image index and a Flat caption index alike."""
    vectors = unit_vectors(3000)
    ivf = faiss_index.build_index(vectors, np.arange(3000), "IVF16,SQ8")
    flat = faiss_index.build_index(vectors[:10], np.arange(10), "Flat")
    faiss_index.write_index(ivf, tmp_path / "ivf.faiss")
    faiss_index.write_index(flat, tmp_path / "flat.faiss")
    params = faiss_index.default_search_params("IVF16,SQ8")
    assert faiss_index.read_index(tmp_path / "flat.faiss", params).ntotal == 10
    assert faiss.extract_index_ivf(faiss_index.read_index(tmp_path / "ivf.faiss", params)).nprobe == params["nprobe"]


def test_single_query_search_leaves_the_threads_setting_alone():
    """Single queries run on one thread, but training and adding after them on the same
    thread must keep every core (this once made IVF builds in a serving process 2x slower)."""
    index = faiss.IndexFlatIP(32)
    index.add(unit_vectors(50))
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        scores, ids = faiss_index.search(index, index.reconstruct_n(0, 1), 3)
        assert ids[0][0] == 0 and faiss.omp_get_max_threads() == 2
        faiss_index.search(index, index.reconstruct_n(0, 4), 3)
        assert faiss.omp_get_max_threads() == 2
    finally:
        faiss.omp_set_num_threads(before)


def test_a_long_scan_is_split_over_the_cores_with_the_same_answer(tmp_path):
    """An IVF query that scans LONG_SCAN_CODES codes or more splits its lists over the cores
    (parallel_mode 1) and finds what one core finds; a short scan keeps one core a query."""
    n = 120_000
    vectors = unit_vectors(n, dim=16, seed=3)
    faiss_index.write_index(faiss_index.build_index(vectors, np.arange(n) + 7, "IVF4,Flat"), tmp_path / "ivf.faiss")
    short = faiss_index.read_index(tmp_path / "ivf.faiss", {"nprobe": 1})  # ~30,000 codes a query
    long = faiss_index.read_index(tmp_path / "ivf.faiss", {"nprobe": 4})  # 120,000
    assert n // 4 < faiss_index.LONG_SCAN_CODES <= n
    assert faiss.extract_index_ivf(short).parallel_mode == 0
    assert faiss.extract_index_ivf(long).parallel_mode == 1
    faiss_index.apply_search_params(short, {"nprobe": 4})
    faiss_index.apply_search_params(short, {"nprobe": 1})  # back to a short scan: back to one core
    assert faiss.extract_index_ivf(short).parallel_mode == 0
    split = [faiss_index.search(long, vectors[i:i + 1], 10) for i in range(20)]
    faiss.extract_index_ivf(long).parallel_mode = 0
    whole = [faiss_index.search(long, vectors[i:i + 1], 10) for i in range(20)]
    for (split_scores, split_ids), (scores, ids) in zip(split, whole):
        assert np.array_equal(split_ids, ids) and np.allclose(split_scores, scores)
    assert split[0][1][0][0] == 7


def test_a_lossy_index_is_written_with_its_exact_vectors_by_id(tmp_path):
    """Re-ranking looks vectors up by id: ids arrive in any order, and unknown ids are left out."""
    vectors, ids = unit_vectors(300), np.random.default_rng(2).permutation(np.arange(10, 610, 2))
    lossy = faiss_index.build_index(vectors, ids, "IVF4,SQ8")
    faiss_index.write_build_index(tmp_path, faiss_index.IMAGES_FILE, lossy, "IVF4,SQ8", ids, vectors)
    exact = faiss_index.ExactVectors.open(tmp_path, faiss_index.IMAGES_FILE)
    assert isinstance(exact.vectors, np.memmap)  # read from disk, not loaded whole
    wanted = [int(ids[5]), 11, int(ids[0]), 10_000, int(ids[299])]  # 11 and 10,000 are no ids
    found = exact.get(wanted)
    assert sorted(found) == sorted([int(ids[5]), int(ids[0]), int(ids[299])])
    for position in (5, 0, 299):
        np.testing.assert_array_equal(found[int(ids[position])], vectors[position])
    assert exact.get([]) == {}


def test_an_exact_index_needs_no_exact_vector_files(tmp_path):
    vectors, ids = unit_vectors(50), np.arange(50)
    flat = faiss_index.build_index(vectors, ids, "Flat")
    faiss_index.write_build_index(tmp_path, faiss_index.CAPTIONS_FILE, flat, "Flat", ids, vectors)
    assert sorted(p.name for p in tmp_path.iterdir()) == [faiss_index.CAPTIONS_FILE]
    assert faiss_index.ExactVectors.open(tmp_path, faiss_index.CAPTIONS_FILE) is None


def test_search_nprobe_overrides_the_builds_choice(tmp_path):
    from crossmodal.indexer.settings import Settings

    vectors = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    build_dir = faiss_index.build_dir_for(tmp_path, 1)
    build_dir.mkdir(parents=True)
    for name in (faiss_index.IMAGES_FILE, faiss_index.CAPTIONS_FILE):
        index = faiss_index.build_index(vectors, np.arange(300), "IVF8,Flat")
        faiss_index.write_build_index(build_dir, name, index, "IVF8,Flat", np.arange(300), vectors)
    faiss_index.Manifest(1, "m", 8, "IVF8,Flat", "IVF8,Flat", 300, 300, {"nprobe": 2}).write(build_dir)
    chosen = faiss_index.open_build(Settings(index_dir=tmp_path), 1)
    overridden = faiss_index.open_build(Settings(index_dir=tmp_path, search_nprobe=5), 1)
    assert faiss.extract_index_ivf(chosen.images).nprobe == 2
    assert faiss.extract_index_ivf(overridden.images).nprobe == 5
