"""One benchmark configuration, run in a fresh process: `python -m subtune.bench.worker '<json spec>'`.

Prints one JSON line with the measurements. Kinds: a method id, or a floor:
  floor:inference        forward only, no graph
  floor:frozen_backward  forward + backward with every weight frozen and the input embeddings requiring grad
  floor:zo_two_forwards  two inference forwards (what a zeroth-order step must pay)
A method may name a phase after '@' (e.g. lamda@b_frozen: LaMDA once B is frozen).
A floor may name a method after '+' (e.g. floor:inference+senszo): it is measured on the model that method prepared
(for SensZOQ, the 4-bit base). Memory: `peak_mib` is the peak during the timed and warm-up steps above the RSS right
after the model was built (selection and warm-up transients excluded); `total_peak_mib` is the absolute peak.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Memory:
    """Peak memory above a baseline: CUDA max allocated/reserved, or CPU peak RSS (VmHWM, reset via clear_refs)."""

    def __init__(self, device: str):
        self.device = device

    def _rss(self, field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        from subtune.core.errors import BenchError

        raise BenchError(f"{field} is not in /proc/self/status, so CPU peak memory cannot be measured here (it needs "
                         "Linux); run the benchmark on Linux, or with --device cuda")

    def release_and_reset(self) -> None:
        """Return freed memory to the OS and restart the peak, keeping the post-load baseline."""
        import ctypes
        import gc

        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        # freed load-time buffers can take RSS below the post-load reading: the lower one is the true baseline
        self.base = min(self.base, self._rss("VmRSS:"))
        Path("/proc/self/clear_refs").write_text("5")

    def reset(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.base_reserved = torch.cuda.memory_reserved()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets the peak-RSS high-water mark
            self.base = self._rss("VmRSS:")

    def peak(self) -> dict[str, float]:
        mib = 2**20
        if self.device == "cuda":
            torch.cuda.synchronize()
            return {"baseline_mib": self.base / mib,
                    "peak_mib": (torch.cuda.max_memory_allocated() - self.base) / mib,
                    "peak_reserved_mib": (torch.cuda.max_memory_reserved() - self.base_reserved) / mib,
                    "total_peak_mib": torch.cuda.max_memory_allocated() / mib}
        peak = self._rss("VmHWM:")
        return {"baseline_mib": self.base / mib, "peak_mib": (peak - self.base) / mib, "total_peak_mib": peak / mib}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(spec: dict) -> dict:
    import subtune
    from subtune.bench.presets import preset_config
    from subtune.data.calibration import calibration_for
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    config = preset_config(spec["preset"])
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    if spec["grad_checkpointing"]:
        model.gradient_checkpointing_enable()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (spec["batch"], spec["seq"]), generator=gen).to(device)
    kind = spec["kind"]
    memory = Memory(device)
    memory.reset()

    optimizer, trainable = None, 0
    floor, _, prepared_with = kind.partition("+") if kind.startswith("floor:") else ("", "", kind)
    prepared_with, _, variant = prepared_with.partition("@")  # e.g. lamda@b_frozen
    if prepared_with:  # a method, or a floor measured on a model prepared by a method (e.g. the 4-bit base)
        method = subtune.get_method(prepared_with)
        method_config = method.config_for_budget(config, spec["budget"]) if spec.get("budget") else \
            method.config_class()
        calibration = calibration_for(method_config, batch={"input_ids": ids, "labels": ids})
        subtune.prepare(model, method_config, calibration=calibration)
        if variant:
            method.benchmark_variant(model, variant)
        if spec["grad_checkpointing"]:
            model.enable_input_require_grads()
        trainable = subtune.trainable_summary(model).trainable if not floor else 0
    memory.release_and_reset()  # selection/warm-up transients are not part of the step
    if floor:
        for p in model.parameters():
            p.requires_grad_(False)
        if floor == "floor:frozen_backward":
            model.enable_input_require_grads()

            def step():
                model(input_ids=ids, labels=ids).loss.backward()
        elif floor in ("floor:inference", "floor:zo_two_forwards"):
            passes = 2 if floor == "floor:zo_two_forwards" else 1

            def step():
                with torch.inference_mode():
                    for _ in range(passes):
                        model(input_ids=ids, labels=ids).loss.item()
        else:
            from subtune.core.errors import BenchError

            raise BenchError(f"unknown floor {kind!r}; the floors are floor:inference, floor:frozen_backward and "
                             "floor:zo_two_forwards (optionally +<method>)")
    elif method.zeroth_order:  # forward-only: the same SPSA step as the ZO trainer's (train/zo.py)
        from subtune.core.api import state_of
        from subtune.train.zo import zo_step

        state = state_of(model)
        seeds = list(range(state.config.directions))

        def step():
            zo_step(model, state, {"input_ids": ids, "labels": ids}, 1e-6, seeds)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.train()
    for _ in range(spec["warmup"]):
        step()
    _sync(device)
    times, cpu_times = [], []
    for _ in range(spec["steps"]):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)  # CPU seconds: immune to being descheduled
    result = {
        "kind": kind, "trainable": trainable,
        "optimizer_state_mib": (sum(t.numel() * t.element_size() for s in optimizer.state.values()
                                    for t in s.values() if torch.is_tensor(t)) / 2**20) if optimizer else 0.0,
        "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
        "cpu_median_s": statistics.median(cpu_times), "cpu_min_s": min(cpu_times),
        "tokens_per_s": spec["batch"] * spec["seq"] / statistics.median(times),
        "base_parameters": (subtune.core.api.state_of(model).base_parameters if prepared_with
                            else sum(p.numel() for p in model.parameters())),
    }
    result.update(memory.peak())
    return result


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))), flush=True)
