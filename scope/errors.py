"""One error type for everything a user can get wrong: the message names the input and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ScopeError(Exception):
    """A problem with the user's input. The CLI prints the message without a traceback."""


def closest(word: str, choices: Iterable[str], n: int = 5) -> list[str]:
    """The choices most like ``word``: close spellings first, then ones that share a prefix."""
    pool = list(choices)
    found = difflib.get_close_matches(word, pool, n=n, cutoff=0.5)
    if len(found) < n:
        stem = word[: max(4, len(word) // 2)]
        found += [c for c in pool if c.startswith(stem) and c not in found][: n - len(found)]
    return found
