"""The one exception type a user of soupkit should ever see.

A ``SoupkitError`` is bad input, named precisely (file, recipe key, tensor). The CLI prints its
message on one line and exits with code 2; anything else escaping is a bug in soupkit.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SoupkitError(ValueError):
    """A user-facing error: the message names the file, key or tensor at fault."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
