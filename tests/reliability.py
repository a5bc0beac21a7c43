"""Shared helpers for the bad-input catalogue (docs/RELIABILITY.md): each case is a row of a parametrised test that
asserts the error type, that the message names the fix, and that nothing on disk changed."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest


@dataclass
class Case:
    """One bad input: `run(tmp_path)` must raise `error` with every `fragments` string in its message."""

    id: str
    run: Callable[[Path], object]
    error: type[BaseException]
    fragments: tuple[str, ...]
    setup: Callable[[Path], None] | None = None  # writes what must survive untouched (an adapter, a run dir)
    tries: str = ""  # the bad input in a few words, for docs/RELIABILITY.md
    before: str = ""  # before issue 10: "clear", "raw", "silent", "silent, data loss" or "new" [+ ": what happened"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with its sha256: equal snapshots mean nothing on disk changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def check_case(case: Case, tmp_path: Path) -> None:
    if case.setup is not None:
        case.setup(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(case.error) as info:
        case.run(tmp_path)
    message = str(info.value).lower()
    missing = [f for f in case.fragments if f.lower() not in message]
    assert not missing, f"{case.id}: message {str(info.value)!r} lacks {missing}"
    assert snapshot(tmp_path) == before, f"{case.id}: files on disk changed"


def cases_param(cases: list[Case]):
    return pytest.mark.parametrize("case", cases, ids=[c.id for c in cases])
