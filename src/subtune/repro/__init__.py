"""`subtune repro CLAIM`: each paper's headline claim, measured in miniature on the embedded model, with seeds.

A claim is a module `subtune.repro.<name>` holding `CLAIM = Claim(name, paper, statement, run)`. Its
`run(quick, seeds, progress)` trains and evaluates every arm once per seed and returns a `ClaimResult`: one row per
(arm, seed) with numeric metrics, learning curves if it records any, notes, and one `Verdict` per sub-claim.
`run_claim` runs it and writes `OUT/<name>/report.md`, `result.json` and `chart.png` (`subtune.repro.report`).

Verdicts are decided by `seed_spread_verdict`: a difference counts only when it exceeds the seeds' own spread, so a
claim is "reproduced", "not reproduced" or "inconclusive" — and never re-run with other settings until it passes.
This module stays light (no torch, no transformers) so `subtune --help` does not pay for it.
"""

from __future__ import annotations

import importlib
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from subtune.core.config import ConfigError

CLAIMS = ("s2ft", "smt", "lamda", "senszo")
OUTCOMES = ("reproduced", "not reproduced", "inconclusive")


@dataclass
class Verdict:
    """The outcome of one sub-claim ("S2FT accuracy >= LoRA") and the numbers that decided it."""

    sub_claim: str
    outcome: str
    evidence: str

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ConfigError(f"verdict outcome {self.outcome!r} is not one of {list(OUTCOMES)}; use "
                              "seed_spread_verdict or one of those strings")


@dataclass
class ClaimResult:
    """What a claim's run measured.

    rows: one dict per (arm, seed) with "arm", "seed" and numeric metric keys (None for a value that could not be
    measured); curves: {arm: [{"seed", "step", "seconds", "metric", "value"}, ...]} (may be empty).
    """

    rows: list[dict]
    verdicts: list[Verdict]
    notes: list[str] = field(default_factory=list)
    curves: dict[str, list[dict]] = field(default_factory=dict)


@dataclass
class Claim:
    """A paper's claim as an experiment. `main_metric` is the row key the chart's bars show (default: the first
    numeric metric of the rows)."""

    name: str
    paper: str
    statement: str
    run: Callable[[bool, list[int], Callable[[str], None]], ClaimResult]
    main_metric: str | None = None


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation); the std is None for a single value (one seed measures no spread)."""
    values = [float(v) for v in values]
    if not values:
        raise ConfigError("mean_std: no values to aggregate; every arm needs at least one seed")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def seed_spread_verdict(a: list[float], b: list[float], higher_is_better: bool = True) -> tuple[str, str]:
    """Does arm a beat arm b by more than the seeds' spread? Returns (outcome, evidence).

    d = mean(a) - mean(b), turned so that d > 0 means a is better. "reproduced" if d > max(std_a, std_b) (sample
    std over seeds), "not reproduced" if -d > max(std_a, std_b), else "inconclusive". With a single seed in either
    arm there is no spread to compare with, so the outcome is "inconclusive" whatever the difference (the evidence
    still shows it): one seed cannot tell a method's effect from the seed's.
    """
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    sign = 1.0 if higher_is_better else -1.0
    d = sign * (ma - mb)
    fmt = "{:.4g}".format
    sd = lambda m, s: f"{fmt(m)}" + (f" ± {fmt(s)}" if s is not None else "")  # noqa: E731
    direction = "higher" if higher_is_better else "lower"
    evidence = (f"{sd(ma, sa)} vs {sd(mb, sb)} ({len(a)} vs {len(b)} seeds; {direction} is better; "
                f"difference {fmt(d)} in the better direction")
    if sa is None or sb is None:
        return "inconclusive", evidence + "; one seed measures no spread)"
    spread = max(sa, sb)
    evidence += f", spread max(std) {fmt(spread)})"
    if not (math.isfinite(d) and math.isfinite(spread)):
        return "inconclusive", evidence.replace(")", "; a value is not finite)", 1)
    if d > spread:
        return "reproduced", evidence
    if -d > spread:
        return "not reproduced", evidence
    return "inconclusive", evidence


def metric_keys(rows: list[dict]) -> list[str]:
    """The numeric metric keys of the rows in first-seen order ("arm" and "seed" excluded)."""
    keys: list[str] = []
    for row in rows:
        for k, v in row.items():
            if k not in ("arm", "seed") and k not in keys and (v is None or isinstance(v, (int, float))) \
                    and not isinstance(v, bool):
                keys.append(k)
    return keys


def _measured(value) -> bool:
    """None and NaN/inf (a run that diverged) count as not measured, as result.json writes them (null)."""
    return value is not None and math.isfinite(value)


def aggregate(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """{arm: {metric: {"mean", "std", "n"}}} over the seeds of each arm, arms in first-seen order; values that are
    None or not finite (not measured) are left out of their metric, and a metric no seed measured has mean None."""
    out: dict[str, dict[str, dict]] = {}
    keys = metric_keys(rows)
    for arm in dict.fromkeys(r["arm"] for r in rows):
        arm_rows = [r for r in rows if r["arm"] == arm]
        out[arm] = {}
        for k in keys:
            values = [r[k] for r in arm_rows if _measured(r.get(k))]
            mean, std = mean_std(values) if values else (None, None)
            out[arm][k] = {"mean": mean, "std": std, "n": len(values)}
    return out


def arm_values(rows: list[dict], arm: str, metric: str) -> list[float]:
    """The per-seed values of one arm's metric (for seed_spread_verdict); refuses an arm or metric with none."""
    values = [float(r[metric]) for r in rows if r["arm"] == arm and _measured(r.get(metric))]
    if not values:
        arms = sorted({r["arm"] for r in rows})
        raise ConfigError(f"no values of {metric!r} for arm {arm!r}; the rows have arms {arms} and metrics "
                          f"{metric_keys(rows)}")
    return values


