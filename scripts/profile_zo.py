"""Where a zeroth-order step's time goes, on the embedded 3.7M model (issue 15, item 3).

    OMP_NUM_THREADS=2 python scripts/profile_zo.py [--method senszo|mezo] [--steps 30] [--objective choice|lm]

Runs `steps` SPSA steps (after 3 warm-up steps) through `subtune.train.zo.zo_step`, exactly as the ZOTrainer does,
under torch.profiler, and prints the time by part: the two forwards (model compute), NF4 dequantisation, the sparse
gather/scatter of the dense-and-sparse layers, noise generation and perturbation, and the rest (Python overhead).
Also times `steps` steps of the real `subtune train` path (HF Trainer + ZOTrainer) so the Trainer's own overhead shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch

import subtune
from subtune.core.api import state_of
from subtune.data.calibration import calibration_for
from subtune.data.loaders import CausalCollator, ChoiceCollator, encode_choice_record, encode_record, load_records
from subtune.ops.sparse import DenseAndSparseLinear
from subtune.recipes import make_config
from subtune.train.zo import step_seed, zo_step
from subtune.zoo import load_model

# profiler op name -> part (first match wins; the rest of the CPU time inside a step is "other")
PARTS = [("dequant", ("dequantize", "bitsandbytes")),
         ("noise + perturb", ("randn", "normal_", "zo.noise", "zo.perturb")),
         ("sparse gather/scatter", ("index_select", "index_add")),
         ]


def batch_for(tokenizer, records, objective: str, batch_size: int) -> dict:
    if objective == "choice":
        return ChoiceCollator(tokenizer.pad_token_id)([encode_choice_record(tokenizer, r) for r in
                                                       records[:batch_size]])
    return CausalCollator(tokenizer.pad_token_id)([encode_record(tokenizer, r) for r in records[:batch_size]])


def use_before(enabled: bool) -> None:
    """`--before`: the SPSA step of the last commit (z regenerated for every pass), from `git show HEAD:...`."""
    import subprocess
    import types

    import subtune.train.zo as train_zo

    if not enabled:
        return
    source = subprocess.run(["git", "show", "HEAD:src/subtune/ops/zo.py"], capture_output=True, text=True,
                            check=True).stdout
    module = types.ModuleType("zo_before")
    exec(compile(source, "zo_before", "exec"), module.__dict__)
    train_zo.spsa_step = module.spsa_step


def prepared(method: str, objective: str, quantize: str, cache: bool):
    model, tokenizer = load_model("default")
    overrides = {"objective": objective}
    if method == "senszo":
        overrides.update({"quantize": quantize, "mask_source": "magnitude"})  # the mask does not change the speed
    config = make_config(method, overrides=overrides)
    subtune.prepare(model, config, calibration=calibration_for(config, tokenizer))
    model.eval()
    held = sum(m.cache_dense(cache) for m in model.modules() if isinstance(m, DenseAndSparseLinear))
    return model, tokenizer, held


def wall(model, batch, steps: int) -> float:
    state = state_of(model)
    times = []
    for s in range(steps):
        start = time.perf_counter()
        zo_step(model, state, batch, 1e-6, [step_seed(0, s, 0)])
        times.append(time.perf_counter() - start)
    return statistics.median(times)  # the median: other processes share the CPU


def forward_only(model, batch, objective: str, steps: int) -> float:
    from subtune.train.zo import OBJECTIVES

    times = []
    with torch.inference_mode():
        for _ in range(steps):
            start = time.perf_counter()
            OBJECTIVES[objective](model, batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def breakdown(model, batch, steps: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    state = state_of(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for s in range(steps):
            zo_step(model, state, batch, 1e-6, [step_seed(0, s, 0)])
    out = defaultdict(float)
    for evt in prof.key_averages():
        out["all ops (self CPU)"] += evt.self_cpu_time_total / 1e6 / steps
        name = evt.key.lower()
        for part, keys in PARTS:
            if any(k in name for k in keys):
                out[part] += evt.self_cpu_time_total / 1e6 / steps
                break
    return dict(out)


def trainer_path(method: str, objective: str, quantize: str, steps: int, batch_size: int) -> float:
    import tempfile

    from subtune.recipes import finetune

    model, tokenizer = load_model("default")
    overrides = {"objective": objective}
    if method == "senszo":
        overrides.update({"quantize": quantize, "mask_source": "magnitude"})  # the mask does not change the speed
    config = make_config(method, overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        finetune(model, tokenizer, config, load_records("commonsense", "train"), tmp, max_steps=steps,
                 learning_rate=1e-6, batch_size=batch_size, save_strategy="no", progress=False)
        return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="senszo")
    ap.add_argument("--objective", default="choice")
    ap.add_argument("--quantize", default="nf4")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--trainer", action="store_true", help="also time the Trainer path")
    ap.add_argument("--before", action="store_true", help="the last commit's step, no dense cache")
    args = ap.parse_args()
    torch.manual_seed(0)
    use_before(args.before)
    model, tokenizer, held = prepared(args.method, args.objective, args.quantize, cache=not args.before)
    batch = batch_for(tokenizer, load_records("commonsense", "train"), args.objective, args.batch)
    wall(model, batch, 3)  # warm-up
    step = wall(model, batch, args.steps)
    fwd = forward_only(model, batch, args.objective, args.steps)
    parts = breakdown(model, batch, min(args.steps, 10))
    result = {"mode": "before" if args.before else "after", "dense_cache_mb": round(held / 2**20, 2),
              "method": args.method, "quantize": args.quantize if args.method == "senszo" else "-",
              "objective": args.objective, "batch": args.batch, "sequences": int(batch["input_ids"].shape[0]),
              "tokens": int(batch["input_ids"].numel()), "step_ms": round(1e3 * step, 1),
              "two_forwards_ms": round(2e3 * fwd, 1), "overhead_ms": round(1e3 * (step - 2 * fwd), 1),
              "profiled_ms": {k: round(1e3 * v, 2) for k, v in parts.items()}}
    if args.trainer:
        result["trainer_step_ms"] = round(1e3 * trainer_path(args.method, args.objective, args.quantize,
                                                             args.steps, args.batch), 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
