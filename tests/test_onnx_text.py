"""The text tower exported to ONNX (issue 18): a search process answers text queries without torch, with
the model's own vectors; the indexer writes the export once per model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from crossmodal.indexer import onnx_text
from crossmodal.indexer.builder import IndexBuilder
from crossmodal.search.engine import SearchEngine

TEXTS = ["a", "a cat", "Two   DOGS &amp; a “cat”\tin the\nsnow", "café naïve résumé ÆØÅ", "😀 emoji and 中文 text",
         "very long " * 80, "", "   ", "x" * 600]


@pytest.fixture
def exporting(settings, encoder, collection):
    """An index whose build exported the text tower, as `crossmodal index` does."""
    settings = settings.model_copy(update={"export_text_tower": True})
    IndexBuilder(settings, encoder=encoder).build(collection)
    return settings


def test_the_export_tokenizes_and_encodes_as_the_model_does(exporting, encoder):
    assert onnx_text.exported(exporting.index_dir, encoder.name)
    exported = onnx_text.load(exporting.index_dir, encoder.name)
    assert exported is not None and exported.dim == encoder.dim
    for text in TEXTS:
        assert exported.tokenize([text]).tolist() == encoder.tokenize([text]).tolist(), text
    difference = np.abs(exported.encode_texts(TEXTS) - encoder.encode_texts(TEXTS)).max()
    assert difference < 1e-5, difference


def test_a_search_process_answers_text_queries_without_torch(exporting, encoder):
    """With the float32 export, whose vectors are the model's: int8 ones may swap near ties (tested below)."""
    expected = [h.path for h in SearchEngine(exporting, encoder=encoder).images_by_text("a cat on a sofa", k=5)]
    code = ("import json, sys; from pathlib import Path; from crossmodal.indexer.settings import Settings; "
            "from crossmodal.search.engine import SearchEngine; "
            f"engine = SearchEngine(Settings(index_dir=Path({str(exporting.index_dir)!r}), database_url="
            f"{exporting.resolved_database_url()!r}, text_query_precision='float32')); "
            "print(json.dumps([[h.path for h in engine.images_by_text('a cat on a sofa', k=5)], "
            "sorted(m for m in ('torch', 'open_clip', 'transformers') if m in sys.modules)]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    paths, imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert paths == expected and imported == []


def test_an_unchanged_re_run_exports_a_missing_tower_once(settings, encoder, collection, monkeypatch):
    IndexBuilder(settings, encoder=encoder).build(collection)  # export_text_tower off: none written
    assert not onnx_text.exported(settings.index_dir, encoder.name)
    on = settings.model_copy(update={"export_text_tower": True})
    assert IndexBuilder(on, encoder=encoder).build(collection).unchanged
    assert onnx_text.exported(settings.index_dir, encoder.name)
    import crossmodal.indexer.encoder as encoder_module

    monkeypatch.setattr(encoder_module, "load_encoder", lambda *a, **k: pytest.fail("the model was loaded"))
    assert IndexBuilder(on).build(collection).unchanged  # exported already: no model loaded


def test_a_tower_that_cannot_be_exported_is_left_to_the_model(settings, encoder, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no exporter here")

    monkeypatch.setattr("torch.onnx.export", broken)
    assert not onnx_text.export(encoder, settings.index_dir)
    assert not onnx_text.exported(settings.index_dir, encoder.name)
    assert not list((settings.index_dir / onnx_text.FOLDER).glob("*"))  # nothing half-written left


def _meta_file(index_dir):
    """KEY.json of the one exported tower (not KEY.tokenizer.json)."""
    return next((index_dir / onnx_text.FOLDER).glob("*[0-9a-f].json"))


QUERIES = ["a dog", "a cat on a sofa", "two dogs play in the snow beside a red fence", "a bowl of soup",
           "people sitting at a table in a restaurant", "sunset over the ocean"]


def test_the_int8_query_tower_is_written_checked_and_used_by_search(exporting, encoder):
    meta = json.loads(_meta_file(exporting.index_dir).read_text())
    assert meta["int8"]["least_cosine"] >= onnx_text.QUERY_INT8_AGREEMENT
    int8 = onnx_text.load(exporting.index_dir, encoder.name, "int8")
    float32 = onnx_text.load(exporting.index_dir, encoder.name, "float32")
    assert (int8.precision, float32.precision) == ("int8", "float32")
    close, exact = int8.encode_texts(QUERIES), float32.encode_texts(QUERIES)
    assert (close * exact).sum(1).min() >= 0.99 and np.abs(close - exact).max() > 1e-4  # quantized, and close
    # one int8 scale per pass: so each text is encoded alone, and its vector never depends on its neighbours
    alone = np.stack([int8.encode_texts([text])[0] for text in QUERIES])
    np.testing.assert_array_equal(alone, close)
    assert SearchEngine(exporting).text_encoder.precision == "int8"  # the default
    as_exported = exporting.model_copy(update={"text_query_precision": "float32"})
    assert SearchEngine(as_exported).text_encoder.precision == "float32"


def test_a_refused_int8_tower_leaves_float32_and_is_not_tried_again(settings, encoder, monkeypatch):
    monkeypatch.setattr(onnx_text, "QUERY_INT8_AGREEMENT", 1.01)  # no int8 tower can pass
    assert onnx_text.export(encoder, settings.index_dir)
    folder = settings.index_dir / onnx_text.FOLDER
    meta = json.loads(_meta_file(settings.index_dir).read_text())
    assert "stray from float32" in meta["int8"]["refused"]
    assert not list(folder.glob("*int8*")) and not list(folder.glob("*partial*"))
    assert onnx_text.load(settings.index_dir, encoder.name, "int8").precision == "float32"
    from crossmodal.indexer import onnx_towers

    monkeypatch.setattr(onnx_towers, "quantize_query_tower", lambda *a: pytest.fail("tried again"))
    onnx_text.quantize_queries(settings.index_dir, encoder.name)


def test_a_tower_exported_before_int8_gets_it_from_an_unchanged_re_run(exporting, encoder, collection, monkeypatch):
    folder = exporting.index_dir / onnx_text.FOLDER
    meta_file = _meta_file(exporting.index_dir)
    meta = json.loads(meta_file.read_text())
    (folder / meta.pop("int8")["file"]).unlink()
    meta_file.write_text(json.dumps(meta))  # as an index exported by the previous release
    import crossmodal.indexer.encoder as encoder_module

    monkeypatch.setattr(encoder_module, "load_encoder", lambda *a, **k: pytest.fail("the model was loaded"))
    assert IndexBuilder(exporting).build(collection).unchanged
    assert onnx_text.load(exporting.index_dir, encoder.name, "int8").precision == "int8"
