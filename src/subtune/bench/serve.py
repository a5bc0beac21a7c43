"""`subtune bench --serve`: serving many adapters on one base, subtune vs PEFT LoRA (issue #12, items 2 and 6).

Three measurements, side by side in one run:

- **switch, per layer** — one square n×n linear at widths 1024 … 16384 (the o_proj of a one-layer LLaMA of hidden
  n: the AdapterStore serves LLaMA-layout models). subtune: `AdapterStore.activate(a)` → `activate(b)` (restore a's
  saved entries, scatter b's k columns in). PEFT: `unmerge_adapter()` + `merge_adapter([b])` (W −= s·B_a A_a,
  W += s·B_b A_b). Equal adapter values: k·n = r·(n + n), so k = 2r (S²FT 32 columns vs LoRA r = 16, the paper's
  Fig. 6a/6b setting).
- **switch, whole model** — S²FT adapters at LoRA r = 16's value count on q, k, v, up, down (the training bench's
  budget), chosen by S²FT's own selection (random heads and channels) with random values, vs PEFT LoRA r = 16 on
  those targets; for `--preset` and each `--switch-presets` architecture (e.g. llama2-7b in bf16).
- **generation** — `rows` prompts of `prompt_len` tokens, `new_tokens` greedy tokens each (KV cache), row i using
  adapter i mod K: `store.generate(..., adapter_names=...)` vs PEFT's `generate(..., adapter_names=...)` with K LoRA
  adapters of the same size vs the base alone (the floor). A guard checks that every routed row's tokens equal those
  of its adapter merged alone (`activate`), and counts the rows whose tokens the adapter changed.

Protocol (Fig. 6a/6b): warm-up, then many rounds, median (min and max kept). The systems compared are measured in
one process, interleaved (switch: blocks of rounds in turn; generation: every round runs every system), so load from
other processes falls on both alike. Each configuration is its own fresh process (`python -m subtune.bench.serve
'<job json>'`): a 16384 layer holds 2 GiB, the 7B model 13.5 GB in bf16, and no job inherits another's heap.
Random weights: values do not change the cost of a merge, a scatter or a GEMM.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from subtune.core.config import LORA_TARGETS as DEFAULT_LORA_TARGETS
from subtune.core.errors import SubtuneError

LORA_TARGETS = list(DEFAULT_LORA_TARGETS)  # the training bench's LoRA (its budget)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYER_PATH = "model.layers.0.self_attn.o_proj"
STD = 0.02  # adapter values at the scale of the base's own init, so routed and merged outputs visibly differ
CHECK_BYTES = 512 * 2**20  # weights compared bit for bit after the switches; above this a sample of modules
TARGETS = {"switch_speedup": 10.0, "switch_min_width": 4096, "vs_base_at_16": 0.8}


class ServeBenchError(SubtuneError, ValueError):
    """A serving-bench option or configuration that cannot run as given."""


@dataclass
class ServeBenchSpec:
    preset: str = "134m"  # generation and the first whole-model switch
    device: str = "cpu"
    dtype: str = "fp32"  # of the per-layer weights, the preset, and switch presets without ':dtype'
    widths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384])
    rank: int = 16  # LoRA rank; S²FT gets the same number of values
    switch_presets: list[str] = field(default_factory=lambda: ["llama2-7b:bf16"])  # NAME[@LAYERS][:DTYPE]
    warmup: int = 3  # untimed switches (first block only)
    rounds: int = 30  # timed switches per system
    blocks: int = 3  # the rounds are split into this many interleaved blocks per system
    max_seconds: float = 180.0  # per system and configuration: fewer rounds where one switch takes a minute (7B)
    adapter_counts: list[int] = field(default_factory=lambda: [1, 4, 16])
    rows: int = 16
    prompt_len: int = 32
    new_tokens: int = 32
    gen_warmup: int = 1
    gen_rounds: int = 3
    threads: int | None = None
    seed: int = 0


# ------------------------------------------------------------------------------------------------ options
def parse_model(text: str, default_dtype: str) -> dict:
    """'llama2-7b@8:bf16' -> {'preset': 'llama2-7b', 'layers': 8, 'dtype': 'bf16'} (layers None: all of them)."""
    from subtune.bench.presets import preset_config

    name, _, dtype = text.strip().partition(":")
    name, _, layers = name.partition("@")
    dtype = dtype or default_dtype
    if dtype not in DTYPES:
        raise ServeBenchError(f"switch preset {text!r}: dtype {dtype!r} is not one of {sorted(DTYPES)}; write it "
                              "as NAME[@LAYERS][:fp32|bf16], e.g. llama2-7b:bf16")
    if layers and (not layers.isdigit() or int(layers) < 1):
        raise ServeBenchError(f"switch preset {text!r}: @{layers} must be a positive number of layers, e.g. "
                              "llama2-7b@8:fp32 (8 layers of the real 7B shapes)")
    preset_config(name)  # an unknown preset fails here, before any run
    return {"preset": name, "layers": int(layers) if layers else None, "dtype": dtype}


def check_spec(spec: ServeBenchSpec) -> None:
    """Every option checked before the first job starts (a bad one would only fail a job later)."""
    from subtune.bench.presets import preset_config

    preset_config(spec.preset)
    if spec.dtype not in DTYPES or spec.device not in ("cpu", "cuda"):
        raise ServeBenchError(f"dtype must be one of {sorted(DTYPES)} and device cpu or cuda, got {spec.dtype!r} "
                              f"and {spec.device!r}")
    for name in ("rank", "rounds", "blocks", "rows", "prompt_len", "new_tokens", "gen_rounds"):
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ServeBenchError(f"{name} must be a positive int, got {value!r}")
    if isinstance(spec.max_seconds, bool) or not isinstance(spec.max_seconds, (int, float)) or \
            not spec.max_seconds > 0:
        raise ServeBenchError(f"max_seconds must be a positive number, got {spec.max_seconds!r}")
    for name in ("warmup", "gen_warmup"):
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ServeBenchError(f"{name} must be an int >= 0, got {value!r}")
    bad_widths = [w for w in spec.widths if isinstance(w, bool) or not isinstance(w, int) or w < 2 * spec.rank]
    if bad_widths:
        raise ServeBenchError(f"widths {bad_widths} are below 2·rank = {2 * spec.rank} (the S²FT columns matched "
                              "to LoRA's values must fit in the layer); give larger widths or a smaller rank")
    bad_counts = [k for k in spec.adapter_counts if not isinstance(k, int) or not 1 <= k <= spec.rows]
    if not spec.adapter_counts or bad_counts:
        raise ServeBenchError(f"adapter counts {spec.adapter_counts} must each be in [1, rows={spec.rows}] (every "
                              "adapter needs a row of the batch); lower them or raise rows")
    if spec.threads is not None and (isinstance(spec.threads, bool) or not isinstance(spec.threads, int)
                                     or spec.threads < 1):
        raise ServeBenchError(f"threads must be a positive int or None (torch's default), got {spec.threads!r}")
    for text in spec.switch_presets:
        parse_model(text, spec.dtype)


# ------------------------------------------------------------------------------------------------ building
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _meta_parameters(config) -> int:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def _available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(meminfo["MemAvailable"].split()[0]) * 1024


def _check_memory(config, dtype: torch.dtype, device: str, copies: int, what: str) -> None:
    """Refuse a model that would not fit (on CPU: MemAvailable; this machine has no swap to fall back on)."""
    need = _meta_parameters(config) * torch.finfo(dtype).bits // 8 * copies
    free = _available_bytes(device)
    if need * 1.15 + 2**30 > free:
        raise ServeBenchError(f"{what} needs ~{need / 2**30:.1f} GiB for its weights but {free / 2**30:.1f} GiB are "
                              "available; use bf16 (NAME:bf16) or fewer layers of the same shapes (NAME@8:bf16)")


def _build(config, dtype: torch.dtype, device: str):
    """A random-init LlamaForCausalLM built directly in `dtype` (a 7B model never exists in fp32 on the way)."""
    from transformers import LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = None  # every row generates exactly new_tokens (checked)
    model.generation_config.pad_token_id = 0
    return model


def _layer_config(width: int):
    """One LLaMA layer of hidden `width`: its o_proj is the square width × width layer; the rest is small."""
    from transformers import LlamaConfig

    head_dim = min(128, width)
    return LlamaConfig(vocab_size=64, hidden_size=width, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=width // head_dim, num_key_value_heads=1, head_dim=head_dim,
                       max_position_embeddings=64, tie_word_embeddings=False)


def _preset_model_config(preset: str, layers: int | None):
    from subtune.bench.presets import preset_config

    config = preset_config(preset)
    if layers:
        config.num_hidden_layers = layers
    return config


def _budget(config, rank: int) -> int:
    from subtune.methods.lora.method import _lora_params_per_rank

    return rank * _lora_params_per_rank(config, LORA_TARGETS)


def s2ft_deltas(model, budget: int, seed: int, gen: torch.Generator) -> dict:
    """{module path: Delta} of an S²FT adapter at `budget` values: S²FT's own selection (random heads of O, random
    channels of Down, the paper's split), random values."""
    from subtune.core.deltas import Delta
    from subtune.core.method import get_method
    from subtune.methods.s2ft import S2FTConfig
    from subtune.methods.s2ft.method import _expand
    from subtune.ops.sliced import INPUT_COLUMNS

    method = get_method(S2FTConfig.method)
    config = method.config_for_budget(model.config, budget)
    config.seed = seed
    modules = dict(model.named_modules())
    deltas = {}
    for path, comp, units in method._targets(model, method.select(model, config, None)):
        index = _expand(units, comp.unit_size)
        out, inp = modules[path].weight.shape
        columns = comp.kind == INPUT_COLUMNS
        values = torch.randn((out, index.numel()) if columns else (index.numel(), inp), generator=gen) * STD
        deltas[path] = (Delta.columns if columns else Delta.rows)(index, values, (out, inp))
    return deltas


