"""Errors the command line turns into one line on stderr and exit code 2."""

from __future__ import annotations

import re

__all__ = ["InputError", "cut", "one_line", "shorten"]

# A value echoed in an error is cut to this many characters: a 120,000-character --calib must
# not fill the terminal, and the start of it is enough to recognise it.
MAX_ECHO = 80
# one_line cuts quoted spans this long, in messages longer than _LONG_MESSAGE: a guess at
# what is a value (an apostrophe in the text also opens a "quote"), so kept for the extreme.
_LONG_QUOTE = 200
_LONG_MESSAGE = 500
_QUOTED = re.compile(rf"""'[^'\n]{{{_LONG_QUOTE},}}'|"[^"\n]{{{_LONG_QUOTE},}}\"""")


class InputError(ValueError):
    """Bad user input: a value that is not allowed, with what is allowed.

    The message is one line meant for a person; the CLI prints it and exits with code 2.
    """


def shorten(value: object, limit: int = MAX_ECHO) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters with its length
    said: ``'dededede...' (120000 characters)``."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    close = text[0] if text[0] in "'\"" else ""
    return f"{text[: limit - 4]}...{close}{size}"


def cut(text: str, limit: int = MAX_ECHO) -> str:
    """``text`` unquoted, cut to about ``limit`` characters with its length said."""
    return text if len(text) <= limit else f"{text[: limit - 3]}... ({len(text)} characters)"


def one_line(message: str, limit: int = MAX_ECHO) -> str:
    """``message`` as one line, long quoted values in a long message cut, and at most about
    1000 characters (the last safeguard before a message reaches the terminal: argparse and
    other libraries echo values whole)."""
    message = " ".join(message.split("\n")).replace("\r", " ")
    if len(message) <= _LONG_MESSAGE:
        return message

    def cut_quote(m: re.Match) -> str:
        q = m.group(0)
        return f"{q[: limit - 4]}...{q[0]} ({len(q) - 2} characters)"

    return cut(_QUOTED.sub(cut_quote, message), 1000)
