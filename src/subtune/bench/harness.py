"""`subtune bench`: every method side by side with the physical floors, each configuration in a fresh process."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

FLOORS = ["floor:inference", "floor:frozen_backward"]
ZO_FLOOR = "floor:zo_two_forwards"


@dataclass
class BenchSpec:
    methods: list[str]
    preset: str = "134m"
    batch: int = 4
    seq: int = 256
    dtype: str = "fp32"
    steps: int = 5
    warmup: int = 2
    grad_checkpointing: bool = False
    device: str = "cpu"
    budget: int | None = None  # trainable values every method is matched to; default: LoRA r=16's count
    threads: int | None = None
    extra: dict = field(default_factory=dict)


def default_budget(preset: str) -> int:
    """LoRA r=16's trainable count on its default targets: the budget every method is matched to."""
    from subtune.bench.presets import preset_config
    from subtune.core.config import LORA_TARGETS
    from subtune.methods.lora.method import _lora_params_per_rank

    return 16 * _lora_params_per_rank(preset_config(preset), list(LORA_TARGETS))


def own_base_floors(method_kinds: list[str]) -> list[str]:
    """The floors measured on a method's own base (`Method.own_base_floor`, e.g. SensZOQ's 4-bit model): inference,
    and for a zeroth-order method its two forwards, each as `floor:...+<method>`."""
    from subtune.core.method import get_method

    out = []
    for kind in method_kinds:
        method = get_method(kind.partition("@")[0])
        if method.own_base_floor:
            out += [f"{floor}+{kind}" for floor in ("floor:inference", *([ZO_FLOOR] if method.zeroth_order else []))]
    return out


def run_one(spec: BenchSpec, kind: str) -> dict:
    payload = {**asdict(spec), "kind": kind}
    payload.pop("methods")
    proc = subprocess.run([sys.executable, "-m", "subtune.bench.worker", json.dumps(payload)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"kind": kind, "error": " | ".join(tail) or f"exit code {proc.returncode}"}
    return json.loads(lines[-1])


def run_bench(spec: BenchSpec, progress: bool = True) -> dict:
    from subtune.core.method import get_method

    spec.budget = spec.budget or default_budget(spec.preset)
    kinds = list(spec.methods) + FLOORS
    if any(get_method(m.partition("@")[0]).zeroth_order for m in spec.methods):
        kinds.append(ZO_FLOOR)
    kinds += own_base_floors(spec.methods)
    results = []
    bar = tqdm(kinds, desc="bench", disable=not progress)
    for kind in bar:
        bar.set_postfix_str(kind)
        results.append(run_one(spec, kind))
        if progress:
            r = results[-1]
            tqdm.write(f"  {kind}: " + (r["error"] if "error" in r else
                                        f"{r['median_s']:.3f} s/step, peak +{r['peak_mib']:.0f} MiB"))
    import torch
    import transformers

    return {"spec": asdict(spec), "results": results,
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "machine": platform.machine(),
                            "cpus": os.cpu_count(), "platform": platform.platform()}}


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}×" if b else "–"


def references() -> list[tuple[str, str]]:
    """(label, method id) of every method the table compares with (`Method.bench_reference`), in registry order."""
    from subtune.core.method import registered_methods

    return [(m.bench_reference, m.id) for m in registered_methods() if m.bench_reference]


def markdown_table(report: dict) -> str:
    spec = report["spec"]
    ok = {r["kind"]: r for r in report["results"] if "error" not in r}
    # the ratio columns: each reference method, then the frozen-backward floor (a missing run gives "–")
    refs = [(label, ok.get(method_id)) for label, method_id in references()]
    refs.append(("floor", ok.get("floor:frozen_backward")))
    head = (f"preset `{spec['preset']}`, batch {spec['batch']} × {spec['seq']}, {spec['dtype']}, device "
            f"{spec['device']}, {spec['steps']} timed steps after {spec['warmup']} warm-up, trainable budget "
            f"{spec['budget']:,}" + (", gradient checkpointing" if spec["grad_checkpointing"] else ""))
    ratio_head = "".join(f" time vs {label} | mem vs {label} |" for label, _ in refs)
    lines = [head, "",
             "| method | trainable | s/step (median [min–max]) | tokens/s | peak mem above load (MiB) | "
             "total peak (MiB) |" + ratio_head,
             "|---|---:|---|---:|---:|---:|" + "---:|" * (2 * len(refs))]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['kind']} | failed: {r['error'][:80]} |" + " |" * (4 + 2 * len(refs)))
            continue
        t, m = r["median_s"], r["peak_mib"]
        ratios = "".join(f" {_ratio(t, ref and ref['median_s'])} | {_ratio(m, ref and ref['peak_mib'])} |"
                         for _, ref in refs)
        lines.append(
            f"| {r['kind']} | {r['trainable']:,} | {t:.3f} [{r['min_s']:.3f}–{r['max_s']:.3f}] | "
            f"{r['tokens_per_s']:.0f} | {m:.0f} | {r['total_peak_mib']:.0f} |" + ratios)
    for kind, r in ok.items():  # a ZO method against inference on its own (e.g. 4-bit) base
        base_floor = ok.get(f"floor:inference+{kind}")
        if base_floor:
            lines.append(f"\n`{kind}` step vs inference on the same base and batch: total peak "
                         f"{r['total_peak_mib']:.0f} / {base_floor['total_peak_mib']:.0f} MiB = "
                         f"{r['total_peak_mib'] / base_floor['total_peak_mib']:.3f}×; peak above load "
                         f"{r['peak_mib']:.0f} / {base_floor['peak_mib']:.0f} MiB; time {_ratio(r['median_s'], base_floor['median_s'])}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if "error" not in r][::-1]  # first method on top
    names = [r["kind"] for r in ok]
    colors = ["#999999" if r["kind"].startswith("floor") else "#3b6ea8" for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.35 * len(ok) + 1.2), sharey=True)
    for ax, key, label in [(axes[0], "median_s", "s / step (median)"), (axes[1], "peak_mib", "peak MiB above load")]:
        ax.barh(names, [r[key] for r in ok], color=colors)
        ax.set_title(label)
        ax.tick_params(axis="y", labelsize=8)
    spec = report["spec"]
    fig.suptitle(f"{spec['preset']} · batch {spec['batch']}×{spec['seq']} · {spec['dtype']} · {spec['device']} "
                 "(grey: floors)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{report['spec']['preset'].replace('/', '_')}-{report['spec']['dtype']}-{report['spec']['device']}"
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(markdown_table(report) + "\n")
    plot(report, paths["png"])
    return paths