def peft_lora(model, targets: list[str], rank: int, names: list[str], gen: torch.Generator):
    """PEFT LoRA adapters `names` (r = rank, alpha = rank, no dropout) on `model`, in place, with random A and B."""
    import warnings

    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, config, adapter_name=names[0])
        for name in names[1:]:
            wrapped.add_adapter(name, config)
    with torch.no_grad():
        for pname, p in wrapped.named_parameters():
            if "lora_A" in pname or "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * STD)
    wrapped.eval()
    return wrapped


def _lora_values(wrapped, name: str) -> int:
    return sum(p.numel() for n, p in wrapped.named_parameters() if f".{name}." in n and "lora_" in n)


# ------------------------------------------------------------------------------------------------ switching
@dataclass
class Switcher:
    """How a system merges its first adapter (enter), switches to another (switch), and goes back to the base."""
    enter: Callable[[str], None]
    switch: Callable[[str], None]
    leave: Callable[[], None]


def subtune_switcher(store) -> Switcher:
    return Switcher(store.activate, store.activate, lambda: store.activate(None))


def peft_switcher(wrapped) -> Switcher:
    tuner = wrapped.base_model

    def switch(name):
        tuner.unmerge_adapter()
        tuner.merge_adapter(adapter_names=[name])

    return Switcher(lambda name: tuner.merge_adapter(adapter_names=[name]), switch, tuner.unmerge_adapter)


