"""What the gradient-method claims share: the embedded model and task, one fine-tuning run per (arm, seed), and the
measurements (test accuracy by generation, loss on held-out pretraining text).

Every arm trains through `recipes.finetune` (the path `subtune train` takes) on a fresh copy of the embedded model,
with the learning rate of its method's `demo` settings (tuned on the embedded commonsense task) and the final
weights: nothing is selected on the test split, and nothing is re-tuned per claim.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from subtune.core import api
from subtune.core.config import MethodConfig
from subtune.core.method import get_method

TASK = "commonsense"
HELDOUT_DOC_SEED = 1001  # pretraining and corpus calibration read the document stream of seed 1; this one is unseen


@dataclass(frozen=True)
class Setting:
    """The size of a claim's runs: optimizer steps and batch per arm, test questions, held-out corpus windows."""

    steps: int
    batch_size: int
    test_limit: int | None
    corpus_windows: int = 16
    corpus_seq: int = 256


SMOKE_ENV = "SUBTUNE_REPRO_SMOKE"  # "1": --quick shrinks further (2 steps, 8 questions) so a test runs in seconds
SMOKE = Setting(steps=2, batch_size=4, test_limit=8, corpus_windows=8)


def pick_setting(quick: bool, full: Setting, quick_setting: Setting) -> Setting:
    """The full, quick, or (quick with SUBTUNE_REPRO_SMOKE=1, for the test suite) smoke setting."""
    if not quick:
        return full
    return SMOKE if os.environ.get(SMOKE_ENV) == "1" else quick_setting


@dataclass
class Arm:
    """One configuration of a claim: a table label, its config for a seed, and its learning rate."""

    label: str
    config: Callable[[int], MethodConfig]
    lr: float
    steps_factor: float = 1.0


@dataclass
class Context:
    """The shared pieces of a claim's runs, loaded once."""

    base: torch.nn.Module
    tokenizer: object
    train: list[dict]
    test: list[dict]
    corpus: list[dict]
    base_corpus_loss: float
    setting: Setting


def demo_lr(config_class: type[MethodConfig]) -> float:
    """The method's `demo` learning rate (the one tuned on the embedded commonsense task)."""
    method = get_method(config_class.method)
    return float(method.demo["lr"]) if method.demo else float(method.default_lr)


def demo_overrides(config_class: type[MethodConfig]) -> dict:
    """The method's `demo` config fields ({} when it has none)."""
    method = get_method(config_class.method)
    return dict((method.demo or {}).get("config") or {})


def budget_config(config_class: type[MethodConfig], model_config, trainable: int, **fields) -> MethodConfig:
    """The method's own `config_for_budget` at `trainable` values, with `fields` replaced."""
    config = get_method(config_class.method).config_for_budget(model_config, trainable)
    return dataclasses.replace(config, **fields) if fields else config


