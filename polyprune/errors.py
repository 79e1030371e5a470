"""Errors the command line turns into one line on stderr and exit code 2."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad user input: a value that is not allowed, with what is allowed.

    The message is one line meant for a person; the CLI prints it and exits with code 2.
    """