def _stats(times: list[float], cpu: list[float]) -> dict:
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times),
            "cpu_median_ms": 1e3 * statistics.median(cpu), "rounds": len(times)}


def _checked_weights(modules: dict, paths: list[str]) -> dict[str, torch.Tensor]:
    """The weights to compare after the switches: all touched ones, or an evenly spread sample above CHECK_BYTES."""
    weights = {p: modules[p].weight for p in sorted(set(paths))}
    total = sum(w.numel() * w.element_size() for w in weights.values())
    if total > CHECK_BYTES:
        keys = list(weights)
        keys = sorted({keys[round(i * (len(keys) - 1) / 7)] for i in range(8)})
        weights = {k: weights[k] for k in keys}
    return weights


def _switch_block(system: Switcher, names: tuple[str, str], warmup: int, rounds: int, seconds: float,
                  device: str) -> tuple[list[float], list[float]]:
    """From the base: enter a, then switch b, a, b, …: `warmup` untimed switches, then up to `rounds` timed ones;
    each phase stops early once it has used `seconds` (after at least one switch), so a 7B model's minute-long PEFT
    switches still end in minutes. Back on the base at the end. Returns (wall, CPU) seconds of the timed switches."""
    walls, cpus, count = [], [], 0
    system.enter(names[0])
    for timed, limit in ((False, warmup), (True, rounds)):
        spent = 0.0
        for _ in range(limit):
            if spent > seconds:
                break
            count += 1
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            system.switch(names[count % 2])
            _sync(device)
            spent += time.perf_counter() - start
            if timed:
                walls.append(time.perf_counter() - start)
                cpus.append(time.process_time() - cpu_start)
    system.leave()
    return walls, cpus


