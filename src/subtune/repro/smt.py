"""Claim `smt`: SMT beats LoRA and DoRA at an equal budget and keeps improving as the budget grows where LoRA
plateaus; restricted to one attention matrix, V matters most (He et al., ICLR 2025, arXiv 2405.15525).

Experiment (embedded 3.7M LLaMA, task `commonsense`):
- budget sweep: three budgets equal to LoRA ranks 2, 8 and 24 on q, k, v, up, down (25,600 / 102,400 / 307,200
  values); LoRA at each and DoRA at the largest (their own `config_for_budget`), SMT at each with the same number
  of values as 32×32 blocks of Q, K and V (the `demo` block size; the default 256 is the whole hidden size here),
  chosen by the default gradient-only warm-up over 8 training batches;
- Q/K/V ablation: SMT on Q only, K only, V only, 32 blocks each (32,768 values; K and V have 64 blocks each here);
- each arm trains 20 steps of batch 8 at its method's `demo` learning rate (SMT 1e-2, LoRA/DoRA 5e-3), final
  weights, seeds 0..N-1; accuracy on the first 60 test questions by generation, plus the reference answers' loss.
Sub-claims: SMT > LoRA at each budget; SMT > DoRA at the largest; SMT gains more than LoRA from the middle to the
largest budget (per seed: accuracy(largest) - accuracy(middle)); V-only > Q-only and V-only > K-only.
Quick mode: 10 steps, 40 test questions.
"""

from __future__ import annotations

from typing import Callable

from subtune.methods.lora.config import DoraConfig, LoraConfig
from subtune.methods.smt.config import SMTConfig
from subtune.repro import Claim, ClaimResult, Verdict, arm_values, seed_spread_verdict
from subtune.repro.common import Arm, Setting, budget_config, demo_lr, demo_overrides, load_context, pick_setting, \
    run_arms, zero_shot_row

FULL = Setting(steps=20, batch_size=8, test_limit=60)
QUICK = Setting(steps=10, batch_size=8, test_limit=40, corpus_windows=8)
LORA_RANKS = (2, 8, 24)
ABLATION_BLOCKS = 32
ABLATION = {"Q": "q_proj", "K": "k_proj", "V": "v_proj"}


def smt_config(seed: int, num_blocks: int, targets: list[str] | None = None) -> SMTConfig:
    demo = demo_overrides(SMTConfig)
    fields = {"block_size": demo.get("block_size", 32), "warmup_steps": demo.get("warmup_steps", 8),
              "num_blocks": num_blocks, "seed": seed}
    return SMTConfig(**fields, **({"target_modules": targets} if targets else {}))


def per_rank_values(model_config) -> int:
    """LoRA values per unit of rank on its default targets (LaMDA's config_for_budget reads the same helper)."""
    from subtune.core.config import LORA_TARGETS
    from subtune.methods.lora.method import _lora_params_per_rank

    return _lora_params_per_rank(model_config, list(LORA_TARGETS))


def budget_label(method: str, rank: int, budget: int) -> str:
    return f"{method} @{budget // 1000}k (r{rank})"


def arms(model_config) -> tuple[list[Arm], dict]:
    """The arms, and {budget index: (SMT label, LoRA label, DoRA label)} for the verdicts."""
    smt_lr, lora_lr, dora_lr = demo_lr(SMTConfig), demo_lr(LoraConfig), demo_lr(DoraConfig)
    block = smt_config(0, 1).block_size
    out, labels = [], {}
    for i, rank in enumerate(LORA_RANKS):
        budget = rank * per_rank_values(model_config)
        names = tuple(budget_label(m, rank, budget) for m in ("SMT", "LoRA", "DoRA"))
        labels[i] = names
        out += [Arm(names[0], lambda seed, n=round(budget / block**2): smt_config(seed, n), smt_lr),
                Arm(names[1], lambda seed, b=budget: budget_config(LoraConfig, model_config, b, seed=seed), lora_lr)]
        if i == len(LORA_RANKS) - 1:  # DoRA at the largest budget only (it costs most; the plateau is LoRA's)
            out.append(Arm(names[2], lambda seed, b=budget: budget_config(DoraConfig, model_config, b, seed=seed),
                           dora_lr))
    for name, module in ABLATION.items():
        out.append(Arm(f"SMT {name} only", lambda seed, m=module: smt_config(seed, ABLATION_BLOCKS, [m]), smt_lr))
    return out, labels


