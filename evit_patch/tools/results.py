"""Where a benchmark leaves its results: ``<out>.md`` (the table a document quotes) and
``<out>.json`` (every measurement behind it), side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(out: Path, table: str, record: dict[str, Any]) -> None:
    """``table`` to ``<out>.md`` and ``record`` to ``<out>.json``, creating the folder; a
    rerun of the same command replaces the files it wrote before."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