def time_switches(systems: dict[str, Switcher], names: tuple[str, str], checked: dict[str, torch.Tensor],
                  spec: dict) -> dict[str, dict]:
    """Median switch time of each system, measured in interleaved blocks (each system's share of the rounds and
    of `max_seconds` per block, in turn); after each block the system is back on the base, whose checked weights are
    compared with a snapshot taken before the block (bit for bit, and the largest difference)."""
    times = {key: ([], []) for key in systems}
    exact = dict.fromkeys(systems, True)
    drift = dict.fromkeys(systems, 0.0)
    blocks = min(spec["blocks"], spec["rounds"])
    seconds = spec["max_seconds"] / blocks
    for block in range(blocks):
        rounds = spec["rounds"] // blocks + (block < spec["rounds"] % blocks)  # the rounds, spread over the blocks
        for key, system in systems.items():
            snapshot = {p: w.detach().clone() for p, w in checked.items()}
            walls, cpus = _switch_block(system, names, spec["warmup"] if block == 0 else 0, rounds, seconds,
                                        spec["device"])
            times[key][0].extend(walls)
            times[key][1].extend(cpus)
            for path, weight in checked.items():
                before = snapshot[path]
                exact[key] &= torch.equal(weight.detach().view(torch.uint8), before.view(torch.uint8))
                drift[key] = max(drift[key], float((weight.detach().float() - before.float()).abs().max()))
    return {key: {**_stats(*times[key]), "bit_exact": exact[key], "max_abs_drift": drift[key],
                  "checked_modules": len(checked)} for key in systems}


def layer_job(job: dict) -> dict:
    """Switch time of one square layer of width n: S²FT columns (k = 2r) vs LoRA rank r, equal values."""
    from subtune.core.deltas import Delta
    from subtune.serve import AdapterStore

    width, rank, device = job["width"], job["rank"], job["device"]
    dtype = DTYPES[job["dtype"]]
    gen = torch.Generator().manual_seed(job["seed"])
    model = _build(_layer_config(width), dtype, device)
    k = rank * (width + width) // width
    store = AdapterStore(model)
    for name in ("a", "b"):
        index = torch.randperm(width, generator=gen)[:k].sort().values
        store.add_deltas(name, {LAYER_PATH: Delta.columns(index, torch.randn(width, k, generator=gen) * STD,
                                                          (width, width))})
    checked = _checked_weights(dict(model.named_modules()), [LAYER_PATH])
    wrapped = peft_lora(model, ["o_proj"], rank, ["a", "b"], gen)
    result = time_switches({"subtune": subtune_switcher(store), "peft": peft_switcher(wrapped)}, ("a", "b"),
                           checked, job)
    values = {"subtune": sum(d.num_values for d in store.deltas("a").values()), "peft": _lora_values(wrapped, "a")}
    return {"width": width, "dtype": job["dtype"], "columns": k, "rank": rank, "adapter_values": values, **result,
            "speedup": result["peft"]["median_ms"] / result["subtune"]["median_ms"]}


def model_job(job: dict) -> dict:
    """Switch time of a whole model: two S²FT adapters vs two PEFT LoRA adapters of the same size."""
    from subtune.serve import AdapterStore

    device, dtype = job["device"], DTYPES[job["dtype"]]
    config = _preset_model_config(job["preset"], job.get("layers"))
    what = f"{job['preset']}{'@%d' % job['layers'] if job.get('layers') else ''} in {job['dtype']}"
    _check_memory(config, dtype, device, 1, what)
    gen = torch.Generator().manual_seed(job["seed"])
    model = _build(config, dtype, device)
    budget = _budget(config, job["rank"])
    store = AdapterStore(model)
    for i, name in enumerate(("a", "b")):
        store.add_deltas(name, s2ft_deltas(model, budget, job["seed"] + i, gen))
    modules = dict(model.named_modules())
    lora_paths = [p for p, m in modules.items() if p.rsplit(".", 1)[-1] in LORA_TARGETS]
    checked = _checked_weights(modules, list(store.deltas("a")) + list(store.deltas("b")) + lora_paths)
    wrapped = peft_lora(model, LORA_TARGETS, job["rank"], ["a", "b"], gen)
    result = time_switches({"subtune": subtune_switcher(store), "peft": peft_switcher(wrapped)}, ("a", "b"),
                           checked, job)
    values = {"subtune": sum(d.num_values for d in store.deltas("a").values()), "peft": _lora_values(wrapped, "a")}
    return {"preset": job["preset"], "layers": config.num_hidden_layers, "dtype": job["dtype"],
            "parameters": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
            "adapter_values": values, "modules": {"subtune": len(store.deltas("a")), "peft": len(lora_paths)},
            **result, "speedup": result["peft"]["median_ms"] / result["subtune"]["median_ms"]}


# ------------------------------------------------------------------------------------------------ generation
def _timed(fn: Callable[[], torch.Tensor], device: str) -> tuple[float, float, torch.Tensor]:
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start, out


def _gen_stats(times: list[float], cpu: list[float], tokens: int) -> dict:
    median = statistics.median(times)
    return {"tokens_per_s": tokens / median, "median_s": median, "min_s": min(times), "max_s": max(times),
            "cpu_median_s": statistics.median(cpu), "rounds": len(times)}


