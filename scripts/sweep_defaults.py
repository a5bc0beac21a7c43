"""The learning-rate sweep behind each method's `default_lr` (docs/DEFAULTS.md).

Every run is what `subtune train --method M --data TASK --max-steps STEPS` does with the method's default config
(S²FT: the README's `--d_ratio 0.05`), batch 16, seed 0, at one lr of a small log-spaced grid, on the embedded
model; it reports the answer loss (mean token loss of the test answers, log perplexity) and the generation
accuracy on the first `--limit` test records, before and after. Results are appended to a JSON-lines file as they
come, so an interrupted sweep resumes where it stopped; `--table` prints the markdown of docs/DEFAULTS.md.

    nice -n 10 env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python scripts/sweep_defaults.py \
        --out runs/sweep/results.jsonl > runs/sweep/log.txt 2>&1
    .venv/bin/python scripts/sweep_defaults.py --out runs/sweep/results.jsonl --table
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = {  # name: (train data, test data), as `subtune train --data` / `subtune eval --task` take them
    "arithmetic": ("arithmetic", "arithmetic"),
    "commonsense": ("commonsense", "commonsense"),
    "larger_number": (str(ROOT / "examples/larger_number/train.jsonl"),
                      str(ROOT / "examples/larger_number/test.jsonl")),
}
GRIDS = {  # log-spaced (half decades), bracketing each method's `demo` lr; DoRA and LaMDA++ take LoRA's and LaMDA's
    "full": [1e-4, 3e-4, 1e-3],
    "lora": [3e-3, 1e-2, 3e-2],
    "dora": [],
    "s2ft": [1e-2, 3e-2, 1e-1],
    "smt": [1e-2, 3e-2, 1e-1],
    "lamda": [1e-2, 3e-2, 1e-1],
    "lamda++": [],
}
README_CONFIG = {"s2ft": {"d_ratio": 0.05}}  # the README's first train line


def answer_loss(ppl: float | None) -> float:
    return math.log(ppl) if ppl and math.isfinite(ppl) else float("inf")


def one_run(base, tokenizer, method: str, lr: float, train: list[dict], test: list[dict], steps: int) -> dict:
    from subtune.core import api
    from subtune.eval.evaluate import evaluate
    from subtune.recipes import finetune, make_config

    model = copy.deepcopy(base)
    config = make_config(method, README_CONFIG.get(method))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            finetune(model, tokenizer, config, train, tmp, max_steps=steps, learning_rate=lr, batch_size=16,
                     save_strategy="no", logging_steps=max(steps // 4, 1), progress=False)
        except Exception as e:  # a diverged run (TrainingDivergedError) is a result of the sweep, not its end
            return {"error": f"{type(e).__name__}: {e}"[:200], "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    after = evaluate(model, tokenizer, test, progress=False)
    return {"accuracy": after.accuracy, "loss": answer_loss(after.perplexity), "seconds": round(seconds, 1),
            "trainable": api.trainable_summary(model).trainable}


def lrs_of(method: str, at_default: bool) -> list[float]:
    from subtune.core.method import get_method

    return [get_method(method).default_lr] if at_default else GRIDS[method]


def run_sweep(out: Path, methods: list[str], tasks: list[str], steps: int, limit: int, at_default: bool) -> None:
    from subtune.data.loaders import load_records
    from subtune.eval.evaluate import evaluate
    from subtune.zoo import load_model

    done = {(r["task"], r["method"], r["lr"]) for r in read(out)}
    base, tokenizer = load_model("default")
    out.parent.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        train = load_records(TASKS[task][0], "train")
        test = load_records(TASKS[task][1], "test", need_answer=True)[:limit]
        if (task, "base", 0.0) not in done:
            before = evaluate(base, tokenizer, test, progress=False)
            write(out, {"task": task, "method": "base", "lr": 0.0, "accuracy": before.accuracy,
                        "loss": answer_loss(before.perplexity), "steps": 0})
        for method in methods:
            for lr in lrs_of(method, at_default):
                if (task, method, lr) in done:
                    continue
                result = one_run(base, tokenizer, method, lr, train, test, steps)
                write(out, {"task": task, "method": method, "lr": lr, "steps": steps, **result})
                print(f"{task} {method} lr={lr:g}: {result}", flush=True)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def write(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


ACC_NOISE, LOSS_NOISE = 0.05, 0.05  # within this of the best is a tie (50 test records: one record is 2 points)


def choose(rows: list[dict], method: str) -> float | None:
    """The smallest lr within noise of the best on the tasks it was swept on (mean accuracy within ACC_NOISE of
    the best and mean answer loss within LOSS_NOISE nats of the best): the safest lr that learns as well as any.
    A diverged run never qualifies."""
    mine = [r for r in rows if r["method"] == method]
    lrs = sorted({r["lr"] for r in mine})
    swept = {t for t in {r["task"] for r in mine} if len({r["lr"] for r in mine if r["task"] == t}) == len(lrs)}
    means = {}
    for lr in lrs:
        runs = [r for r in mine if r["lr"] == lr and r["task"] in swept]
        if runs and not any("error" in r for r in runs):
            means[lr] = (sum(r["accuracy"] for r in runs) / len(runs), sum(r["loss"] for r in runs) / len(runs))
    if not means:
        return None
    best_acc = max(a for a, _ in means.values())
    best_loss = min(loss for _, loss in means.values())
    return min(lr for lr, (a, loss) in means.items() if a >= best_acc - ACC_NOISE and loss <= best_loss + LOSS_NOISE)


def table(rows: list[dict], tasks: list[str]) -> str:
    base = {r["task"]: r for r in rows if r["method"] == "base"}
    lines = ["| method | lr grid | default lr | " + " | ".join(f"{t}: loss before → after, acc before → after"
                                                           for t in tasks) + " |",
             "|---|---|---:|" + "---|" * len(tasks)]
    for method in GRIDS:
        lr = choose(rows, method)
        if lr is None:
            continue
        cells = []
        for t in tasks:
            r = next((r for r in rows if (r["task"], r["method"], r["lr"]) == (t, method, lr)), None)
            if r is None or "error" in r:
                cells.append("–")
                continue
            b = base[t]
            cells.append(f"{b['loss']:.2f} → {r['loss']:.2f}, "
                         f"{100 * b['accuracy']:.0f}% → {100 * r['accuracy']:.0f}%")
        grid = ", ".join(f"{g:g}" for g in sorted({r["lr"] for r in rows if r["method"] == method}))
        lines.append(f"| {method} | {grid} | {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def full_grid(rows: list[dict], tasks: list[str]) -> str:
    """Every run: accuracy / answer loss per lr and task (the evidence behind the chosen default)."""
    lines = ["| method | lr | " + " | ".join(f"{t} acc / loss" for t in tasks) + " | s per run |",
             "|---|---:|" + "---|" * (len(tasks) + 1)]
    for method in GRIDS:
        for lr in sorted({r["lr"] for r in rows if r["method"] == method}):
            mine = {r["task"]: r for r in rows if r["method"] == method and r["lr"] == lr}
            if not mine:
                continue
            cells = [("diverged" if "error" in mine[t] else f"{100 * mine[t]['accuracy']:.0f}% / {mine[t]['loss']:.2f}")
                     if t in mine else "–" for t in tasks]
            secs = [m["seconds"] for m in mine.values() if "seconds" in m]
            lines.append(f"| {method} | {lr:g} | " + " | ".join(cells) + f" | {sum(secs) / max(len(secs), 1):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs/sweep/results.jsonl")
    parser.add_argument("--methods", default=",".join(GRIDS))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--limit", type=int, default=50, help="test records evaluated per run")
    parser.add_argument("--at-default", action="store_true", help="one run per method at its default_lr")
    parser.add_argument("--table", action="store_true", help="print the tables from --out and exit")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    if args.table:
        rows = read(args.out)
        print(table(rows, tasks) + "\n\n" + full_grid(rows, tasks))
        return
    run_sweep(args.out, args.methods.split(","), tasks, args.steps, args.limit, args.at_default)


if __name__ == "__main__":
    main()
