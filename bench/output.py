"""What every benchmark script ends with: its result JSON (written atomically, folders created) and a
markdown table on stdout, in one format (BENCHMARKS.md pastes these tables)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence


def write_result(path: str | Path, payload: dict) -> Path:
    """``payload`` as indented JSON at ``path``: a temporary file renamed into place, so an interrupted
    benchmark never leaves a half-written result that bench/report.py would read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(json.dumps(payload, indent=1))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A markdown table: one header row, the separator, one row per item (cells as given, str() of each)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [str(cell) for cell in row]
        if len(cells) != len(headers):
            raise ValueError(f"a row of {len(cells)} cells under {len(headers)} headers: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
