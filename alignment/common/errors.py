"""Library errors as the one line a user reads."""

from __future__ import annotations

MAX_MESSAGE_CHARS = 1000  # some library errors list every module of a model


def first_line(error: BaseException) -> str:
    """The first line of an error's text (library errors often append pages of detail), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def one_line(error: BaseException) -> str:
    """The whole error text folded onto one line, cut at MAX_MESSAGE_CHARS."""
    message = " ".join(str(error).split()) or type(error).__name__
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    return message
