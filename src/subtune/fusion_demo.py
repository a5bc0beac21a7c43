"""The fusion demo: a miniature of the S²FT paper's Table 5 (§6.2) on the embedded model.

S²FT and LoRA are each trained on `commonsense` and on `arithmetic`; every adapter is served from one
`AdapterStore`, alone and fused (`store.fuse({"cs": 1.0, "math": 1.0})`, then `activate`), and evaluated on BOTH
tasks by generation. Two S²FT fusions: *overlapping* (the arithmetic run selects its units on its own, with another
seed, so it shares some heads/channels with the commonsense run by chance) and *disjoint* (the arithmetic run is
trained with `disjoint_from` the commonsense adapter, so the fused update never sums two tasks' values in one
weight entry). What fusion forgets is the drop of each task's accuracy from its own single adapter to the fused one.

`python scripts/fusion_demo.py` runs it; `run_fusion_demo` is the function a CLI command can call.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from subtune.core import api
from subtune.core.errors import SubtuneError
from subtune.methods.lora.config import LoraConfig
from subtune.methods.s2ft.config import S2FTConfig
from subtune.data.loaders import load_records
from subtune.eval.evaluate import evaluate
from subtune.recipes import demo_methods, finetune, make_config
from subtune.serve import AdapterStore

TASKS = {"cs": "commonsense", "math": "arithmetic"}
# arithmetic is the harder task for S²FT here: at the demo's 80 (or 200) steps most selections stay near 0%, so it
# gets 600 (the whole demo then takes about 4.5 minutes on the 2-core CPU); commonsense keeps the demo's 80
DEFAULT_STEPS = {"commonsense": 80, "arithmetic": 600}
# (row label, store adapter name) in the table's order; fused adapters are built in run_fusion_demo
ROWS = [("zero-shot", None), ("S2FT cs", "s2ft-cs"), ("S2FT math", "s2ft-math"),
        ("S2FT math (disjoint from cs)", "s2ft-math-disjoint"), ("S2FT fused overlapping", "s2ft-fused-overlapping"),
        ("S2FT fused disjoint", "s2ft-fused-disjoint"), ("LoRA cs", "lora-cs"), ("LoRA math", "lora-math"),
        ("LoRA fused", "lora-fused")]
FUSIONS = {"s2ft-fused-overlapping": ("s2ft-cs", "s2ft-math"), "s2ft-fused-disjoint": ("s2ft-cs", "s2ft-math-disjoint"),
           "lora-fused": ("lora-cs", "lora-math")}
# the trained runs: store name -> (method, task key, seed, train on top of the adapters of these runs' units?)
_S2FT, _LORA = S2FTConfig.method, LoraConfig.method
RUNS = {"s2ft-cs": (_S2FT, "cs", 0, None), "s2ft-math": (_S2FT, "math", 1, None),
        "s2ft-math-disjoint": (_S2FT, "math", 1, "s2ft-cs"), "lora-cs": (_LORA, "cs", 0, None),
        "lora-math": (_LORA, "math", 1, None)}


@dataclass
class FusionResult:
    """Accuracy per row and task, and what the run did (steps, settings, shared entries, seconds)."""

    accuracy: dict[str, dict[str, float]]  # row label -> {task: accuracy}
    forgetting: dict[str, dict[str, float]]  # fused row -> {task: single adapter's accuracy - fused accuracy}
    shared_entries: dict[str, int]  # fused S²FT row -> weight entries both adapters train
    settings: dict[str, dict] = field(default_factory=dict)
    limit: int = 100
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _train(name: str, base, tokenizer, steps: dict[str, int], batch_size: int, output_dir: Path,
           adapters: dict[str, Path], progress: bool) -> tuple[Path, dict, torch.nn.Module]:
    """Fine-tune one run of RUNS on a copy of the base; returns (adapter dir, its settings, the trained model)."""
    method_id, task_key, seed, disjoint_of = RUNS[name]
    task = TASKS[task_key]
    settings = demo_methods()[method_id]
    overrides = dict(settings.get("config") or {}, seed=seed)
    if disjoint_of is not None:
        overrides["disjoint_from"] = [str(adapters[disjoint_of])]
    config = make_config(method_id, overrides=overrides)
    n_steps = steps[task] * settings.get("steps_factor", 1)
    if progress:
        print(f"[fusion] {name}: {method_id} on {task}, {n_steps} steps, lr {settings['lr']:g}"
              + (f", disjoint from {disjoint_of}" if disjoint_of else ""), flush=True)
    model = copy.deepcopy(base)
    finetune(model, tokenizer, config, load_records(task, "train"), output_dir / name, max_steps=n_steps,
             learning_rate=settings["lr"], batch_size=batch_size, logging_steps=max(n_steps // 4, 1),
             save_strategy="no", progress=False)
    record = {"method": method_id, "task": task, "steps": n_steps, "lr": settings["lr"], "seed": seed,
              "config": {k: v for k, v in config.to_dict().items() if k in overrides or k == "method"}}
    return output_dir / name / "adapter", record, model


@torch.no_grad()
def _check_served_equals_trained(store: AdapterStore, name: str, trained: torch.nn.Module, ids: torch.Tensor) -> None:
    """The store's merged adapter must be the trained model (else the table would describe something else)."""
    store.activate(name)
    trained.eval()
    diff = (store.model(input_ids=ids).logits - trained(input_ids=ids).logits).abs().max().item()
    store.activate(None)
    if diff > 1e-4:
        raise SubtuneError(f"fusion demo: adapter {name} served from the store differs from the trained model by "
                           f"{diff:.2e} in the logits; the adapter was not read back faithfully")