def generation_job(job: dict) -> dict:
    """Tokens/s of a mixed batch over K adapters: subtune routed S²FT deltas vs PEFT mixed-batch LoRA vs the base."""
    from subtune.serve import AdapterStore

    device, dtype = job["device"], DTYPES[job["dtype"]]
    config = _preset_model_config(job["preset"], None)
    _check_memory(config, dtype, device, 2, f"generation on {job['preset']} in {job['dtype']} (two copies)")
    gen = torch.Generator().manual_seed(job["seed"])
    model = _build(config, dtype, device)
    twin = copy.deepcopy(model)  # PEFT wraps its own copy: base and subtune run the plain model's modules
    budget, most = _budget(config, job["rank"]), max(job["adapter_counts"])
    store = AdapterStore(model)
    for i in range(most):
        store.add_deltas(f"s{i}", s2ft_deltas(model, budget, job["seed"] + i, gen))
    wrapped = peft_lora(twin, LORA_TARGETS, job["rank"], [f"l{i}" for i in range(most)], gen)
    rows, new = job["rows"], job["new_tokens"]
    prompts = torch.randint(3, config.vocab_size, (rows, job["prompt_len"]), generator=gen).to(device)
    kwargs = dict(attention_mask=torch.ones_like(prompts), max_new_tokens=new, do_sample=False, use_cache=True)
    systems = {
        "base": lambda k: model.generate(input_ids=prompts, **kwargs),
        "subtune": lambda k: store.generate(prompts, [f"s{i % k}" for i in range(rows)], **kwargs),
        "peft": lambda k: wrapped.generate(input_ids=prompts, adapter_names=[f"l{i % k}" for i in range(rows)],
                                           **kwargs),
    }
    times = {(k, s): ([], []) for k in job["adapter_counts"] for s in systems}
    outputs, stacked = {}, {}
    for round_ in range(job["gen_warmup"] + job["gen_rounds"]):
        for k in job["adapter_counts"]:
            for name, run in systems.items():
                wall, cpu, out = _timed(lambda: run(k), device)
                if name == "subtune":  # the stacked values of this K's adapters, built in its first batch
                    stacked[k] = store.routing_cache_bytes
                if tuple(out.shape) != (rows, job["prompt_len"] + new):
                    raise ServeBenchError(f"{name} generated {tuple(out.shape)} for {rows} rows of "
                                          f"{job['prompt_len']} + {new} tokens; the bench needs fixed-length output")
                if round_ >= job["gen_warmup"]:
                    times[(k, name)][0].append(wall)
                    times[(k, name)][1].append(cpu)
                outputs[(k, name)] = out
    merged, merged_times = {}, []
    for i in range(most):  # the guard's reference: each adapter merged alone, the whole batch
        store.activate(f"s{i}")
        wall, _, merged[i] = _timed(lambda: model.generate(input_ids=prompts, **kwargs), device)
        merged_times.append(wall)
        store.activate(None)
    results = []
    for k in job["adapter_counts"]:
        routed, plain = outputs[(k, "subtune")], outputs[(k, "base")]
        equal = sum(torch.equal(routed[r], merged[r % k][r]) for r in range(rows))
        changed = sum(not torch.equal(routed[r], plain[r]) for r in range(rows))
        results.append({"adapters": k, **{name: _gen_stats(*times[(k, name)], rows * new) for name in systems},
                        "rows_equal_merged": equal, "rows_changed_vs_base": changed,
                        "adapter_bytes": sum(store.memory(f"s{i}") for i in range(k)),
                        "stacked_bytes": stacked[k]})
    linear_bytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                       if isinstance(m, torch.nn.Linear))
    return {"preset": job["preset"], "dtype": job["dtype"], "rows": rows, "prompt_len": job["prompt_len"],
            "base_linear_bytes": linear_bytes,
            "new_tokens": new, "adapter_values": {"subtune": sum(d.num_values for d in store.deltas("s0").values()),
                                                  "peft": _lora_values(wrapped, "l0")},
            "results": results, "merged_tokens_per_s": rows * new / statistics.median(merged_times)}


JOBS = {"layer": layer_job, "model": model_job, "generation": generation_job}


def run_job(job: dict) -> dict:
    """One configuration, in this process; the load average before and after is recorded with it."""
    torch.manual_seed(job["seed"])
    threads = torch.get_num_threads()
    torch.set_num_threads(job.get("threads") or threads)
    before = os.getloadavg()
    try:
        result = JOBS[job["job"]](job)
    finally:
        torch.set_num_threads(threads)  # in-process runs (the test) leave the caller's setting as it was
    return {"job": job["job"], **result, "loadavg": {"before": list(before), "after": list(os.getloadavg())}}


