"""Write the "which number is larger" task as a user would: LLM-Adapters JSON lines (instruction, input, output,
answer), a seeded train / test split. The tasks of the embedded model never ask this, so it is a task of the
user's own, for the defaults sweep (scripts/sweep_defaults.py, docs/DEFAULTS.md).

    python examples/larger_number/make_data.py     # rewrites train.jsonl (600) and test.jsonl (200) beside it
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent


def record(a: int, b: int) -> dict:
    larger = max(a, b)
    # the answer comes last: numeric answers are read as the response's last number (LLM-Adapters' rule)
    return {"instruction": "Which number is larger?", "input": f"{a} or {b}",
            "output": f"Of {a} and {b}, the larger is {larger}.", "answer": str(larger)}


def pairs(rng: random.Random, n: int) -> list[tuple[int, int]]:
    out: set[tuple[int, int]] = set()
    while len(out) < n:
        a, b = rng.sample(range(1, 100), 2)
        out.add((a, b))
    return sorted(out, key=lambda _: rng.random())


def main() -> None:
    every = pairs(random.Random(0), 800)
    for name, part in (("train", every[:600]), ("test", every[600:])):
        lines = [json.dumps(record(a, b)) for a, b in part]
        (HERE / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
