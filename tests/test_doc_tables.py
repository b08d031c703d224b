"""The benchmark tables in the docs are the ones ``benchmarks/results/*.json`` give (``benchmarks.tables``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks import tables

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"


def test_the_committed_tables_match_the_results_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert tables.main(["--check"]) == 0, capsys.readouterr().err


def test_every_table_is_in_the_docs_and_every_results_file_is_used() -> None:
    text = "".join(doc.read_text() for doc in tables.marked_docs())
    for name in tables.TABLES:
        assert f"<!-- table:{name} -->" in text, f"table:{name} is rendered nowhere"
    used = {source for table in tables.TABLES.values() for source in table.sources}
    results = {path.name for path in (ROOT / "benchmarks" / "results").glob("*.json")}
    assert results <= used, f"results without a table: {sorted(results - used)}"


@pytest.fixture
def copy(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of docs/benchmarks.md and of the results folder, to change without touching the repo."""
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results, ignore=shutil.ignore_patterns("*.png"))
    doc = tmp_path / "benchmarks.md"
    shutil.copy(DOC, doc)
    return doc, results


def test_a_new_number_in_the_json_makes_its_table_stale(
    copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    doc, results = copy
    load = json.loads((results / "load.json").read_text())
    load["summary"]["latency_ms_p99"] = 123.4
    (results / "load.json").write_text(json.dumps(load))
    argv = ["--docs", str(doc), "--results", str(results)]

    assert tables.main(["--check", *argv]) == 1
    assert "stale tables: load" in capsys.readouterr().err
    assert "123.4" not in doc.read_text(), "--check must not write"

    assert tables.main(argv) == 0
    assert "| 45.2 / 123.4 / 81.5 ms |" in doc.read_text()
    assert tables.main(["--check", *argv]) == 0


def test_a_hand_edited_table_is_stale_and_regeneration_keeps_the_prose(copy: tuple[Path, Path]) -> None:
    doc, results = copy
    original = doc.read_text()
    doc.write_text(original.replace("| 4 | 117.4 |", "| 4 | 317.4 |"))
    argv = ["--docs", str(doc), "--results", str(results)]

    assert tables.main(["--check", *argv]) == 1
    assert tables.main(argv) == 0
    assert doc.read_text() == original


def test_a_marker_without_a_renderer_or_its_closing_marker_is_an_error(
    copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    doc, results = copy
    argv = ["--check", "--docs", str(doc), "--results", str(results)]
    doc.write_text("<!-- table:nonesuch -->\n| a |\n<!-- /table:nonesuch -->\n")
    assert tables.main(argv) == 2
    assert "table:nonesuch: no such table" in capsys.readouterr().err

    doc.write_text("<!-- table:load -->\n| a |\n")
    assert tables.main(argv) == 2
    assert "no closing <!-- /table:load --> marker" in capsys.readouterr().err


def test_a_missing_results_file_is_named(copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    doc, results = copy
    (results / "batching.json").unlink()
    assert tables.main(["--check", "--docs", str(doc), "--results", str(results)]) == 2
    assert "batching.json does not exist" in capsys.readouterr().err