def run_job_in_fresh_process(job: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "subtune.bench.serve", json.dumps(job)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"job": job["job"], "error": " | ".join(tail) or f"exit code {proc.returncode}"}
    return json.loads(lines[-1])


def plan_jobs(spec: ServeBenchSpec) -> list[dict]:
    common = {k: v for k, v in asdict(spec).items() if k not in ("widths", "switch_presets")}
    jobs = [{**common, "job": "layer", "width": w} for w in spec.widths]
    for text in [spec.preset] + list(spec.switch_presets):
        jobs.append({**common, "job": "model", **parse_model(text, spec.dtype)})
    jobs.append({**common, "job": "generation"})
    return jobs


def _describe(job: dict) -> str:
    if job["job"] == "layer":
        return f"switch, layer {job['width']}"
    if job["job"] == "model":
        return f"switch, {job['preset']}{'@%d' % job['layers'] if job.get('layers') else ''} {job['dtype']}"
    return f"generation, {job['preset']}"


def run_serve_bench(spec: ServeBenchSpec, progress: bool = True, fresh_processes: bool = True) -> dict:
    """Every job of the serving bench; `fresh_processes=False` runs them here (the test does, to stay fast)."""
    import transformers
    from tqdm.auto import tqdm

    check_spec(spec)
    jobs = plan_jobs(spec)
    results = []
    bar = tqdm(jobs, desc="bench --serve", disable=not progress)
    for job in bar:
        bar.set_postfix_str(_describe(job))
        if fresh_processes:
            result = run_job_in_fresh_process(job)
        else:
            try:
                result = run_job(job)
            except ServeBenchError as e:
                result = {"job": job["job"], "error": str(e)}
        result.setdefault("label", _describe(job))
        results.append(result)
        if progress:
            tqdm.write(f"  {result['label']}: " + (result["error"] if "error" in result else _summary(result)))
    report = {"spec": asdict(spec), "layers": [r for r in results if r["job"] == "layer"],
              "models": [r for r in results if r["job"] == "model"],
              "generation": next((r for r in results if r["job"] == "generation"), None),
              "environment": {"python": platform.python_version(), "torch": torch.__version__,
                              "transformers": transformers.__version__, "peft": _peft_version(),
                              "machine": platform.machine(), "cpus": os.cpu_count(), "platform": platform.platform(),
                              "threads": spec.threads or torch.get_num_threads()}}
    report["targets"] = check_targets(report)
    return report


def _peft_version() -> str:
    import peft

    return peft.__version__


def _summary(r: dict) -> str:
    if r["job"] == "generation":
        return "; ".join(f"K={x['adapters']}: base {x['base']['tokens_per_s']:.0f}, subtune "
                         f"{x['subtune']['tokens_per_s']:.0f}, peft {x['peft']['tokens_per_s']:.0f} tok/s"
                         for x in r["results"])
    return (f"subtune {r['subtune']['median_ms']:.3f} ms, peft {r['peft']['median_ms']:.3f} ms "
            f"({r['speedup']:.1f}×)")


# ------------------------------------------------------------------------------------------------ targets
def check_targets(report: dict) -> list[dict]:
    """The issue's targets, each with the figure it was judged on and whether it was met (None: not measured)."""
    out = []
    wide = [r for r in report["layers"] if "error" not in r and r["width"] >= TARGETS["switch_min_width"]]
    if wide:
        worst = min(wide, key=lambda r: r["speedup"])
        out.append({"target": f"switch >= {TARGETS['switch_speedup']:.0f}x faster than PEFT merge/unmerge at width "
                              f">= {TARGETS['switch_min_width']}", "value": f"{worst['speedup']:.1f}x at width "
                              f"{worst['width']} (the lowest)", "met": worst["speedup"] >= TARGETS["switch_speedup"]})
    generation = report["generation"]
    if generation and "error" not in generation:
        for row in generation["results"]:
            k, sub = row["adapters"], row["subtune"]["tokens_per_s"]
            if k in (4, 16):
                peft_ = row["peft"]["tokens_per_s"]
                out.append({"target": f"mixed batch faster than PEFT mixed-batch LoRA at K = {k}",
                            "value": f"{sub / peft_:.2f}x PEFT's tokens/s", "met": sub > peft_})
            if k == 16:
                base = row["base"]["tokens_per_s"]
                out.append({"target": f"mixed batch >= {TARGETS['vs_base_at_16']}x the base's tokens/s at K = 16",
                            "value": f"{sub / base:.2f}x", "met": sub >= TARGETS["vs_base_at_16"] * base})
            out.append({"target": f"routed tokens equal each adapter merged alone, K = {k}",
                        "value": f"{row['rows_equal_merged']}/{generation['rows']} rows",
                        "met": row["rows_equal_merged"] == generation["rows"]})
    return out


