"""The fusion demo (issue #12, item 7): a miniature of the S²FT paper's Table 5 on the embedded model.

Trains S²FT (overlapping and disjoint selections) and LoRA on `commonsense` and on `arithmetic`, serves every adapter
and every fused pair from one `subtune.serve.AdapterStore`, and evaluates each on both tasks by generation. Prints the
Markdown table and writes it with the JSON of the run (see `subtune.fusion_demo`).

    python scripts/fusion_demo.py                              # runs/fusion/{table.md,result.json}
    python scripts/fusion_demo.py --steps-math 300 --limit 200 --output runs/fusion2
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from subtune.fusion_demo import DEFAULT_STEPS, format_fusion_table, run_fusion_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-cs", type=int, default=DEFAULT_STEPS["commonsense"], help="commonsense steps")
    parser.add_argument("--steps-math", type=int, default=DEFAULT_STEPS["arithmetic"], help="arithmetic steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=100, help="test questions per task")
    parser.add_argument("--output", type=Path, default=Path("runs/fusion"), help="runs, table.md and result.json")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if min(args.steps_cs, args.steps_math, args.batch_size, args.limit) < 1:
        parser.error("--steps-cs, --steps-math, --batch-size and --limit must be >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run_fusion_demo({"commonsense": args.steps_cs, "arithmetic": args.steps_math}, args.batch_size,
                             args.limit, args.output, progress=not args.quiet)
    table = format_fusion_table(result)
    header = (f"{args.limit} test questions per task; S2FT and LoRA at the demo's settings; commonsense "
              f"{args.steps_cs} steps, arithmetic {args.steps_math} steps, batch {args.batch_size}")
    print(header)
    print(table)
    print(f"total {result.seconds:.0f} s")
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "table.md").write_text(header + "\n\n" + table + "\n")
    (args.output / "result.json").write_text(result.to_json() + "\n")
    print(f"wrote {args.output / 'table.md'} and {args.output / 'result.json'}")


if __name__ == "__main__":
    main()
