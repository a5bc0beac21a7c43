"""Defaults that learn (docs/DEFAULTS.md): each gradient method, with only its default config and default_lr, lowers
the answer loss of the embedded model on an embedded task; so does the README's first `subtune train` line, run
in a fresh process as a user runs it."""

import copy
import math
import os
import subprocess
import sys

import pytest

import subtune
from subtune.core.method import get_method, registered_methods
from subtune.data.loaders import load_records
from subtune.eval.evaluate import perplexity
from subtune.recipes import finetune, make_config
from subtune.zoo import load_model

GRADIENT_METHODS = ["full", "lora", "dora", "s2ft", "smt", "lamda", "lamda++"]
TEST_RECORDS = 32  # held-out answers scored before and after
MARGIN = 1.0  # nats the held-out answer loss must fall (from ~4.2; the old generic lr 2e-4 moved S²FT's by 0.03)


@pytest.fixture(scope="module")
def embedded():
    model, tokenizer = load_model("default")
    test = load_records("arithmetic", "test", need_answer=True)[:TEST_RECORDS]
    return model, tokenizer, test, answer_loss(model, tokenizer, test)


def answer_loss(model, tokenizer, records) -> float:
    """Mean token loss of the reference answers given their prompts (log perplexity), held-out records."""
    return math.log(perplexity(model, tokenizer, records))


def test_every_gradient_method_is_covered():
    zeroth_order = {m.id for m in registered_methods() if m.zeroth_order}
    assert set(GRADIENT_METHODS) == set(subtune.available_methods()) - zeroth_order


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_default_config_and_lr_lower_the_answer_loss(method, embedded, tmp_path):
    """20 steps of batch 8 at the method's default_lr and default config: the held-out answer loss falls by MARGIN
    (S²FT's default d_ratio 0.03, the fewest values here, falls by ~1.5; the others by more)."""
    base, tokenizer, test, before = embedded
    model = copy.deepcopy(base)
    train = load_records("arithmetic", "train")
    finetune(model, tokenizer, make_config(method), train, tmp_path, max_steps=20, batch_size=8,
             learning_rate=get_method(method).default_lr, save_strategy="no", progress=False)
    after = answer_loss(model, tokenizer, test)
    assert after < before - MARGIN, f"{method}: answer loss {before:.2f} -> {after:.2f}"


def test_readme_first_train_line_learns_in_a_fresh_process(embedded, tmp_path):
    """`subtune train --method s2ft --data arithmetic --max-steps 200 --d_ratio 0.05` with --max-steps 30 and no
    --lr: the adapter it writes lowers the held-out answer loss by MARGIN."""
    base, tokenizer, test, before = embedded
    run = subprocess.run([sys.executable, "-m", "subtune.cli", "train", "--method", "s2ft", "--data", "arithmetic",
                          "--max-steps", "30", "--d_ratio", "0.05", "--output", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    model = subtune.load(copy.deepcopy(base), tmp_path / "run" / "adapter")
    after = answer_loss(model, tokenizer, test)
    assert after < before - MARGIN, f"README line: answer loss {before:.2f} -> {after:.2f}"
