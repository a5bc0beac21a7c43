"""Does SensZOQ learn reliably given more steps? A longer re-run of `subtune repro senszo`'s choices (issue 15).

    python scripts/senszo_longer.py [--steps 400] [--seeds 3] [--from docs/repro] [--out docs/repro]

The full claim trains 150 ZO steps per run; there, one seed of the sensitive NF4 arm learned and the others' dev
loss was still falling at the last step. This re-runs the sensitive and random NF4 arms and full MeZO with `--steps`
steps (dev loss and ranking accuracy every 50 steps, the values of the lowest dev loss restored, everything else as
the claim) at the learning rates the full run chose on dev (read from FROM/senszo/result.json: nothing here looks
at test to choose), and writes OUT/senszo-longer/report.md, result.json and chart.png (dev accuracy curves per
seed), with the claim's own verdicts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from subtune.core import io
from subtune.repro import Claim, report
from subtune.repro.senszo import FULL, MEZO, NF4_TAG, RANDOM, SENSITIVE, run_setting

ARMS = (f"{SENSITIVE} {NF4_TAG}", f"{RANDOM} {NF4_TAG}", MEZO)


def chosen_lrs(result_json: Path) -> tuple[tuple[str, float], ...]:
    """The lrs a full `subtune repro senszo` run chose on dev, per arm of ARMS (a quick run chose nothing)."""
    if not result_json.is_file():
        raise SystemExit(f"{result_json} not found: run `subtune repro senszo --seeds 3 --out "
                         f"{result_json.parent.parent}` first, or point --from at its --out directory")
    try:
        data = json.loads(result_json.read_text())
        rows = data["rows"]
    except (ValueError, KeyError) as err:
        raise SystemExit(f"{result_json} is not a repro result ({err}); re-run `subtune repro senszo`") from err
    if data.get("quick"):
        raise SystemExit(f"{result_json} is from a --quick run, which uses one fixed lr and chooses nothing on dev; "
                         "point --from at a full run's --out directory")
    lrs = {r["arm"]: r["lr"] for r in rows if r["arm"] in ARMS}
    missing = [arm for arm in ARMS if arm not in lrs]
    if missing:
        raise SystemExit(f"{result_json} has no rows for {missing}: run `subtune repro senszo --seeds 3` first")
    return tuple((arm, float(lrs[arm])) for arm in ARMS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400, help="ZO steps per run (the full claim: 150)")
    ap.add_argument("--seeds", type=int, default=3, help="run seeds 0..N-1")
    ap.add_argument("--from", dest="source", default="docs/repro",
                    help="the --out directory of a full `subtune repro senszo` run (holds senszo/result.json)")
    ap.add_argument("--out", default="docs/repro", help="the report goes to OUT/senszo-longer/")
    args = ap.parse_args()
    if args.steps < 1 or args.seeds < 1:
        ap.error(f"--steps and --seeds must be at least 1 (got {args.steps} and {args.seeds})")

    lrs = chosen_lrs(Path(args.source) / "senszo" / "result.json")
    setting = dataclasses.replace(FULL, steps=args.steps, eval_every=50, arms=ARMS, grid=False, fixed_lr=lrs)
    claim = Claim(name="senszo-longer", paper="SensZOQ (Guo et al., ICLR 2025, arXiv 2406.02913)",
                  statement=f"With {args.steps} ZO steps instead of 150, the sensitive 0.1% mask on the NF4 base "
                            "improves dev and test ranking accuracy over zero-shot and over a random mask, and "
                            "matches full-parameter MeZO.",
                  run=lambda quick, seeds, progress: run_setting(setting, seeds, progress), main_metric="test_rank")
    target = Path(args.out) / claim.name
    io.check_writable(target, what="report directory (--out)")  # before the minutes of training, not after
    seeds = list(range(args.seeds))
    start = time.perf_counter()
    result = claim.run(False, seeds, lambda message: print(f"[senszo-longer] {message}", flush=True))
    report.check_result(result)
    command = (f"python scripts/senszo_longer.py --steps {args.steps} --seeds {args.seeds} --from {args.source} "
               f"--out {args.out}")
    report.write_report(claim, result, target, command=command, seeds=seeds, quick=False,
                        wall_seconds=time.perf_counter() - start)
    print((target / "report.md").read_text())


if __name__ == "__main__":
    main()
