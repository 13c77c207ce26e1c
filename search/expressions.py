"""Query expressions: several weighted text or image terms, and relevance feedback, combined
into one query vector in the shared embedding space.

The syntax, the same in the CLI, the API's `q` and the UI:

    beach +2:sunset -people          "beach", "sunset" weighted 2, "people" weighted -1
    a dog on the grass -leash        a term runs until the next one starts
    image:42 -0.5:image:7 +"snow"    indexed images by id (from a search result); quotes group words

A term starts at the beginning of the query or at a word beginning with `+` or `-` (a hyphen
inside a word, as in "t-shirt", starts nothing). `+W:` / `-W:` give a weight W (at most
MAX_WEIGHT); a bare `+` is +1, a bare `-` is -1 (also as a word of its own: "rock - paper").
`image:ID` is an indexed image instead of text. A query with no such word is one text term,
exactly as typed, so plain queries mean what they always did.

Terms combine as the normalised weighted sum of their unit vectors (each term's vector is its
own, so a term's weight is its share of the direction). Relevance feedback ("more like these,
less like those") is Rocchio's update of that vector: q + 0.75 mean(more) - 0.25 mean(less).
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

import numpy as np

from crossmodal.search.queries import InvalidQuery, clean_query

MAX_WEIGHT = 10.0
MAX_TERMS = 16
MAX_FEEDBACK = 50  # image ids on each side of relevance feedback
FEEDBACK_MORE, FEEDBACK_LESS = 0.75, 0.25  # Rocchio's beta and gamma (alpha is 1)
_OPERATOR = re.compile(r"^([+-])(?:(\d+(?:\.\d+)?):)?(.*)$", re.S)
_IMAGE = re.compile(r"^image:(\d{1,18})$")


@dataclass(frozen=True)
class Term:
    """One text or indexed-image term and its weight (negative: away from it)."""

    weight: float
    text: str | None = None
    image_id: int | None = None

    def __post_init__(self) -> None:
        if (self.text is None) == (self.image_id is None):
            raise InvalidQuery("a term is either a text or an image id")
        if not self.weight or abs(self.weight) > MAX_WEIGHT:
            raise InvalidQuery(f"{self.describe()}: a weight must be non-zero and at most {MAX_WEIGHT:g} "
                               f"either way, not {self.weight:g}")

    def describe(self) -> str:
        return f"term {self.text!r}" if self.text is not None else f"term image:{self.image_id}"


def parse(expression: str, max_chars: int) -> list[Term]:
    """The terms of an expression (see the module docstring); InvalidQuery says which part is wrong."""
    expression = clean_query(expression, max_chars)
    if not any(word[0] in "+-" for word in expression.split()) and not _IMAGE.match(expression):
        return [Term(1.0, text=expression)]  # a plain query, exactly as typed (apostrophes and all)
    try:
        words = shlex.split(expression)
    except ValueError:  # an unpaired quote is text, not syntax
        words = expression.split()
    groups: list[tuple[float, list[str]]] = []
    for word in words:
        match = _OPERATOR.match(word)
        if match is None:
            if not groups:
                groups.append((1.0, []))
            groups[-1][1].append(word)
            continue
        sign, weight, rest = match.groups()
        groups.append(((float(weight) if weight else 1.0) * (-1 if sign == "-" else 1), [rest] if rest else []))
    if len(groups) > MAX_TERMS:
        raise InvalidQuery(f"at most {MAX_TERMS} terms, not {len(groups)}")
    return [_term(weight, words) for weight, words in groups]


def _term(weight: float, words: list[str]) -> Term:
    text = " ".join(words).strip()
    if not text:
        operator = ("+" if weight > 0 else "-") + ("" if abs(weight) == 1 else f"{abs(weight):g}:")
        raise InvalidQuery(f"'{operator}' is followed by nothing: give a text or image:ID after it")
    image = _IMAGE.match(text)
    if image:
        return Term(weight, image_id=int(image.group(1)))
    if text.startswith("image:"):
        raise InvalidQuery(f"{text!r}: an image term is image:ID, with the number of an indexed image")
    return Term(weight, text=text)


def combine(weighted: list[tuple[float, np.ndarray]], more: list[np.ndarray] = (),
            less: list[np.ndarray] = ()) -> np.ndarray:
    """The unit query vector: the weighted sum of the terms' unit vectors, then Rocchio feedback."""
    if not weighted and not len(more):
        raise InvalidQuery("the query is empty: give a term, or images to find more like")
    query = np.zeros_like(weighted[0][1] if weighted else more[0], dtype=np.float32)
    for weight, vector in weighted:
        query += weight * _unit(vector)
    if len(more):
        query += FEEDBACK_MORE * np.mean([_unit(v) for v in more], axis=0)
    if len(less):
        query -= FEEDBACK_LESS * np.mean([_unit(v) for v in less], axis=0)
    norm = float(np.linalg.norm(query))
    if norm < 1e-3:
        raise InvalidQuery("the terms cancel out: the query points nowhere; change a weight")
    return (query / norm).astype(np.float32)


def from_text(terms: list[Term]) -> bool:
    """Whether the query is a text's for the hubness correction: some text term pulls towards it.

    The correction penalises images that many *texts* are near (hubness.py); an expression with a
    positive text term is ranked as text is, a pure image expression as image-to-image (uncorrected).
    """
    return any(term.text is not None and term.weight > 0 for term in terms)


def _unit(vector: np.ndarray) -> np.ndarray:
    return np.asarray(vector, dtype=np.float32) / max(float(np.linalg.norm(vector)), 1e-12)
