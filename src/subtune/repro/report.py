"""A claim's report: OUT/<claim>/report.md (table of mean ± std over seeds, verdicts, notes), result.json (everything
raw, to recompute any number) and chart.png (the main metric per arm with std error bars; learning curves if any).

The three files are written together (`core.io.atomic_directory`): a crash leaves the previous report or the new
one, never a mix; other files in the directory are kept.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

from subtune.core.config import ConfigError
from subtune.repro import OUTCOMES, Claim, ClaimResult, Verdict, aggregate, metric_keys

FILES = ("report.md", "result.json", "chart.png")


def check_result(result: ClaimResult) -> None:
    """A claim's result has the documented shape (so a report never shows a half-formed table)."""
    if not result.rows:
        raise ConfigError("the claim returned no rows; each (arm, seed) needs a row with 'arm', 'seed' and metrics")
    for i, row in enumerate(result.rows):
        if "arm" not in row or "seed" not in row:
            raise ConfigError(f"row {i} lacks 'arm' or 'seed' ({sorted(row)}); every row needs both")
    for v in result.verdicts:
        if not isinstance(v, Verdict) or v.outcome not in OUTCOMES:
            raise ConfigError(f"verdict {v!r} is not a Verdict with an outcome in {list(OUTCOMES)}")
    for arm, points in result.curves.items():
        for p in points:
            missing = {"seed", "step", "seconds", "metric", "value"} - set(p)
            if missing:
                raise ConfigError(f"curve point of arm {arm!r} lacks {sorted(missing)}; give seed, step, seconds, "
                                  "metric and value")


def fmt_number(x: float | None) -> str:
    """Readable at a glance: counts with thousands separators, percentages with one decimal, small values 3 digits."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–" if x is None else str(x)
    if float(x).is_integer() and abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def mean_std_cell(cell: dict) -> str:
    if cell["mean"] is None:
        return "–"
    text = fmt_number(cell["mean"])
    return text if cell["std"] is None else f"{text} ± {fmt_number(cell['std'])}"


def markdown_table(rows: list[dict]) -> str:
    """One line per arm, one column per metric: mean ± sample std over its seeds (n = seeds)."""
    agg = aggregate(rows)
    keys = metric_keys(rows)
    lines = ["| arm | seeds | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for arm, cells in agg.items():
        n = max((c["n"] for c in cells.values()), default=0)
        lines.append(f"| {arm} | {n} | " + " | ".join(mean_std_cell(cells[k]) for k in keys) + " |")
    return "\n".join(lines)


def markdown(claim: Claim, result: ClaimResult, command: str, seeds: list[int], quick: bool,
             wall_seconds: float) -> str:
    verdicts = "\n".join(f"| {v.sub_claim} | **{v.outcome}** | {v.evidence} |" for v in result.verdicts)
    notes = "\n".join(f"- {n}" for n in result.notes)
    return "\n".join([
        f"# Claim `{claim.name}` — {claim.paper}", "",
        f"**Claim.** {claim.statement}", "",
        f"```bash\n{command}\n```", "",
        f"Seeds {seeds}{' (quick mode: tiny settings, not evidence)' if quick else ''}; wall time "
        f"{wall_seconds / 60:.1f} min. Each cell: mean ± sample std over the seeds.", "",
        markdown_table(result.rows), "",
        "## Verdicts", "",
        "| sub-claim | outcome | evidence |", "|---|---|---|",
        verdicts or "| – | – | the claim returned no verdict |", "",
        *(["## Notes", "", notes, ""] if notes else []),
        "Raw rows, curves and versions: `result.json`; chart: `chart.png`.", "",
    ])


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("subtune", "torch", "transformers", "peft"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def json_safe(obj):
    """NaN/inf become None (JSON has no such numbers; the report shows them as missing)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def result_json(claim: Claim, result: ClaimResult, command: str, seeds: list[int], quick: bool,
                wall_seconds: float) -> dict:
    return json_safe({
        "claim": claim.name, "paper": claim.paper, "statement": claim.statement, "command": command,
        "seeds": list(seeds), "quick": quick, "wall_seconds": round(wall_seconds, 1), "versions": versions(),
        "main_metric": main_metric(claim, result), "rows": result.rows, "summary": aggregate(result.rows),
        "verdicts": [{"sub_claim": v.sub_claim, "outcome": v.outcome, "evidence": v.evidence}
                     for v in result.verdicts],
        "notes": result.notes, "curves": result.curves,
    })


def main_metric(claim: Claim, result: ClaimResult) -> str | None:
    keys = metric_keys(result.rows)
    if claim.main_metric is not None and claim.main_metric not in keys:
        raise ConfigError(f"claim {claim.name}: main_metric {claim.main_metric!r} is not a metric of its rows {keys}")
    return claim.main_metric or next(iter(keys), None)


def plot(claim: Claim, result: ClaimResult, path: Path) -> None:
    """Bars of the main metric (mean, std error bars) per arm; with curves, the curve metric vs steps and seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = main_metric(claim, result)
    agg = aggregate(result.rows)
    arms = list(agg)
    curves = {arm: pts for arm, pts in result.curves.items() if pts}
    ncols = 3 if curves else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 0.4 * len(arms) + 2.0), squeeze=False)
    ax = axes[0][0]
    means = [agg[a][metric]["mean"] if metric and agg[a][metric]["mean"] is not None else 0.0 for a in arms]
    errs = [agg[a][metric]["std"] or 0.0 if metric else 0.0 for a in arms]
    ax.barh(arms[::-1], means[::-1], xerr=errs[::-1], color="#3b6ea8", ecolor="#222222", capsize=3)
    ax.set_xlabel(f"{metric} (mean ± std over seeds)")
    ax.tick_params(axis="y", labelsize=8)
    if curves:
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for j, (xkey, title) in enumerate([("step", "steps"), ("seconds", "wall-clock seconds")], start=1):
            cax = axes[0][j]
            for i, (arm, pts) in enumerate(curves.items()):
                name = pts[0]["metric"]
                for k, seed in enumerate(dict.fromkeys(p["seed"] for p in pts)):
                    line = sorted((p for p in pts if p["seed"] == seed and p["metric"] == name),
                                  key=lambda p: p[xkey])
                    cax.plot([p[xkey] for p in line], [p["value"] for p in line], color=colors[i % len(colors)],
                             alpha=0.8, lw=1.2, label=arm if k == 0 else None)
                cax.set_ylabel(name)
            cax.set_xlabel(title)
            cax.legend(fontsize=7)
    fig.suptitle(f"subtune repro {claim.name}: {claim.paper}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(claim: Claim, result: ClaimResult, target: str | Path, *, command: str, seeds: list[int],
                 quick: bool, wall_seconds: float) -> Path:
    """Write report.md, result.json and chart.png into `target` together; returns `target`."""
    from subtune.core import io

    check_result(result)
    target = Path(target)
    data = result_json(claim, result, command, seeds, quick, wall_seconds)
    text = markdown(claim, result, command, seeds, quick, wall_seconds)
    with io.atomic_directory(target, replaces=FILES) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # a report directory, readable like any other (mkdtemp makes it private)
        (tmp / "report.md").write_text(text)
        (tmp / "result.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
        plot(claim, result, tmp / "chart.png")
    return target
