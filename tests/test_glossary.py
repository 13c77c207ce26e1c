"""The glossary (issue 19): words the training captions never used get their WordNet definition, from
timm's wheel; texts of known words are untouched, by the model and by the exported ONNX text tower."""
from __future__ import annotations

import numpy as np
import pytest

from crossmodal.indexer import glossary, onnx_text
from crossmodal.indexer.builder import IndexBuilder
from crossmodal.indexer.model_names import CURRENT_DEFAULT_MODEL


CAPTIONS = ["A dog runs on the grass.", "Two men ride horses near a red barn"]


@pytest.fixture(scope="module")
def words(tmp_path_factory) -> glossary.Glossary:
    path = tmp_path_factory.mktemp("glossary") / "glossary.txt"
    chosen = glossary.choose(glossary.wordnet_definitions(), CAPTIONS, {"fork"}, ["tabby cat"])
    return glossary.write(path, chosen)


def test_texts_of_known_words_are_left_as_they_are(words):
    for text in ["a dog", "Two men ride horses.", "", "   ", "!!!"]:
        assert words.expand(text) == text


def test_an_unknown_word_gets_its_definition_once(words):
    expanded = words.expand("an okapi beside an okapi.")
    assert expanded.startswith("an okapi beside an okapi. okapi: ")
    assert "giraffe" in expanded and expanded.count("okapi:") == 1


def test_phrases_senses_and_class_names(words):
    assert words.unknown_phrases("a Joshua tree in the desert") == ["joshua tree"]  # the longest entry wins
    assert "fish" in words.expand("a seahorse")  # the sense where it is the first name, not the walrus
    assert words.unknown_phrases("a tabby cat and a gerenuk") == ["gerenuk"]  # the bridge knows its classes' names
    assert words.unknown_phrases("a dog runs") == []
    assert words.unknown_phrases("a fork and a d") == []  # a word the text tower has whole; a single letter


def test_the_file_round_trips(tmp_path, words):
    path = tmp_path / "glossary.txt"
    assert glossary.write(path, sorted(words.glossed)) == words
    assert glossary.load(path) == words
    assert "okapi" in path.read_text().splitlines() and "barn" not in words.glossed


def test_the_default_model_glosses_and_its_onnx_tower_does_too(settings, encoder, collection):
    words = glossary.for_model(CURRENT_DEFAULT_MODEL)
    assert words is not None and glossary.for_model("ViT-B-32:laion2b_s34b_b79k") is None
    texts = ["a photo of an okapi.", "an emu on a seahorse", "a dog runs on the grass"]
    glossed = words.expand_all(texts)
    assert glossed[0] != texts[0] and glossed[2] == texts[2]
    tokens = encoder.tokenize(texts)
    assert tokens.tolist() == encoder.tokenizer.wrapped(glossed)[:, :tokens.shape[1]].tolist()  # glossed, then tokenized
    settings = settings.model_copy(update={"export_text_tower": True})
    IndexBuilder(settings, encoder=encoder).build(collection)
    exported = onnx_text.load(settings.index_dir, encoder.name)
    assert exported is not None and exported.glossary == words
    assert np.abs(exported.encode_texts(texts) - encoder.encode_texts(texts)).max() < 1e-5