def get_claim(name: str) -> Claim:
    """The CLAIM of module subtune.repro.<name>; an unknown name lists the claims."""
    if name not in CLAIMS:
        raise ConfigError(f"unknown claim {name!r}; choose one of {', '.join(CLAIMS)} (subtune repro CLAIM)")
    module = importlib.import_module(f"subtune.repro.{name}")
    return module.CLAIM


def check_seeds(seeds: list[int]) -> list[int]:
    """Seeds as a list of distinct ints >= 0 (at least one), before any work."""
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"seeds must be a non-empty list of ints >= 0, got {seeds!r} (CLI: --seeds N runs 0..N-1)")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds {seeds} repeat a seed; give each seed once")
    return seeds


def command_line(name: str, quick: bool, seeds: list[int], out_dir: str | Path) -> str:
    """The `subtune repro` command that reproduces a run (seeds 0..N-1 are `--seeds N`)."""
    seed_part = f"--seeds {len(seeds)}" if seeds == list(range(len(seeds))) else f"(seeds {seeds})"
    return f"subtune repro {name}{' --quick' if quick else ''} {seed_part} --out {out_dir}"


def run_claim(name: str, quick: bool = False, seeds: list[int] | None = None, out_dir: str | Path = "runs/repro",
              progress: Callable[[str], None] | None = None) -> Path:
    """Run claim `name` over `seeds` (default 0, 1, 2) and write its report; returns OUT/<name>.

    Everything is checked before any training: the claim exists, the seeds are valid and OUT/<name> is writable.
    """
    from subtune.core import io
    from subtune.repro import report

    claim = get_claim(name)
    seeds = check_seeds([0, 1, 2] if seeds is None else seeds)
    target = Path(out_dir) / name
    io.check_writable(target, what="repro output directory")
    progress = progress or (lambda message: None)
    start = time.perf_counter()
    result = claim.run(quick, seeds, progress)
    report.check_result(result)
    wall = time.perf_counter() - start
    report.write_report(claim, result, target, command=command_line(name, quick, seeds, out_dir), seeds=seeds,
                        quick=quick, wall_seconds=wall)
    return target
