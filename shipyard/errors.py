"""User-facing errors.

A `ShipyardError` is a mistake the user can fix (a bad key, a malformed line,
a missing path). The CLI prints its message and exits 2 without a traceback;
anything else is a bug in shipyard and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ShipyardError(Exception):
    """An error in the user's input, with a message that says how to fix it."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or '' when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
