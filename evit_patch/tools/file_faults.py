"""One line for a file fault that reaches a command line as an ``OSError``."""

from __future__ import annotations


def file_fault(error: OSError) -> str:
    """The file and the cause (``'runs/x/metrics.jsonl': No space left on device``) when the
    error names them, else its message; on one line."""
    text = f"{str(error.filename)!r}: {error.strerror}" if error.filename is not None and error.strerror else str(error)
    return " ".join(text.split())
