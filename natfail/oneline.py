"""Messages that stay on one line: for stderr, the journal and control replies,
where a library's multi-line error would break the "one clear line" rule."""

from __future__ import annotations


def one_line(text: str) -> str:
    """Join the non-empty lines of a tool's output with `` | ``."""
    return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def error_line(e: BaseException) -> str:
    """An exception as one line of words, or its type name when it says nothing."""
    return " ".join(str(e).split()) or type(e).__name__
