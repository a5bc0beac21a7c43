"""Claim `senszo`: zeroth-order tuning of the 0.1% most sensitive weights (found on pretraining text) beats a random
or magnitude mask of the same size, matches or beats full-parameter MeZO, and is faster per step in wall-clock time
(Guo et al., ICLR 2025, arXiv 2406.02913, §5: Figures 4–6 and Table 2).

Experiment (embedded 3.7M LLaMA, task `commonsense`, 4-way questions about the synthetic world), on the choice
objective the paper and MeZO train (cross-entropy over the candidates, each scored by its mean answer
log-likelihood; `subtune.train.zo.choice_loss`) and its metric, candidate-ranking accuracy:
- splits: the last `dev` training records are the dev split (never trained on), the rest train, `test` is the
  held-out test split; checkpoint and learning-rate selection read dev only;
- arms: SensZOQ with its sensitive 0.1% mask (per-sample squared gradients on 100 windows of the embedded
  pretraining corpus, the paper's C4 calibration; computed once and reused, as `subtune senszo-mask`), a random 0.1%
  mask (drawn per seed) and a magnitude 0.1% mask, each on the 4-bit NF4 base (the paper's setting) and on the
  unquantised base (magnitude: NF4 only, to fit the time budget); full-parameter MeZO (unquantised: it perturbs
  every weight);
- learning rate: a 3-point grid per arm (×10 apart), run on the first seed, extended by one point ×10 above when its
  largest lr beats the others on dev loss (so the grid brackets the best); the lr with the lowest dev loss (the
  smaller on ties) is kept and the other seeds run at it; an unquantised sparse arm trains the same values as its
  NF4 twin and reuses the twin's lr;
- every run: ZO-SGD (ε 1e-3, one direction, constant lr), batch `batch` questions, `steps` steps, dev choice loss
  and ranking accuracy every `eval_every` steps, the values of the lowest dev loss restored at the end (the paper's
  selection; possibly the untouched model), then dev and test ranking accuracy;
- zero-shot rows: the untouched fp32 model, and the NF4 model with its sensitive values unchanged (what the NF4 arms
  start from).
Sub-claims: sensitive > random and sensitive > magnitude (NF4 and unquantised), sensitive ≥ full MeZO (tested as
>), sensitive seconds per step < MeZO's; and SensZOQ improves dev and test accuracy over its zero-shot start by more
than the seeds' spread. Quick mode: 30 steps, one lr, three arms, 40 dev / 40 test questions.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from subtune.repro import Claim, ClaimResult, Verdict, arm_values, seed_spread_verdict
from subtune.repro.common import SMOKE_ENV

TASK = "commonsense"
SENSITIVE, RANDOM, MAGNITUDE, MEZO = "sensitive", "random", "magnitude", "MeZO full"
NF4_TAG, DENSE_TAG = "NF4", "fp32"


@dataclass(frozen=True)
class Setting:
    steps: int
    batch_size: int
    eval_every: int
    dev: int
    test: int | None
    grid: bool  # False: the middle lr of each grid only
    arms: tuple[str, ...]
    calibration_samples: int = 100
    fixed_lr: tuple[tuple[str, float], ...] = ()  # (arm, lr) pairs that skip the grid (a longer re-run of a choice)


# the most telling arms first (a run cut short still answers the main sub-claims)
ALL_ARMS = (f"{SENSITIVE} {NF4_TAG}", f"{RANDOM} {NF4_TAG}", MEZO, f"{MAGNITUDE} {NF4_TAG}",
            f"{SENSITIVE} {DENSE_TAG}", f"{RANDOM} {DENSE_TAG}")
FULL = Setting(steps=150, batch_size=4, eval_every=25, dev=60, test=None, grid=True, arms=ALL_ARMS)
QUICK = Setting(steps=30, batch_size=4, eval_every=10, dev=40, test=40, grid=False,
                arms=(f"{SENSITIVE} {NF4_TAG}", f"{RANDOM} {NF4_TAG}", MEZO), calibration_samples=16)
SMOKE = Setting(steps=2, batch_size=2, eval_every=1, dev=8, test=8, grid=False,
                arms=(f"{SENSITIVE} {NF4_TAG}", f"{RANDOM} {NF4_TAG}", MEZO), calibration_samples=2)
# ×10 grids around each family's scale: SPSA's variance grows with the number of perturbed values (3,028 sparse
# values vs 3.7M weights), so the sparse arms take a far larger lr than full-parameter MeZO (arXiv 2406.02913 §5)
SPARSE_GRID = (1e-3, 1e-2, 1e-1)
MEZO_GRID = (1e-6, 1e-5, 1e-4)
GRID_STEP = 10  # a grid whose largest lr wins on dev is extended by one point, GRID_STEP times larger


def top_edge_wins(tried: dict[float, "Run"]) -> bool:
    """Whether the largest lr tried beats every smaller one on dev loss (then the grid has not bracketed the best
    lr)."""
    top = max(tried)
    return all(tried[top].dev_loss < run.dev_loss for lr, run in tried.items() if lr != top)


def pick_setting(quick: bool) -> Setting:
    import os

    if not quick:
        return FULL
    return SMOKE if os.environ.get(SMOKE_ENV) == "1" else QUICK


def grid_of(arm: str, setting: Setting) -> tuple[float, ...]:
    grid = MEZO_GRID if arm == MEZO else SPARSE_GRID
    return grid if setting.grid else (grid[1],)


def config_of(arm: str, seed: int, setting: Setting, mask_path: str):
    """The method config of one arm for one seed (the choice objective is what "auto" resolves to here)."""
    from subtune.methods.senszo.config import MeZOConfig, SensZOConfig

    common = dict(seed=seed, objective="choice", dev_size=setting.dev, eval_every=setting.eval_every)
    if arm == MEZO:
        return MeZOConfig(**common)
    source, tag = arm.split(" ")
    quantize = "nf4" if tag == NF4_TAG else "none"
    if source == SENSITIVE:
        return SensZOConfig(quantize=quantize, mask_path=mask_path, **common)
    return SensZOConfig(quantize=quantize, mask_source=source, **common)


@dataclass
class Run:
    dev: float
    dev_loss: float
    test: float
    best_step: int
    step_s: float
    train_s: float
    trainable: int
    curve: list[dict]


def train_once(base, tokenizer, train: list[dict], test: list[dict], arm: str, seed: int, lr: float,
               setting: Setting, mask_path: str) -> Run:
    """One ZO run through `recipes.finetune` (the `subtune train` path) with best-dev selection; dev and test
    candidate-ranking accuracy of the restored best values."""
    from subtune.core import api
    from subtune.eval.choice import ranking_accuracy
    from subtune.recipes import finetune

    model = copy.deepcopy(base)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="subtune-repro-senszo-") as tmp:
        _, trainer = finetune(model, tokenizer, config_of(arm, seed, setting, mask_path), train, Path(tmp), seed=seed,
                              max_steps=setting.steps, learning_rate=lr, batch_size=setting.batch_size, warmup=0,
                              lr_scheduler="constant", logging_steps=setting.steps, save_strategy="no",
                              progress=False)
    wall = time.perf_counter() - start
    best = trainer.best_dev
    train_seconds = best.curve[-1]["seconds"]  # without the dev evaluations
    return Run(dev=100 * best.best["dev_ranking_accuracy"], dev_loss=best.best["dev_choice_loss"],
               test=100 * ranking_accuracy(model, tokenizer, test), best_step=best.best["step"],
               step_s=train_seconds / setting.steps, train_s=wall, trainable=api.trainable_summary(model).trainable,
               curve=best.curve)


def zero_shot_rows(base, tokenizer, dev: list[dict], test: list[dict], mask_path: str) -> list[dict]:
    """The untouched fp32 model, and the NF4 model before any step (the NF4 arms' starting point)."""
    import subtune
    from subtune.eval.choice import ranking_accuracy, ranking_metrics
    from subtune.methods.senszo.config import SensZOConfig

    nf4 = subtune.prepare(copy.deepcopy(base), SensZOConfig(mask_path=mask_path, quantize="nf4"))
    rows = []
    for label, model in (("zero-shot fp32", base), ("zero-shot NF4", nf4)):
        dev_accuracy, dev_loss = ranking_metrics(model, tokenizer, dev)
        rows.append({"arm": label, "seed": 0, "dev_rank": 100 * dev_accuracy,
                     "test_rank": 100 * ranking_accuracy(model, tokenizer, test), "dev_loss": dev_loss,
                     "best_step": 0, "lr": 0.0, "step_s": None, "trainable": 0})
    return rows


def sensitive_mask(base, tokenizer, path: Path, samples: int) -> str:
    """The sensitive mask on pretraining-corpus text, computed once (it does not depend on the seed)."""
    from subtune.methods.senszo import SensZOConfig, build_mask

    build_mask(base, SensZOConfig(calibration_samples=samples), path, tokenizer)
    return str(path)


def run(quick: bool, seeds: list[int], progress: Callable[[str], None]) -> ClaimResult:
    return run_setting(pick_setting(quick), seeds, progress)


def run_setting(setting: Setting, seeds: list[int], progress: Callable[[str], None]) -> ClaimResult:
    """Every arm of `setting` over `seeds`: its lr from the grid on the first seed (or `setting.fixed_lr`), then
    the other seeds at that lr."""
    from subtune.data.loaders import load_records
    from subtune.zoo import load_model

    base, tokenizer = load_model("default")
    train_all = load_records(TASK, "train")
    dev = train_all[-setting.dev:]  # what finetune's dev_split holds out (config dev_size)
    test = load_records(TASK, "test", need_answer=True)[:setting.test]
    rows, curves, grid_notes = [], {}, []
    with tempfile.TemporaryDirectory(prefix="subtune-repro-mask-") as tmp:
        begin = time.perf_counter()
        mask_path = sensitive_mask(base, tokenizer, Path(tmp) / "mask.safetensors", setting.calibration_samples)
        progress(f"sensitive mask on {setting.calibration_samples} corpus windows: {time.perf_counter() - begin:.0f} s")
        rows += zero_shot_rows(base, tokenizer, dev, test, mask_path)
        progress(f"zero-shot: {rows[0]['dev_rank']:.1f}% dev / {rows[0]['test_rank']:.1f}% test (fp32), "
                 f"{rows[1]['dev_rank']:.1f}% / {rows[1]['test_rank']:.1f}% (NF4)")
        chosen: dict[str, float] = {}
        for arm in setting.arms:
            tried = {}
            # an unquantised arm trains the same values as its NF4 twin: it reuses the lr the twin chose on dev
            twin = arm.replace(DENSE_TAG, NF4_TAG)
            fixed = dict(setting.fixed_lr)
            grid = list((fixed[arm],) if arm in fixed else (chosen[twin],) if twin in chosen and twin != arm
                        else grid_of(arm, setting))
            extendable = len(grid) > 1
            while grid:
                lr = grid.pop(0)
                tried[lr] = train_once(base, tokenizer, train_all, test, arm, seeds[0], lr, setting, mask_path)
                r = tried[lr]
                progress(f"{arm} lr {lr:g} seed {seeds[0]}: dev loss {r.dev_loss:.4f}, dev {r.dev:.1f}% "
                         f"(step {r.best_step}), test {r.test:.1f}%, {r.step_s:.3f} s/step")
                if not grid and extendable and top_edge_wins(tried):
                    extendable = False
                    grid.append(lr * GRID_STEP)  # the grid did not bracket the best lr: one more point above
            best_lr = chosen[arm] = min(tried, key=lambda lr: (tried[lr].dev_loss, lr))  # smaller lr on ties
            grid_notes.append(f"{arm}: " + ", ".join(f"lr {lr:g} → dev loss {r.dev_loss:.4f} ({r.dev:.1f}%)"
                                                     for lr, r in tried.items())
                              + (f" (chosen {best_lr:g})" if len(tried) > 1 else " (fixed)" if arm in fixed else
                                 " (its NF4 twin's)" if twin in chosen and twin != arm else ""))
            runs = {seeds[0]: tried[best_lr]}
            for seed in seeds[1:]:
                runs[seed] = train_once(base, tokenizer, train_all, test, arm, seed, best_lr, setting, mask_path)
                progress(f"{arm} lr {best_lr:g} seed {seed}: dev loss {runs[seed].dev_loss:.4f}, dev "
                         f"{runs[seed].dev:.1f}% (step {runs[seed].best_step}), test {runs[seed].test:.1f}%")
            for seed, r in runs.items():
                rows.append({"arm": arm, "seed": seed, "dev_rank": r.dev, "test_rank": r.test, "dev_loss": r.dev_loss,
                             "best_step": r.best_step, "lr": best_lr, "step_s": round(r.step_s, 4),
                             "trainable": r.trainable})
                curves.setdefault(arm, []).extend(
                    {"seed": seed, "step": p["step"], "seconds": p["seconds"], "metric": "dev ranking accuracy",
                     "value": 100 * p["dev_ranking_accuracy"]} for p in r.curve)
    notes = notes_for(setting, grid_notes, rows)
    return ClaimResult(rows=rows, verdicts=verdicts(rows, setting), notes=notes, curves=curves)


def verdicts(rows: list[dict], setting: Setting) -> list[Verdict]:
    present = {r["arm"] for r in rows}
    value = lambda arm, metric="test_rank": arm_values(rows, arm, metric)  # noqa: E731
    out = []
    for tag in (NF4_TAG, DENSE_TAG):
        sens = f"{SENSITIVE} {tag}"
        for other in (RANDOM, MAGNITUDE):
            if sens in present and f"{other} {tag}" in present:
                out.append(Verdict(f"sensitive mask > {other} mask ({tag} base, test ranking accuracy)",
                                   *seed_spread_verdict(value(sens), value(f"{other} {tag}"))))
    main = f"{SENSITIVE} {NF4_TAG}"
    if MEZO in present:
        out.append(Verdict("sensitive (NF4) ≥ full-parameter MeZO (tested as >, test ranking accuracy)",
                           *seed_spread_verdict(value(main), value(MEZO))))
        out.append(Verdict("wall-clock speed-up: sensitive (NF4) takes fewer seconds per step than MeZO",
                           *seed_spread_verdict(value(main, "step_s"), value(MEZO, "step_s"), higher_is_better=False)))
    start = {r["arm"]: r for r in rows}["zero-shot NF4"]
    for split, metric in (("dev", "dev_rank"), ("test", "test_rank")):
        ours = value(main, metric)
        out.append(Verdict(f"SensZOQ (NF4) improves {split} ranking accuracy over its zero-shot start "
                           f"({start[metric]:.1f}%)", *seed_spread_verdict(ours, [start[metric]] * len(ours))))
    return out


def notes_for(setting: Setting, grid_notes: list[str], rows: list[dict]) -> list[str]:
    mezo_steps = [r["step_s"] for r in rows if r["arm"] == MEZO and r["step_s"]]
    sens_steps = [r["step_s"] for r in rows if r["arm"] == f"{SENSITIVE} {NF4_TAG}" and r["step_s"]]
    notes = [f"{setting.steps} ZO steps of {setting.batch_size} questions (×4 candidates) per run, constant lr, "
             f"ε 1e-3; dev choice loss every {setting.eval_every} steps on {setting.dev} held-out training "
             "records, the values of the lowest dev loss restored (best_step 0 = no step beat the untouched model on "
             "dev loss). The paper trains 20k steps of batch 16: this is a miniature.",
             "lr grid on the first seed, chosen by dev loss: " + "; ".join(grid_notes),
             "dev_rank / test_rank: candidate-ranking accuracy in percent (the metric the choice objective "
             "optimises); dev_loss: the choice objective's mean cross-entropy on dev at the restored values; "
             "step_s: training seconds per step without the dev evaluations."]
    if mezo_steps and sens_steps:
        notes.append(f"seconds per step: sensitive NF4 {statistics.fmean(sens_steps):.3f}, MeZO "
                     f"{statistics.fmean(mezo_steps):.3f} (this CPU, shared with other jobs: wall-clock figures are "
                     "noisy). The forwards dominate both: SensZOQ perturbs 3k values, MeZO 3.7M.")
    return notes


CLAIM = Claim(name="senszo", paper="SensZOQ (Guo et al., ICLR 2025, arXiv 2406.02913)",
              statement="Zeroth-order fine-tuning of the 0.1% most sensitive weights (found once on pretraining "
                        "text) on a 4-bit base beats random and magnitude masks of the same size, matches or beats "
                        "full-parameter MeZO, and runs faster per step.",
              run=run, main_metric="test_rank")