def guard_failures(report: dict) -> list[str]:
    """What makes the bench's figures untrustworthy: routed tokens that differ from the merged adapter, a subtune
    switch that did not restore the base bit for bit, or a job that failed."""
    problems = [f"{r.get('label', r['job'])}: {r['error']}" for r in report["layers"] + report["models"] +
                [report["generation"] or {"job": "generation", "error": "missing"}] if "error" in r]
    problems += [f"{r['label']}: subtune switch did not restore the base bit for bit"
                 for r in report["layers"] + report["models"] if "error" not in r and not r["subtune"]["bit_exact"]]
    problems += [f"{t['target']}: {t['value']}" for t in report["targets"] if t["target"].startswith("routed")
                 and not t["met"]]
    return problems


# ------------------------------------------------------------------------------------------------ outputs
def _ms(s: dict) -> str:
    return f"{s['median_ms']:.3f} [{s['min_ms']:.3f}–{s['max_ms']:.3f}]"


def _drift(s: dict) -> str:
    return "bit for bit" if s["bit_exact"] else f"max drift {s['max_abs_drift']:.1e}"


def markdown_table(report: dict) -> str:
    spec = report["spec"]
    lines = [f"device {spec['device']}, {report['environment']['threads']} threads; switch: {spec['warmup']} warm-up "
             f"switches, then {spec['rounds']} timed per system in {spec['blocks']} interleaved blocks (fewer where a "
             f"system's switches pass {spec['max_seconds']:.0f} s), median [min–max]; LoRA "
             f"r = {spec['rank']} vs S²FT at equal adapter values", "",
             "**Switch time, one square layer** (S²FT k = 2r columns vs LoRA rank r)", "",
             "| width | dtype | adapter values (S²FT / LoRA) | subtune activate a→b (ms) | PEFT unmerge+merge (ms) | "
             "speed-up | rounds | base after switches (subtune / PEFT) | load avg |",
             "|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for r in report["layers"]:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:100]} | | | | | | | |")
            continue
        v = r["adapter_values"]
        lines.append(f"| {r['width']} | {r['dtype']} | {v['subtune']:,} / {v['peft']:,} | {_ms(r['subtune'])} | "
                     f"{_ms(r['peft'])} | {r['speedup']:.1f}× | {_rounds(r)} | {_drift(r['subtune'])} / "
                     f"{_drift(r['peft'])} | "
                     f"{_load(r)} |")
    lines += ["", "**Switch time, whole model** (S²FT on O heads + Down channels vs LoRA on q, k, v, up, down)", "",
              "| model | layers | dtype | adapter values (S²FT / LoRA) | modules touched (S²FT / LoRA) | "
              "subtune (ms) | PEFT (ms) | speed-up | rounds | base after switches (subtune / PEFT) | load avg |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in report["models"]:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:100]} | | | | | | | | | |")
            continue
        v, m = r["adapter_values"], r["modules"]
        lines.append(f"| {r['preset']} | {r['layers']} | {r['dtype']} | {v['subtune']:,} / {v['peft']:,} | "
                     f"{m['subtune']} / {m['peft']} | {_ms(r['subtune'])} | {_ms(r['peft'])} | {r['speedup']:.1f}× | "
                     f"{_rounds(r)} | "
                     f"{_drift(r['subtune'])} / {_drift(r['peft'])} | {_load(r)} |")
    lines += ["", *_generation_table(report["generation"]), "", "**Targets**", ""]
    lines += [f"- {'met' if t['met'] else 'MISSED'}: {t['target']} ({t['value']})" for t in report["targets"]]
    return "\n".join(lines)


def _rounds(r: dict) -> str:
    return f"{r['subtune']['rounds']} / {r['peft']['rounds']}"


def _load(r: dict) -> str:
    return f"{r['loadavg']['before'][0]:.1f}→{r['loadavg']['after'][0]:.1f}"