def heldout_corpus(tokenizer, windows: int, seq: int) -> list[dict]:
    """`windows` batches of `seq` tokens of pretraining-style text from a document stream neither pretraining nor
    SensZOQ's corpus calibration read (same world and facts, new documents)."""
    from subtune.zoo import world as W

    world, stream, num_docs = W.build_world(seed=0), [], max(8, windows * seq // 100)
    while len(stream) < windows * seq:
        docs = W.corpus_documents(world, num_docs=num_docs, seed=HELDOUT_DOC_SEED)
        stream = [i for doc in docs for i in tokenizer(doc + "\n", add_special_tokens=False).input_ids]
        num_docs *= 2
    ids = torch.tensor(stream[:windows * seq]).view(windows, seq)
    return [{"input_ids": ids[i:i + 8], "labels": ids[i:i + 8]} for i in range(0, windows, 8)]


@torch.no_grad()
def corpus_loss(model, batches: list[dict]) -> float:
    """Mean next-token loss over the held-out corpus batches (eval mode; the mode is restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = sum(float(model(**{k: v.to(device) for k, v in b.items()}).loss) for b in batches)
    model.train(was_training)
    return total / len(batches)


def accuracy(model, tokenizer, records: list[dict]) -> float:
    """Test accuracy in percent, by greedy generation and answer extraction (`subtune eval`'s metric)."""
    from subtune.eval.evaluate import evaluate

    return 100.0 * evaluate(model, tokenizer, records, with_perplexity=False, progress=False).accuracy


def load_context(setting: Setting) -> Context:
    from subtune.data.loaders import load_records
    from subtune.zoo import load_model

    base, tokenizer = load_model("default")
    test = load_records(TASK, "test", need_answer=True)[:setting.test_limit]
    corpus = heldout_corpus(tokenizer, setting.corpus_windows, setting.corpus_seq)
    return Context(base, tokenizer, load_records(TASK, "train"), test, corpus, corpus_loss(base, corpus), setting)


def train_arm(ctx: Context, arm: Arm, seed: int) -> tuple[torch.nn.Module, float]:
    """Fine-tune a copy of the base for one (arm, seed); returns (trained model, training seconds)."""
    from subtune.recipes import finetune

    model = copy.deepcopy(ctx.base)
    steps = max(1, round(ctx.setting.steps * arm.steps_factor))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="subtune-repro-") as tmp:
        finetune(model, ctx.tokenizer, arm.config(seed), ctx.train, Path(tmp), seed=seed, max_steps=steps,
                 learning_rate=arm.lr, batch_size=ctx.setting.batch_size, logging_steps=max(steps, 1),
                 save_strategy="no", progress=False)
    return model, time.perf_counter() - start


def answer_loss(model, tokenizer, records: list[dict]) -> float | None:
    """Mean token loss of the reference answers given their prompts (log of `subtune eval`'s perplexity): a
    continuous view of what accuracy rounds off; None if it is not finite."""
    from subtune.eval.evaluate import perplexity

    ppl = perplexity(model, tokenizer, records)
    return math.log(ppl) if ppl is not None and math.isfinite(ppl) and ppl > 0 else None


def measure(ctx: Context, model) -> dict:
    """The metrics every gradient claim reports for a trained model."""
    loss = corpus_loss(model, ctx.corpus)
    summary = api.trainable_summary(model)
    return {"test_acc": accuracy(model, ctx.tokenizer, ctx.test),
            "test_answer_loss": answer_loss(model, ctx.tokenizer, ctx.test), "trainable": summary.trainable,
            "corpus_loss_rise": loss - ctx.base_corpus_loss if math.isfinite(loss) else None}


def zero_shot_row(ctx: Context) -> dict:
    """The untouched model (deterministic: one row)."""
    return {"arm": "zero-shot", "seed": 0, "test_acc": accuracy(ctx.base, ctx.tokenizer, ctx.test),
            "test_answer_loss": answer_loss(ctx.base, ctx.tokenizer, ctx.test), "trainable": 0,
            "corpus_loss_rise": 0.0, "train_s": 0.0}


def run_arms(ctx: Context, arms: list[Arm], seeds: list[int], progress: Callable[[str], None],
             extra: Callable[[Arm, int, torch.nn.Module], dict] | None = None) -> list[dict]:
    """One row per (arm, seed): `measure` plus training seconds (plus `extra(arm, seed, model)` if given)."""
    rows = []
    total, start = len(arms) * len(seeds), time.perf_counter()
    for seed in seeds:
        for arm in arms:
            model, seconds = train_arm(ctx, arm, seed)
            row = {"arm": arm.label, "seed": seed, **measure(ctx, model), "train_s": round(seconds, 1)}
            if extra is not None:
                row.update(extra(arm, seed, model))
            rows.append(row)
            rise = row["corpus_loss_rise"]
            progress(f"{len(rows)}/{total} {arm.label} seed {seed}: test acc {row['test_acc']:.1f}%, corpus loss "
                     f"rise {'n/a' if rise is None else f'{rise:+.4f}'}, {seconds:.0f} s "
                     f"({time.perf_counter() - start:.0f} s so far)")
            del model
    return rows


def parity_verdict(a: list[float], b: list[float], higher_is_better: bool = True) -> tuple[str, str]:
    """"a is about as good as the reference b" (non-inferiority): "not reproduced" if b beats a by more than the
    seeds' spread (max sample std), else "reproduced"; "inconclusive" with one seed (no spread to compare with)."""
    from subtune.repro import mean_std, seed_spread_verdict

    outcome, _ = seed_spread_verdict(b, a, higher_is_better)
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    sd = lambda m, s: f"{m:.4g}" + (f" ± {s:.4g}" if s is not None else "")  # noqa: E731
    lead = (mb - ma) if higher_is_better else (ma - mb)
    evidence = f"arm {sd(ma, sa)} vs reference {sd(mb, sb)} ({len(a)} vs {len(b)} seeds); the reference leads by " \
               f"{lead:.4g}"
    if min(len(a), len(b)) < 2:
        return "inconclusive", evidence + "; one seed measures no spread"
    spread = max(sa, sb)
    evidence += f", spread max(std) {spread:.4g}: on par unless the lead exceeds the spread"
    return ("not reproduced" if outcome == "reproduced" else "reproduced"), evidence
