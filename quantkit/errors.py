"""Errors that reach the user as one readable line."""

from __future__ import annotations

__all__ = ["QuantkitError", "RecipeError"]


class QuantkitError(Exception):
    """Bad input or an unrecoverable condition the user can fix; the CLI prints it without a traceback."""


class RecipeError(QuantkitError):
    """A recipe that does not validate."""
