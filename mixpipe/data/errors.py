"""The one error type data preparation raises for bad input, so the CLI can print it plainly."""
from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad input or a missing / incomplete prepared dataset; the message says how to fix it."""
