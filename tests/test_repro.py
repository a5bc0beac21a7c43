"""`subtune repro`: the verdict rule, the aggregation over seeds, the report's files, and one end-to-end claim run
(`subtune repro s2ft --quick --seeds 1`, shrunk further by SUBTUNE_REPRO_SMOKE=1 so it takes seconds)."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from click.testing import CliRunner

from subtune.core.config import ConfigError
from subtune.repro import (CLAIMS, OUTCOMES, Claim, ClaimResult, Verdict, aggregate, arm_values, get_claim,
                           mean_std, run_claim, seed_spread_verdict)
from subtune.repro import report
from subtune.repro.common import SMOKE, SMOKE_ENV, Setting, parity_verdict, pick_setting


# ------------------------------------------------------------------------------------------------ verdict rule

def test_seed_spread_verdict_outcomes():
    # means 10 vs 8, sample stds 1 and 1: difference 2 > 1
    assert seed_spread_verdict([9, 10, 11], [7, 8, 9])[0] == "reproduced"
    assert seed_spread_verdict([7, 8, 9], [9, 10, 11])[0] == "not reproduced"
    # difference 0.5 < spread 1
    assert seed_spread_verdict([9, 10, 11], [8.5, 9.5, 10.5])[0] == "inconclusive"
    # the spread is the LARGER of the two stds: 10 vs 8 with std 3 on one side is within it
    assert seed_spread_verdict([7, 10, 13], [7.9, 8, 8.1])[0] == "inconclusive"


def test_seed_spread_verdict_lower_is_better_flips_the_direction():
    assert seed_spread_verdict([0.1, 0.2, 0.3], [1.0, 1.1, 1.2], higher_is_better=False)[0] == "reproduced"
    assert seed_spread_verdict([0.1, 0.2, 0.3], [1.0, 1.1, 1.2], higher_is_better=True)[0] == "not reproduced"


def test_seed_spread_verdict_evidence_shows_means_and_stds():
    outcome, evidence = seed_spread_verdict([9, 10, 11], [7, 8, 9])
    assert "10 ± 1" in evidence and "8 ± 1" in evidence and "3 vs 3 seeds" in evidence and "spread" in evidence


def test_one_seed_is_inconclusive_whatever_the_difference():
    outcome, evidence = seed_spread_verdict([100.0], [0.0])
    assert outcome == "inconclusive" and "one seed" in evidence
    assert seed_spread_verdict([100.0, 100.0], [0.0])[0] == "inconclusive"


def test_zero_spread_with_seeds_decides_on_any_difference():
    assert seed_spread_verdict([5.0, 5.0], [4.0, 4.0])[0] == "reproduced"
    assert seed_spread_verdict([5.0, 5.0], [5.0, 5.0])[0] == "inconclusive"


def test_parity_verdict_is_non_inferiority():
    assert parity_verdict([9, 10, 11], [9.5, 10.5, 11.5])[0] == "reproduced"  # within the spread
    assert parity_verdict([12, 13, 14], [9, 10, 11])[0] == "reproduced"  # better is at least on par
    assert parity_verdict([5, 6, 7], [9, 10, 11])[0] == "not reproduced"  # the reference is better beyond it
    assert parity_verdict([5.0], [9.0])[0] == "inconclusive"


def test_verdict_refuses_an_unknown_outcome():
    with pytest.raises(ConfigError, match="not one of"):
        Verdict("x", "passed", "")
    assert set(OUTCOMES) == {"reproduced", "not reproduced", "inconclusive"}


# ------------------------------------------------------------------------------------------------ aggregation

ROWS = [{"arm": "a", "seed": 0, "acc": 10.0, "loss": 1.0}, {"arm": "a", "seed": 1, "acc": 12.0, "loss": None},
        {"arm": "a", "seed": 2, "acc": 17.0, "loss": 3.0}, {"arm": "b", "seed": 0, "acc": 50.0, "loss": 2.0}]


def test_aggregate_is_mean_and_sample_std_per_arm():
    agg = aggregate(ROWS)
    assert list(agg) == ["a", "b"]
    assert agg["a"]["acc"]["mean"] == pytest.approx(13.0)
    assert agg["a"]["acc"]["std"] == pytest.approx(statistics.stdev([10.0, 12.0, 17.0]))
    assert agg["a"]["acc"]["n"] == 3
    assert agg["a"]["loss"] == {"mean": pytest.approx(2.0), "std": pytest.approx(math.sqrt(2.0)), "n": 2}  # None out
    assert agg["b"]["acc"] == {"mean": 50.0, "std": None, "n": 1}  # one seed: no std


def test_mean_std_and_arm_values_refuse_nothing_to_measure():
    assert mean_std([2.0, 4.0]) == (3.0, pytest.approx(math.sqrt(2.0)))
    with pytest.raises(ConfigError, match="at least one"):
        mean_std([])
    with pytest.raises(ConfigError, match="arms"):
        arm_values(ROWS, "c", "acc")


def test_markdown_table_has_one_line_per_arm_with_mean_pm_std():
    table = report.markdown_table(ROWS).splitlines()
    assert table[0] == "| arm | seeds | acc | loss |"
    assert table[2].startswith("| a | 3 | 13.00 ± 3.61 | 2.00 ± 1.41 |")
    assert table[3] == "| b | 1 | 50.00 | 2.00 |"
    assert len(table) == 2 + 2


def test_check_result_refuses_rows_without_arm_or_seed():
    with pytest.raises(ConfigError, match="'arm' or 'seed'"):
        report.check_result(ClaimResult(rows=[{"arm": "a", "acc": 1.0}], verdicts=[]))
    with pytest.raises(ConfigError, match="no rows"):
        report.check_result(ClaimResult(rows=[], verdicts=[]))
    with pytest.raises(ConfigError, match="lacks"):
        report.check_result(ClaimResult(rows=ROWS, verdicts=[], curves={"a": [{"seed": 0, "step": 1}]}))


def test_write_report_with_curves_and_nan(tmp_path):
    """A fake claim: the three files, NaN written as null, curves kept, other files in the directory kept."""
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    rows = ROWS + [{"arm": "b", "seed": 1, "acc": float("nan"), "loss": 1.0}]
    curves = {"a": [{"seed": s, "step": k, "seconds": k * 0.5, "metric": "dev_acc", "value": k + s}
                    for s in (0, 1) for k in (0, 10, 20)]}
    result = ClaimResult(rows=rows, verdicts=[Verdict("a > b", *seed_spread_verdict([10, 12, 17], [50]))],
                         notes=["a note"], curves=curves)
    claim = Claim("x", "Paper", "statement", run=lambda *a: result, main_metric="acc")
    report.write_report(claim, result, tmp_path / "x", command="subtune repro x", seeds=[0, 1, 2], quick=False,
                        wall_seconds=3.0)
    data = json.loads((tmp_path / "x" / "result.json").read_text())
    assert data["rows"][-1]["acc"] is None and data["curves"] == curves and data["main_metric"] == "acc"
    assert (tmp_path / "x" / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
    assert "a note" in (tmp_path / "x" / "report.md").read_text()


def test_get_claim_and_run_claim_refuse_bad_input_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="s2ft, smt, lamda, senszo"):
        get_claim("lora")
    with pytest.raises(ConfigError, match="repeat"):
        run_claim("s2ft", quick=True, seeds=[0, 0], out_dir=tmp_path)
    with pytest.raises(ConfigError, match="ints >= 0"):
        run_claim("s2ft", quick=True, seeds=[], out_dir=tmp_path)
    assert not (tmp_path / "s2ft").exists()


def test_every_written_claim_module_has_its_claim():
    for name in CLAIMS:
        claim = get_claim(name)
        assert claim.name == name and claim.statement and claim.paper and callable(claim.run)
    assert CLAIMS == ("s2ft", "smt", "lamda", "senszo")


def test_quick_and_smoke_settings(monkeypatch):
    full, quick = Setting(40, 8, 100), Setting(10, 8, 40)
    monkeypatch.delenv(SMOKE_ENV, raising=False)
    assert pick_setting(False, full, quick) is full and pick_setting(True, full, quick) is quick
    monkeypatch.setenv(SMOKE_ENV, "1")
    assert pick_setting(True, full, quick) is SMOKE and pick_setting(False, full, quick) is full


def test_senszo_lr_grid_is_extended_only_when_its_largest_lr_wins_on_dev():
    from subtune.repro.senszo import top_edge_wins

    def runs(dev_losses):
        return {lr: type("Run", (), {"dev_loss": loss})() for lr, loss in dev_losses.items()}

    assert top_edge_wins(runs({1e-3: 0.98, 1e-2: 0.97, 1e-1: 0.75}))
    assert not top_edge_wins(runs({1e-3: 0.98, 1e-2: 0.75, 1e-1: 0.90}))  # bracketed
    assert not top_edge_wins(runs({1e-3: 0.976, 1e-2: 0.976, 1e-1: 0.976}))  # a tie: no reason to go higher


# ------------------------------------------------------------------------------------------------ end to end

def test_cli_repro_s2ft_quick_one_seed_writes_the_report(tmp_path, monkeypatch):
    from subtune.cli import main

    monkeypatch.setenv(SMOKE_ENV, "1")
    result = CliRunner().invoke(main, ["repro", "s2ft", "--quick", "--seeds", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "s2ft"
    assert {p.name for p in out.iterdir()} >= {"report.md", "result.json", "chart.png"}
    data = json.loads((out / "result.json").read_text())
    assert {"claim", "paper", "statement", "command", "seeds", "quick", "wall_seconds", "versions", "rows",
            "summary", "verdicts", "notes", "curves", "main_metric"} <= set(data)
    assert data["command"] == f"subtune repro s2ft --quick --seeds 1 --out {tmp_path}"
    assert data["seeds"] == [0] and data["quick"] is True and data["versions"]["torch"]
    arms = list(dict.fromkeys(r["arm"] for r in data["rows"]))
    assert arms[0] == "zero-shot" and {"S2FT random", "LoRA", "full FT", "S2FT activation small"} <= set(arms)
    for row in data["rows"]:
        assert isinstance(row["seed"], int) and 0 <= row["test_acc"] <= 100 and row["trainable"] >= 0
    text = (out / "report.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and " | 1 | " in line]
    assert [line.split(" | ")[0][2:] for line in table] == arms  # one table line per arm, in order
    assert data["verdicts"] and all(v["outcome"] == "inconclusive" for v in data["verdicts"])  # one seed
    assert all(v["outcome"] in OUTCOMES and v["evidence"] for v in data["verdicts"])
    assert "report:" in result.output


def test_cli_repro_refuses_bad_options(tmp_path):
    from subtune.cli import main

    for args, message in ((["repro", "nope"], "is not one of"), (["repro", "s2ft", "--seeds", "0"], "x>=1"),
                          (["repro", "s2ft", "--quick", "--seeds", "x"], "is not a valid integer")):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and message in result.output, result.output
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(main, ["repro", "s2ft", "--quick", "--out", str(tmp_path / "file")])
    assert result.exit_code != 0 and "file" in result.output