def _shared_entries(store: AdapterStore, a: str, b: str) -> int:
    """Weight entries that both S²FT adapters train (their columns/rows deltas' positions meet: fusion sums them)."""
    da, db = store.deltas(a), store.deltas(b)
    shared = 0
    for path in set(da) & set(db):
        (ra, ca, _), (rb, cb, _) = da[path].coords(), db[path].coords()
        width = da[path].in_features
        shared += int(torch.isin(ra * width + ca, rb * width + cb).sum())
    return shared


def run_fusion_demo(steps: dict[str, int] | None = None, batch_size: int = 8, limit: int = 100,
                    output_dir: str | Path = "runs/fusion", progress: bool = True,
                    model_name: str = "default") -> FusionResult:
    """Train the five runs, serve them from one store, evaluate every row of ROWS on both tasks."""
    from subtune.zoo import load_model

    start = time.perf_counter()
    steps = {**DEFAULT_STEPS, **(steps or {})}
    output_dir = Path(output_dir)
    base, tokenizer = load_model(model_name)
    store = AdapterStore(copy.deepcopy(base))
    probe = torch.randint(3, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    adapters, settings = {}, {}
    for name in RUNS:  # in order: s2ft-cs is saved before the disjoint run reads its units
        adapters[name], settings[name], trained = _train(name, base, tokenizer, steps, batch_size, output_dir,
                                                         adapters, progress)
        store.add(name, adapters[name])  # subtune.read_deltas: no method code
        _check_served_equals_trained(store, name, trained, probe)
        del trained
    for fused, (a, b) in FUSIONS.items():
        store.fuse({a: 1.0, b: 1.0}, name=fused)
    tests = {key: load_records(task, "test", need_answer=True)[:limit] for key, task in TASKS.items()}
    accuracy = {}
    for label, name in ROWS:
        store.activate(name)
        accuracy[label] = {task: evaluate(store.model, tokenizer, tests[key], with_perplexity=False,
                                          progress=False).accuracy for key, task in TASKS.items()}
        if progress:
            print(f"[fusion] {label}: " + ", ".join(f"{t} {100 * a:.1f}%" for t, a in accuracy[label].items()),
                  flush=True)
    store.activate(None)
    singles = {"S2FT fused overlapping": ("S2FT cs", "S2FT math"),
               "S2FT fused disjoint": ("S2FT cs", "S2FT math (disjoint from cs)"), "LoRA fused": ("LoRA cs", "LoRA math")}
    forgetting = {row: {TASKS["cs"]: round(accuracy[cs][TASKS["cs"]] - accuracy[row][TASKS["cs"]], 4),
                        TASKS["math"]: round(accuracy[math][TASKS["math"]] - accuracy[row][TASKS["math"]], 4)}
                  for row, (cs, math) in singles.items()}
    shared = {"S2FT fused overlapping": _shared_entries(store, "s2ft-cs", "s2ft-math"),
              "S2FT fused disjoint": _shared_entries(store, "s2ft-cs", "s2ft-math-disjoint")}
    return FusionResult(accuracy, forgetting, shared, settings, limit, time.perf_counter() - start)


def format_fusion_table(result: FusionResult) -> str:
    """The Markdown table: one row per adapter, accuracy on each task (first `limit` test questions)."""
    cs, math = TASKS["cs"], TASKS["math"]
    lines = [f"| adapter | {cs} acc | {math} acc |", "|---|---:|---:|"]
    for label, _ in ROWS:
        acc = result.accuracy[label]
        lines.append(f"| {label} | {100 * acc[cs]:.1f}% | {100 * acc[math]:.1f}% |")
    lines.append("")
    lines.append("Forgetting (single adapter's accuracy on its own task minus the fused adapter's, points):")
    lines.append("")
    lines.append(f"| fused adapter | {cs} | {math} | mean | weight entries both adapters train |")
    lines.append("|---|---:|---:|---:|---:|")
    for row, drop in result.forgetting.items():
        shared = result.shared_entries.get(row)
        lines.append(f"| {row} | {100 * drop[cs]:+.1f} | {100 * drop[math]:+.1f} | "
                     f"{50 * (drop[cs] + drop[math]):+.1f} | {'–' if shared is None else f'{shared:,}'} |")
    return "\n".join(lines)
