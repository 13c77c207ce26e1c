"""What counts as a text query: the one rule the service and the command line both apply."""
from __future__ import annotations

import unicodedata


class InvalidQuery(ValueError):
    """The message says what is wrong with the query, for a 422 or a CLI error."""


VISIBLE = ("L", "N", "S", "P")  # letters, numbers, symbols, punctuation


def clean_query(text: str, max_chars: int) -> str:
    """The query without surrounding whitespace; refuses empty, over-long, control-character
    and invisible-only queries (zero-width spaces and joiners look empty and match at random)."""
    if len(text) > max_chars:
        raise InvalidQuery(f"the query must be at most {max_chars} characters long")
    text = text.strip()
    if not text:
        raise InvalidQuery("the query is empty")
    if any(unicodedata.category(ch) == "Cc" and ch not in "\t\n" for ch in text):
        raise InvalidQuery("the query contains control characters")
    if not any(unicodedata.category(ch)[0] in VISIBLE for ch in text):
        raise InvalidQuery("the query has no visible characters")
    return text
