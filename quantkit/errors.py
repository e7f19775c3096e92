"""Errors that reach the user as one readable line."""

from __future__ import annotations

__all__ = ["QuantkitError", "RecipeError", "describe_os_error"]


class QuantkitError(Exception):
    """Bad input or an unrecoverable condition the user can fix; the CLI prints it without a traceback."""


class RecipeError(QuantkitError):
    """A recipe that does not validate."""


def describe_os_error(e: OSError) -> str:
    """``No space left on device: /path/file`` (the reason, then every file involved)."""
    reason = e.strerror or str(e) or type(e).__name__
    files = [f for f in (e.filename, e.filename2) if f is not None]
    return f"{reason}: {' -> '.join(map(str, files))}" if files else reason