def verdicts(rows: list[dict], labels: dict) -> list[Verdict]:
    acc = lambda arm: arm_values(rows, arm, "test_acc")  # noqa: E731
    out = []
    for i, rank in enumerate(LORA_RANKS):
        smt, lora, _ = labels[i]
        out.append(Verdict(f"SMT > LoRA at the r={rank} budget", *seed_spread_verdict(acc(smt), acc(lora))))
    smt_top, _, dora_top = labels[len(LORA_RANKS) - 1]
    out.append(Verdict(f"SMT > DoRA at the r={LORA_RANKS[-1]} budget",
                       *seed_spread_verdict(acc(smt_top), acc(dora_top))))
    (smt_mid, lora_mid, _), (_, lora_top, _) = labels[len(LORA_RANKS) - 2], labels[len(LORA_RANKS) - 1]
    gain = lambda top, mid: [t - m for t, m in zip(acc(top), acc(mid))]  # noqa: E731  (same seeds, same order)
    out.append(Verdict(f"SMT gains more than LoRA from r={LORA_RANKS[-2]} to r={LORA_RANKS[-1]} (LoRA plateaus)",
                       *seed_spread_verdict(gain(smt_top, smt_mid), gain(lora_top, lora_mid))))
    for other in ("Q", "K"):
        out.append(Verdict(f"V-only SMT > {other}-only SMT at {ABLATION_BLOCKS} blocks",
                           *seed_spread_verdict(acc("SMT V only"), acc(f"SMT {other} only"))))
    return out


def run(quick: bool, seeds: list[int], progress: Callable[[str], None]) -> ClaimResult:
    setting = pick_setting(quick, FULL, QUICK)
    ctx = load_context(setting)
    arm_list, labels = arms(ctx.base.config)
    progress(f"{len(arm_list)} arms x {len(seeds)} seeds; {setting.steps} steps of batch {setting.batch_size}; "
             f"{len(ctx.test)} test questions")
    rows = [zero_shot_row(ctx)] + run_arms(ctx, arm_list, seeds, progress)
    block = smt_config(0, 1).block_size
    notes = [f"Budgets: LoRA ranks {list(LORA_RANKS)} on q, k, v, up, down ({per_rank_values(ctx.base.config):,} "
             f"values per rank); SMT takes the same number of values as {block}x{block} blocks of Q/K/V (its "
             "`trainable` column counts the in-matrix entries of ragged edge blocks).",
             f"Q/K/V ablation: {ABLATION_BLOCKS} blocks each; K and V are 64x256 per layer here (GQA, 2 KV heads), "
             "so they hold 64 blocks of 32x32 in all.",
             "Learning rates: each method's demo setting (tuned on this task); final weights, no checkpoint or lr "
             "selection (no dev split is read; test is only reported).",
             "A verdict is 'reproduced' only when the difference of means exceeds the larger sample std over seeds."]
    return ClaimResult(rows=rows, verdicts=verdicts(rows, labels), notes=notes, curves={})


CLAIM = Claim(name="smt", paper="SMT (He et al., ICLR 2025, arXiv 2405.15525)",
              statement="At equal trainable budgets SMT outperforms LoRA and DoRA, and keeps improving as the budget "
                        "grows where LoRA/DoRA plateau; among Q, K and V, V matters most.",
              run=run, main_metric="test_acc")