def _generation_table(g: dict | None) -> list[str]:
    if not g:
        return ["**Generation**: not run"]
    if "error" in g:
        return [f"**Generation**: failed: {g['error']}"]
    v = g["adapter_values"]
    lines = [f"**Generation, mixed batch** (`{g['preset']}`, {g['dtype']}, {g['rows']} rows × {g['prompt_len']} "
             f"prompt tokens, {g['new_tokens']} greedy new tokens with the KV cache, row i → adapter i mod K; "
             f"adapter values S²FT {v['subtune']:,} / LoRA {v['peft']:,}; median of "
             f"{g['results'][0]['base']['rounds']} rounds, every round runs every system; load avg {_load(g)})", "",
             "| K adapters | base tok/s | subtune routed tok/s | PEFT `adapter_names=` tok/s | subtune / base | "
             "subtune / PEFT | PEFT / base | routed = merged (rows) | rows changed vs base | adapter bytes per step "
             "(vs base Linears) | stacked copy |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in g["results"]:
        b, s, p = (r[k]["tokens_per_s"] for k in ("base", "subtune", "peft"))
        lines.append(f"| {r['adapters']} | {b:.0f} | {s:.0f} | {p:.0f} | {s / b:.2f}× | {s / p:.2f}× | {p / b:.2f}× | "
                     f"{r['rows_equal_merged']}/{g['rows']} | {r['rows_changed_vs_base']}/{g['rows']} | "
                     f"{_bytes_per_step(r, g)} | {_mib(r.get('stacked_bytes'))} |")
    lines += ["", f"One adapter merged by `activate` (the guard's reference runs): {g['merged_tokens_per_s']:.0f} "
                  "tok/s, the base's own cost."]
    return lines


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.1f} MiB"


def _bytes_per_step(r: dict, g: dict) -> str:
    """What a decode step reads of the K adapters (each distinct adapter once) next to the base's Linear weights."""
    if "adapter_bytes" not in r or not g.get("base_linear_bytes"):
        return "–"
    return f"{_mib(r['adapter_bytes'])} ({r['adapter_bytes'] / g['base_linear_bytes']:.1%})"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    layers = [r for r in report["layers"] if "error" not in r]
    ax = axes[0]
    for key, label, color in (("peft", "PEFT LoRA unmerge+merge", "#c44e52"), ("subtune", "subtune activate",
                                                                              "#3b6ea8")):
        ax.plot([r["width"] for r in layers], [r[key]["median_ms"] for r in layers], "o-", color=color, label=label)
    ax.set(xscale="log", yscale="log", xlabel="layer width (square)", ylabel="switch time, ms (median)",
           title="switch, one layer")
    ax.set_xticks([r["width"] for r in layers], [str(r["width"]) for r in layers])
    ax.legend(fontsize=8)
    models = [r for r in report["models"] if "error" not in r]
    ax = axes[1]
    xs = range(len(models))
    ax.bar([x - 0.2 for x in xs], [r["subtune"]["median_ms"] for r in models], 0.4, color="#3b6ea8",
           label="subtune")
    ax.bar([x + 0.2 for x in xs], [r["peft"]["median_ms"] for r in models], 0.4, color="#c44e52", label="PEFT")
    ax.set_xticks(list(xs), [f"{r['preset']}\n{r['layers']} layers {r['dtype']}" for r in models], fontsize=8)
    ax.set(yscale="log", ylabel="switch time, ms (median)", title="switch, whole model")
    ax.legend(fontsize=8)
    ax = axes[2]
    g = report["generation"]
    if g and "error" not in g:
        ks = [r["adapters"] for r in g["results"]]
        for j, (key, label, color) in enumerate((("base", "base alone", "#999999"), ("subtune", "subtune routed",
                                                 "#3b6ea8"), ("peft", "PEFT adapter_names", "#c44e52"))):
            ax.bar([i + (j - 1) * 0.27 for i in range(len(ks))], [r[key]["tokens_per_s"] for r in g["results"]],
                   0.27, color=color, label=label)
        ax.set_xticks(range(len(ks)), [f"K = {k}" for k in ks])
        ax.set(ylabel="tokens / s (median)", title=f"mixed-batch generation, {g['preset']}, {g['rows']} rows")
        top = max(r[key]["tokens_per_s"] for r in g["results"] for key in ("base", "subtune", "peft"))
        ax.set_ylim(0, top * 1.3)  # room for the legend above the bars
        ax.legend(fontsize=8, ncol=3, loc="upper center")
    spec = report["spec"]
    fig.suptitle(f"subtune bench --serve · {spec['device']} · LoRA r={spec['rank']} vs S²FT at equal values")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    spec = report["spec"]
    stem = f"bench-serve-{spec['preset'].replace('/', '_')}-{spec['dtype']}-{spec['device']}"
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(markdown_table(report) + "\n")
    plot(report, paths["png"])
    return paths


def main(argv: list[str]) -> None:
    job = json.loads(argv[0])
    try:
        result = run_job(job)
    except ServeBenchError as e:  # a configuration that cannot run here (e.g. too large): its row says why
        result = {"job": job["job"], "error": str(e)}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
