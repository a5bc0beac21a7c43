"""docs/RELIABILITY.md and the README's counts are generated from the catalogue rows (scripts/reliability_table.py):
they must be what the rows give today, and every row must say what it tries and what the code did before issue 10."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("reliability_table", ROOT / "scripts" / "reliability_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_catalogue_row_states_what_it_tries_and_its_status_before_issue_10(table):
    areas = table.collect()
    assert {a.test.split("::")[1] for a in areas} >= {"test_catalogue_core", "test_catalogue_training",
                                                       "test_catalogue_configs", "test_catalogue_cli",
                                                       "test_catalogue_senszo", "test_catalogue_serve"}
    table.check(areas)  # raises naming every row that lacks tries= or a known before= status


def test_docs_reliability_md_and_the_readme_counts_are_what_the_rows_give(table):
    areas = table.collect()
    actual = table.DOC.read_text() if table.DOC.exists() else ""
    assert actual == table.render(areas), "docs/RELIABILITY.md is out of date: run python scripts/reliability_table.py"
    assert table.README.read_text() == table.readme(areas), \
        "README.md's reliability counts are out of date: run python scripts/reliability_table.py"


def test_a_row_without_a_known_status_is_refused(table):
    from reliability import Case

    bad = table.Area("tests/x.py::test_catalogue_x", "X", "", [Case("x", lambda tmp: None, ValueError, (), tries="t",
                                                                    before="broken: it was")])
    with pytest.raises(SystemExit, match="before='broken: it was' must start with one of"):
        table.check([bad])
    counted = table.counts([Case("a", None, ValueError, (), before="silent, data loss: gone"),
                            Case("b", None, ValueError, (), before="silent"), Case("c", None, ValueError, (),
                                                                                   before="new")])
    assert counted == {"tried": 3, "clear": 0, "raw": 0, "silent": 2, "data loss": 1, "new": 1}


def test_the_readme_block_is_replaced_between_its_markers_only(table):
    area = table.Area("tests/x.py::test_catalogue_x", "X", "", [])
    text = f"# r\n\nbefore\n{table.README_BEGIN}\nold counts\n{table.README_END}\nafter\n"
    out = table.readme([area], text)
    assert out.startswith("# r\n\nbefore\n") and out.endswith(f"{table.README_END}\nafter\n")
    assert "old counts" not in out and "0 bad inputs tried" in out
    with pytest.raises(SystemExit, match="lacks the markers"):
        table.readme([area], "# no markers\n")
