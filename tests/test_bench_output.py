"""bench/output.py: the one way benchmark scripts write their result JSON and print their tables."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.output import markdown_table, write_result  # noqa: E402


def test_write_result_creates_folders_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "a" / "b" / "result.json"
    assert write_result(path, {"rows": [1, 2]}) == path
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    write_result(path, {"rows": [3]})
    assert json.loads(path.read_text()) == {"rows": [3]}

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        write_result(path, {"rows": Unserialisable()})
    assert json.loads(path.read_text()) == {"rows": [3]}  # the last complete result stays
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]


def test_markdown_table_has_one_header_a_separator_and_checked_rows():
    assert markdown_table(("a", "b"), [(1, "x"), (2.5, None)]).splitlines() == [
        "| a | b |", "|---|---|", "| 1 | x |", "| 2.5 | None |"]
    with pytest.raises(ValueError, match="3 cells under 2 headers"):
        markdown_table(("a", "b"), [(1, 2, 3)])


def test_every_benchmark_writes_its_result_through_write_result():
    writers = [path.name for path in sorted((ROOT / "bench").glob("*.py"))
               if "write_text(json.dumps" in path.read_text()]
    assert writers == []
