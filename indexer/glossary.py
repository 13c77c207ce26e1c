"""The glossary: words the heads never saw, described in words they know.

The default model's heads learned their words from 30,000 Flickr8k captions, and its text
tower (MiniLM) places rare nouns poorly: it puts "okapi" beside "abaya" and "abacus", "emu"
beside "Egyptian Mau". WordNet's definitions name what such a thing looks like or resembles
("okapi: similar to the giraffe but smaller with much shorter neck and stripe on the legs"),
in words both routes of the model do know. timm's wheel carries those definitions for the
21,843 ImageNet-21k synsets (`timm/data/_info`), so nothing is downloaded.

A text is glossed before it is tokenized: each word or phrase (up to three words) among the
entries the training chose (`choose`: rare to both the captions and the text tower, and not an
ImageNet-1k class name, which the label bridge knows) gets "PHRASE: DEFINITION." appended. Other
texts are unchanged, so Flickr-like captions and queries embed exactly as before.
"""
from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

MAX_PHRASE_WORDS = 3
HEADER = "# Entries glossed with their WordNet definition (timm/data/_info); written by `crossmodal train`.\n"
_WORD = re.compile(r"[a-z]+(?:[-'][a-z]+)*")


@dataclass(frozen=True)
class Glossary:
    definitions: dict[str, str]  # lower-case word or phrase -> its WordNet definition
    glossed: frozenset[str]  # the entries this model glosses (`choose`)

    def unknown_phrases(self, text: str) -> list[str]:
        """The phrases of `text` that get a definition, each once; the longest entry at a place wins."""
        words = _WORD.findall(text.lower())
        found: list[str] = []
        i = 0
        while i < len(words):
            for n in range(min(MAX_PHRASE_WORDS, len(words) - i), 0, -1):
                phrase = " ".join(words[i:i + n])
                if phrase in self.definitions:
                    if phrase in self.glossed and phrase not in found:
                        found.append(phrase)
                    i += n
                    break
            else:
                i += 1
        return found

    def expand(self, text: str) -> str:
        phrases = self.unknown_phrases(text)
        if not phrases:
            return text
        return text.rstrip(".") + ". " + " ".join(f"{p}: {self.definitions[p]}." for p in phrases)

    def expand_all(self, texts: list[str]) -> list[str]:
        return [self.expand(t) for t in texts]


def choose(definitions: dict[str, str], captions: list[str], tower_words: set[str], skip: list[str]) -> list[str]:
    """The entries to gloss: those with a word of three letters or more that neither the training
    captions used nor the text tower's tokenizer has whole (it splits "okapi" into "ok", "##api"),
    and that are not a name in `skip` (the label bridge's class names, which it knows).

    Words the tower has whole are left alone even when the captions never used them: on Flickr8k dev
    glossing them ("fork" as a digging tool, "d" as a vitamin) cost text->image R@1 0.2 and gained
    nothing on caltech101-dev.
    """
    known = {w for text in captions for w in _WORD.findall(text.lower())} | tower_words
    skip_set = {name.lower() for name in skip}
    return sorted(p for p in definitions if p not in skip_set and " ".join(_WORD.findall(p)) == p
                  and any(len(w) >= 3 and w not in known for w in p.split()))


def write(path: Path, glossed: list[str]) -> Glossary:
    """Write the model's glossary file (the chosen entries, one a line) and return its glossary.

    The definitions stay in timm's wheel; the file holds only what training chose, so loading it
    imports neither torch nor open_clip (the ONNX query path needs neither).
    """
    path.write_text(HEADER + "".join(f"{p}\n" for p in glossed), encoding="utf-8")
    return Glossary(wordnet_definitions(), frozenset(glossed))


@functools.lru_cache(maxsize=1)
def wordnet_definitions() -> dict[str, str]:
    """Lower-case lemma -> definition of the synset where it is the first lemma (else the first
    synset naming it): "seahorse" is the fish, not the walrus that some call a sea horse."""
    info = _info_dir()
    lemmas = _tsv(info / "imagenet_synset_to_lemma.txt")
    definitions = _tsv(info / "imagenet_synset_to_definition.txt")
    ranked: dict[str, tuple[int, str]] = {}
    for synset, names in lemmas.items():
        for position, name in enumerate(n.strip().lower() for n in names.split(",")):
            if name and synset in definitions and (position, synset) < ranked.get(name, (position + 1, "")):
                ranked[name] = (position, synset)
    return {name: definitions[synset] for name, (_, synset) in ranked.items()}


def class_definitions() -> list[str]:
    """The definitions of ImageNet-1k's classes, in the classifier's order (the synsets' sorted order)."""
    info = _info_dir()
    definitions = _tsv(info / "imagenet_synset_to_definition.txt")
    return [definitions[s] for s in (info / "imagenet_synsets.txt").read_text().split()]


def _info_dir() -> Path:
    spec = importlib.util.find_spec("timm")  # finds the wheel's files without importing timm (and torch)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the glossary reads its definitions from the timm package, which is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "_info"


def _tsv(path: Path) -> dict[str, str]:
    rows = (line.split("\t", 1) for line in path.read_text(encoding="utf-8").splitlines())
    return {row[0]: row[1].strip() for row in rows if len(row) == 2}


@functools.lru_cache(maxsize=4)
def load(glossary_file: Path) -> Glossary:
    """About 80 ms the first time in a process (two 21,843-line files), shared after."""
    lines = glossary_file.read_text(encoding="utf-8").splitlines()
    return Glossary(wordnet_definitions(), frozenset(line for line in lines if line and not line.startswith("#")))


def for_model(name: str) -> Glossary | None:
    """The glossary a model name's texts go through: its crossmodal-lite version's, if it has one."""
    from crossmodal.indexer.model_names import MODELS_DIR, default_model_version, read_config

    version = default_model_version(name)
    if version is None:
        return None
    file_name = read_config(version).get("crossmodal", {}).get("glossary")
    return load(MODELS_DIR / version / file_name) if file_name else None


class GlossingTokenizer:
    """An open_clip tokenizer that glosses texts first; everything else is the wrapped tokenizer's."""

    def __init__(self, tokenizer, glossary: Glossary):
        self.wrapped = tokenizer
        self.glossary = glossary

    def __call__(self, texts: str | list[str], *args, **kwargs):
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.wrapped(self.glossary.expand_all(texts), *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.wrapped, name)
