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
    expected = [h.path for h in SearchEngine(exporting, encoder=encoder).images_by_text("a cat on a sofa", k=5)]
    code = ("import json, sys; from pathlib import Path; from crossmodal.indexer.settings import Settings; "
            "from crossmodal.search.engine import SearchEngine; "
            f"engine = SearchEngine(Settings(index_dir=Path({str(exporting.index_dir)!r}), database_url="
            f"{exporting.resolved_database_url()!r})); "
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
