"""Training runs lose nothing and are never silently wrong (issue 10, training side): adapter-only checkpoints that
an unmodified HF Trainer saves and resumes, bit-identical resume after SIGKILL, partial checkpoints skipped, runs
that never clobber runs, seeded runs, a stop on divergence, and every training option checked before any work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import subtune
from conftest import CharTokenizer, make_tiny
from method_cases import CASES as METHOD_CASES
from reliability import Case, cases_param, check_case, snapshot
from subtune.core.checkpoint import trained_names
from subtune.core.errors import AdapterExistsError, CheckpointError, RunExistsError, TrainingDivergedError
from subtune.data.prompts import build_prompt
from subtune.recipes import finetune
from subtune.train import runs
from subtune.train.trainer import check_answers_fit, resolve_seed
from train_worker import RECORDS, RUNS, TRAIN, run

WORKER = Path(__file__).with_name("train_worker.py")
QUICK = {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "progress": False}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, here and in the worker: the same kernels bit for bit, and no spinning threads on a
    shared CPU (tiny models gain nothing from two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tensors_equal(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


KILLS = [("s2ft", "after", 4), ("smt", "after", 4), ("lamda", "after", 2), ("lamda", "after", 4),
         ("lora", "after", 4), ("senszo", "after", 4), ("s2ft", "during", 4)]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Every run of KILLS trained and SIGKILLed by one worker process (forking a child per run, so the imports are
    paid once); returns the folder holding their run directories, METHOD-HOW-STEP."""
    root = tmp_path_factory.mktemp("killed")
    specs = [f"{m}:{how}:{step}" for m, how, step in KILLS]
    result = subprocess.run([sys.executable, str(WORKER), str(root), *specs], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ended = dict(line.split() for line in result.stdout.splitlines())
    assert ended == {spec: str(int(signal.SIGKILL)) for spec in specs}, result.stderr[-3000:]
    return root


# -- adapter-only checkpoints -------------------------------------------------------------------------------------

def test_s2ft_checkpoint_on_the_embedded_model_is_under_1mb_plus_optimizer_state(tmp_path):
    from subtune.data.loaders import load_records
    from subtune.zoo import DEFAULT_DIR, load_model

    model, tokenizer = load_model("default")
    finetune(model, tokenizer, subtune.S2FTConfig(), load_records("arithmetic")[:8], tmp_path, max_steps=1,
             batch_size=2, save_steps=1, progress=False)
    folder = tmp_path / "checkpoint-1"
    sizes = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(sizes.values()) - sizes["optimizer.pt"] < 1_000_000, sizes
    assert sizes["optimizer.pt"] < 8 * trainable + 50_000  # AdamW's two fp32 moments of the slices, nothing more
    assert sum(sizes.values()) < (DEFAULT_DIR / "model.safetensors").stat().st_size / 10  # was 15.4 MB
    assert set(load_file(folder / "model.safetensors")) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert runs.incomplete_reason(folder) is None


def _plain_trainer(model, output: Path, max_steps: int):
    from transformers import Trainer, TrainingArguments

    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (16, 12), generator=gen)]
    args = TrainingArguments(output_dir=str(output), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=0.05, report_to="none", use_cpu=True, save_steps=2, seed=0,
                             disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=data)


def test_an_unmodified_hf_trainer_saves_and_resumes_adapter_only_checkpoints(tmp_path):
    from transformers import AutoModelForCausalLM

    config = subtune.S2FTConfig(o_ratio=0.5, d_ratio=0.3)
    model = subtune.prepare(make_tiny(0), config)
    _plain_trainer(model, tmp_path / "run", 4).train()
    folder = tmp_path / "run" / "checkpoint-2"
    assert set(load_file(folder / "model.safetensors")) == set(trained_names(model))
    assert not (folder / "config.json").exists()
    with pytest.raises((OSError, ValueError)):  # never a half-random model from a checkpoint folder
        AutoModelForCausalLM.from_pretrained(folder)

    resumed = subtune.prepare(make_tiny(0), config)
    _plain_trainer(resumed, tmp_path / "resumed", 4).train(resume_from_checkpoint=str(folder))
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    step2 = subtune.load(make_tiny(0), folder / "adapter")  # the adapter inside a checkpoint is a subtune adapter
    assert not torch.equal(step2.model.layers[0].self_attn.o_proj.delta, model.model.layers[0].self_attn.o_proj.delta)


def test_save_model_writes_the_adapter_and_unload_gives_back_hf_saving(tmp_path, batch):
    model = subtune.prepare(make_tiny(0), subtune.LoraConfig(r=4))
    trainer = _plain_trainer(model, tmp_path / "run", 2)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert set(load_file(tmp_path / "final" / "model.safetensors")) == set(trained_names(model))
    loaded = subtune.load(make_tiny(0), tmp_path / "final" / "adapter")
    ids = batch["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
        subtune.unload(model)
        merged = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "plain")  # a plain HF model again: the whole model, loadable by HF
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        assert torch.equal(LlamaForCausalLM.from_pretrained(tmp_path / "plain")(input_ids=ids).logits, merged)


@pytest.mark.parametrize("method", ["full", "mezo"])
def test_full_and_mezo_checkpoints_hold_the_model_once(method, tmp_path):
    config = METHOD_CASES[method]["config"]()
    finetune(make_tiny(0), CharTokenizer(), config, RECORDS, tmp_path, save_steps=2, **QUICK)
    folder = tmp_path / "checkpoint-2"
    assert (folder / "model.safetensors").stat().st_ino == (folder / "adapter" / "adapter.safetensors").stat().st_ino
    assert runs.incomplete_reason(folder) is None


# -- resume -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, step", [("s2ft", 4), ("smt", 4), ("lamda", 2), ("lamda", 4), ("lora", 4),
                                          ("senszo", 4)],
                         ids=["s2ft", "smt", "lamda-b-partly-frozen", "lamda-b-left-optimizer", "lora", "senszo"])
def test_sigkill_after_a_checkpoint_then_resume_is_bit_identical(method, step, killed, tmp_path):
    output = killed / f"{method}-after-{step}"
    assert runs.incomplete_reason(output / f"checkpoint-{step}") is None
    assert not (output / "adapter").exists()
    _, trainer = run(method, output, resume=True)
    assert trainer.state.global_step == TRAIN["max_steps"]
    run(method, tmp_path / "reference")
    assert tensors_equal(output / "adapter" / "adapter.safetensors",
                         tmp_path / "reference" / "adapter" / "adapter.safetensors")
    if method == "senszo":  # the ZO history (seeds, projected gradients) continues as if never interrupted
        last = f"checkpoint-{TRAIN['max_steps']}"
        history = [json.loads((d / last / "zo_history.json").read_text()) for d in (output, tmp_path / "reference")]
        assert history[0] == history[1] and len(history[0]) == TRAIN["max_steps"]


def test_a_checkpoint_killed_mid_write_is_skipped_with_a_warning(killed, tmp_path):
    output = killed / "s2ft-during-4"
    assert "no readable" in runs.incomplete_reason(output / "checkpoint-4")
    assert runs.incomplete_reason(output / "checkpoint-2") is None
    with pytest.warns(UserWarning, match="checkpoint-4 is incomplete.*resuming from checkpoint-2"):
        run("s2ft", output, resume=True)
    run("s2ft", tmp_path / "reference")
    assert tensors_equal(output / "adapter" / "adapter.safetensors",
                         tmp_path / "reference" / "adapter" / "adapter.safetensors")
    assert runs.incomplete_reason(output / "checkpoint-4") is None  # written again, whole, by the resumed run


def test_build_trainer_resume_true_takes_the_newest_complete_checkpoint(tmp_path):
    from subtune.train.trainer import build_trainer

    def trainer(output):
        model = subtune.prepare(make_tiny(0), RUNS["s2ft"]())
        return model, build_trainer(model, CharTokenizer(), RECORDS, output, max_steps=4, batch_size=4,
                                    learning_rate=1e-2, save_steps=2, progress=False)

    reference, t = trainer(tmp_path / "reference")
    t.train()
    (tmp_path / "run").mkdir()
    for step in (2, 4):
        shutil.copytree(tmp_path / "reference" / f"checkpoint-{step}", tmp_path / "run" / f"checkpoint-{step}")
    (tmp_path / "run" / "checkpoint-4" / runs.COMPLETE_FILE).unlink()  # as if killed while writing it
    resumed, t = trainer(tmp_path / "run")
    steps = []
    t.add_callback(type("Steps", (TrainerCallback,), {"on_step_end": lambda self, a, state, c, **k:
                                                       steps.append(state.global_step)}))
    with pytest.warns(UserWarning, match="checkpoint-4 is incomplete"):
        t.train(resume_from_checkpoint=True)
    assert steps == [3, 4]  # resumed from checkpoint-2
    for (name, p), q in zip(reference.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


# -- seeds --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("row", sorted(METHOD_CASES))
def test_two_seeded_runs_write_byte_identical_adapters(row, tmp_path):
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(1000 + i)  # each run starts from another global RNG state: the seed must reset them all
        finetune(make_tiny(0), CharTokenizer(), METHOD_CASES[row]["config"](), RECORDS, tmp_path / name, seed=3,
                 save_strategy="no", **QUICK)
    for file in ("adapter.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / "adapter" / file).read_bytes() == (tmp_path / "b" / "adapter" / file).read_bytes()
    assert json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text())["config"]["seed"] == 3


def test_the_seed_changes_a_random_init_and_an_explicit_config_seed_wins(tmp_path):
    for seed in (3, 4):
        finetune(make_tiny(0), CharTokenizer(), subtune.LoraConfig(r=4), RECORDS, tmp_path / str(seed), seed=seed,
                 save_strategy="no", **QUICK)
    assert not tensors_equal(tmp_path / "3" / "adapter" / "adapter.safetensors",
                             tmp_path / "4" / "adapter" / "adapter.safetensors")
    assert resolve_seed(subtune.S2FTConfig(seed=5), 3)[0].seed == 5
    assert resolve_seed(subtune.S2FTConfig(), 3)[0].seed == 3
    assert resolve_seed(subtune.S2FTConfig(seed=5), None) == (subtune.S2FTConfig(seed=5), 5)


# -- divergence ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, lr", [(lambda: subtune.LoraConfig(r=4), 1e6),
                                        (lambda: subtune.SensZOConfig(density=0.05, quantize="none",
                                                                      mask_source="magnitude"), 1e30)],
                         ids=["lora", "senszo-zo"])
def test_divergence_stops_before_any_nan_is_saved_and_keeps_the_last_good_checkpoint(config, lr, tmp_path):
    with pytest.raises(TrainingDivergedError, match=r"diverged at step (\d+).*Lower the learning rate") as info:
        finetune(make_tiny(0), CharTokenizer(), config(), RECORDS, tmp_path, max_steps=20, batch_size=4,
                 learning_rate=lr, save_steps=1, progress=False)
    step = int(str(info.value).split("step ")[1].split(":")[0])
    saved = runs.checkpoints(tmp_path)
    assert [s for s, _ in saved] == [step - 2, step - 1][-len(saved):] and saved  # save_total_limit 2
    assert str(saved[-1][1]) in str(info.value)
    assert not (tmp_path / "adapter").exists()
    for _, folder in saved:
        assert runs.incomplete_reason(folder) is None
        values = load_file(folder / "model.safetensors")
        assert all(torch.isfinite(v).all() for v in values.values())


def test_cli_divergence_is_one_line_and_a_failing_exit_code(tmp_path):
    from click.testing import CliRunner

    from subtune.cli import main

    result = CliRunner().invoke(main, ["train", "--method", "lora", "--lr", "1e6", "--max-steps", "10",
                                       "--batch-size", "4", "--save-steps", "100", "--output", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "training diverged at step" in result.output and "--lr" in result.output
    assert not (tmp_path / "adapter").exists()


# -- runs never clobber runs ---------------------------------------------------------------------------------------

def test_cli_refuses_another_run_and_overwrite_replaces_it(tmp_path):
    from click.testing import CliRunner

    from subtune.cli import main

    def train(*extra):
        return CliRunner().invoke(main, ["train", "--max-steps", "1", "--batch-size", "2", "--save-steps", "1",
                                         "--output", str(tmp_path), *extra])

    assert train("--method", "s2ft").exit_code == 0
    before = snapshot(tmp_path)
    refused = train("--method", "lora")
    assert refused.exit_code != 0 and "--overwrite" in refused.output and snapshot(tmp_path) == before
    assert train("--method", "lora", "--overwrite").exit_code == 0
    for folder in (tmp_path / "adapter", *[p / "adapter" for _, p in runs.checkpoints(tmp_path)]):
        assert json.loads((folder / "adapter_config.json").read_text())["method"] == "lora"


def test_max_length_cutting_some_answers_warns_with_the_count():
    records = [{"instruction": "q" * (40 if i < 3 else 5), "output": "answer"} for i in range(16)]
    tokenizer = CharTokenizer()
    longest = 1 + len(tokenizer(build_prompt("q" * 40, "")).input_ids) + 6 + 1
    with pytest.warns(UserWarning, match=f"cuts the answer of 3 of 16 records .* to {longest}"):
        check_answers_fit(tokenizer, records, longest - 3)


# -- the bad-input catalogue --------------------------------------------------------------------------------------

def cli(*args):
    """The CLI as a user runs it, raising its one-line error (click.ClickException) instead of exiting."""
    from subtune.cli import main

    return main.main([str(a) for a in args], standalone_mode=False)


def train_cli(tmp, *args):
    return cli("train", "--output", tmp / "run", *args)


def tiny_checkpoint(tmp: Path, config, step: int = 2, complete: bool = True, seed: int = 0) -> Path:
    """A checkpoint folder as a run leaves it (its adapter and the completion marker)."""
    folder = tmp / "run" / f"checkpoint-{step}"
    subtune.save(subtune.prepare(make_tiny(seed), config), folder / "adapter")
    if complete:
        runs.mark_complete(folder, {"step": step})
    return folder


def tiny_run(tmp: Path, method: str = "smt", records=RECORDS) -> None:
    finetune(make_tiny(0), CharTokenizer(), RUNS[method](), records, tmp / "run", save_steps=2, **QUICK)


def api(tmp, method="s2ft", model_seed=0, records=RECORDS, **kwargs):
    kwargs = {**QUICK, "save_strategy": "no", **kwargs}
    return finetune(make_tiny(model_seed), CharTokenizer(), RUNS[method](), records, tmp / "run", **kwargs)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


CE = click.ClickException
OTHER_RECORDS = [{"instruction": f"{i * 7919}", "output": "~"} for i in range(16)]  # SMT warms up on other blocks
CASES = [
    # CLI options, all refused before the model is loaded
    Case("cli-max-steps-zero", lambda t: train_cli(t, "--method", "lora", "--max-steps", 0), CE,
         ("--max-steps", ">= 1", "-1"), tries="`subtune train --max-steps 0`", before="silent: trained 1 step"),
    Case("cli-max-steps-below-minus-one", lambda t: train_cli(t, "--method", "lora", "--max-steps", -5), CE,
         ("--max-steps", "-1 to train for --epochs"),
         tries="`subtune train --max-steps -5`", before="silent: trained a full epoch"),
    Case("cli-epochs-zero", lambda t: train_cli(t, "--method", "lora", "--epochs", 0), CE, ("--epochs", "> 0"),
         tries="`subtune train --epochs 0`", before="silent: saved an untrained adapter"),
    Case("cli-epochs-inf", lambda t: train_cli(t, "--method", "lora", "--epochs", "inf"), CE, ("--epochs", "finite"),
         tries="`subtune train --epochs inf`", before="silent"),
    Case("cli-batch-size-zero", lambda t: train_cli(t, "--method", "lora", "--batch-size", 0), CE,
         ("--batch-size", ">= 1"), tries="`subtune train --batch-size 0`", before="raw"),
    Case("cli-grad-accum-zero", lambda t: train_cli(t, "--method", "lora", "--grad-accum", 0), CE,
         ("--grad-accum", ">= 1"), tries="`subtune train --grad-accum 0`", before="raw"),
    Case("cli-lr-nan", lambda t: train_cli(t, "--method", "lora", "--lr", "nan"), CE, ("--lr", "finite"),
         tries="`subtune train --lr nan`", before="silent"),
    Case("cli-lr-inf", lambda t: train_cli(t, "--method", "lora", "--lr", "inf"), CE, ("--lr", "finite"),
         tries="`subtune train --lr inf`", before="silent"),
    Case("cli-lr-negative", lambda t: train_cli(t, "--method", "lora", "--lr", "-1e-3"), CE, ("--lr", "> 0"),
         tries="`subtune train --lr -1e-3`", before="silent"),
    Case("cli-save-steps-zero", lambda t: train_cli(t, "--method", "lora", "--save-steps", 0), CE,
         ("--save-steps", "> 0"), tries="`subtune train --save-steps 0`", before="silent"),
    Case("cli-max-length-zero", lambda t: train_cli(t, "--method", "lora", "--max-length", 0), CE,
         ("--max-length", ">= 1"), tries="`subtune train --max-length 0`", before="raw"),
    Case("cli-seed-negative", lambda t: train_cli(t, "--method", "lora", "--seed", -1), CE, ("seed", "[0,"),
         tries="`subtune train --seed -1`", before="raw"),
    Case("cli-output-under-a-file", lambda t: cli("train", "--method", "lora", "--output", t / "notes.txt" / "run"),
         CE, ("--output", "is a file", "choose another --output"), setup=lambda t: write(t / "notes.txt", "keep"),
         tries="`--output` below an existing file", before="raw: found only after training"),
    Case("cli-output-holds-an-adapter", lambda t: train_cli(t, "--method", "lora"), CE,
         ("already holds another run", "adapter", "--resume", "--overwrite"),
         setup=lambda t: write(t / "run" / "adapter" / "adapter_config.json", '{"method": "s2ft"}'),
         tries="`subtune train` into an output holding another run's adapter",
         before="silent, data loss: the other adapter was overwritten, exit 0"),
    Case("cli-output-holds-checkpoints", lambda t: train_cli(t, "--method", "s2ft"), CE,
         ("already holds another run", "checkpoint-3", "--overwrite"),
         setup=lambda t: write(t / "run" / "checkpoint-3" / "trainer_state.json", "{}"),
         tries="`subtune train` into an output holding another run's checkpoints",
         before="silent, data loss: the other run's checkpoints were deleted"),
    Case("cli-resume-and-overwrite", lambda t: train_cli(t, "--method", "s2ft", "--resume", "--overwrite"), CE,
         ("--resume", "--overwrite", "give one"),
         tries="`--resume --overwrite` together", before="new: both flags are new"),
    Case("cli-resume-without-checkpoint", lambda t: train_cli(t, "--method", "s2ft", "--resume"), CE,
         ("no checkpoint-*", "without --resume"), tries="`--resume` with no checkpoint in the output", before="clear"),
    Case("cli-resume-only-partial-checkpoints", lambda t: train_cli(t, "--method", "s2ft", "--resume"), CE,
         ("no checkpoint", "is complete", "killed", "--overwrite"),
         setup=lambda t: tiny_checkpoint(t, subtune.S2FTConfig(), complete=False),
         tries="`--resume` where the only checkpoint was killed mid-write", before="raw"),
    Case("cli-resume-changes-the-selection",
         lambda t: train_cli(t, "--method", "s2ft", "--resume", "--config", t / "run.yaml"), CE,
         ("config differs", "seed (0 in the checkpoint, 1 now)", "allocation ('global'", "'uniform' now)"),
         setup=lambda t: (tiny_checkpoint(t, subtune.S2FTConfig()),
                          write(t / "run.yaml", "seed: 1\nallocation: uniform\n")),
         tries="`--resume` with a config that changes the selection (`seed: 1`, `allocation: uniform`)",
         before="silent: the deltas were loaded into other channels, exit 0 (a corrupt adapter)"),
    Case("cli-resume-another-methods-run", lambda t: train_cli(t, "--method", "s2ft", "--resume"), CE,
         ("is a 'lora' run", "--method lora"), setup=lambda t: tiny_checkpoint(t, subtune.LoraConfig(r=4)),
         tries="`--resume` a LoRA run with `--method s2ft`", before="raw"),
    Case("cli-max-length-cuts-every-answer", lambda t: train_cli(t, "--method", "lora", "--max-length", 8), CE,
         ("--max-length 8", "whole answer of every one", "nothing would be learned", "raise --max-length"),
         tries="`--max-length 8`: every answer token cut off", before="silent: loss 0, nothing learned"),
    Case("cli-lr-1e6-diverges",
         lambda t: train_cli(t, "--method", "lora", "--lr", "1e6", "--max-steps", 10, "--batch-size", 4,
                             "--save-steps", 100), CE,
         ("training diverged at step", "lower the learning rate", "--lr"),
         tries="`subtune train --method lora --lr 1e6`", before="silent: an all-NaN adapter saved, exit 0"),
    # the Python API (finetune / build_trainer)
    Case("api-max-steps-zero", lambda t: api(t, max_steps=0), subtune.ConfigError, ("max_steps", ">= 1"),
         tries="`finetune(max_steps=0)`", before="silent"),
    Case("api-batch-size-string", lambda t: api(t, batch_size="8"), subtune.ConfigError, ("batch_size", "whole"),
         tries="`finetune(batch_size='8')`", before="raw"),
    Case("api-grad-accum-zero", lambda t: api(t, grad_accum=0), subtune.ConfigError, ("grad_accum", ">= 1"),
         tries="`finetune(grad_accum=0)`", before="raw"),
    Case("api-warmup-negative", lambda t: api(t, warmup=-1), subtune.ConfigError, ("warmup", ">= 0"),
         tries="`finetune(warmup=-1)`", before="silent"),
    Case("api-seed-negative", lambda t: api(t, seed=-1), subtune.ConfigError, ("seed", "[0,"),
         tries="`finetune(seed=-1)`", before="raw"),
    Case("api-no-records", lambda t: api(t, records=[]), subtune.DataError, ("no training records", "at least one"),
         tries="`finetune` with no training records", before="raw"),
    Case("api-max-length-cuts-every-answer", lambda t: api(t, max_length=8), subtune.ConfigError,
         ("max_length 8", "every one of the 16 records", "nothing would be learned", "raise max_length to"),
         tries="`finetune(max_length=8)`: every answer token cut off", before="silent: nothing learned"),
    Case("api-output-holds-checkpoints", lambda t: api(t), RunExistsError, ("checkpoint-2", "overwrite=True"),
         setup=lambda t: tiny_checkpoint(t, subtune.S2FTConfig()),
         tries="`finetune` into an output holding another run's checkpoints",
         before="silent, data loss: the new run overwrote and rotated away the other run's checkpoints (re-checked on "
                "6e1ed7a)"),
    Case("api-output-holds-another-methods-adapter", lambda t: api(t), AdapterExistsError,
         ("'lora' adapter", "overwrite=True"),
         setup=lambda t: subtune.save(subtune.prepare(make_tiny(0), subtune.LoraConfig(r=4)), t / "run" / "adapter"),
         tries="`finetune` into an output holding a LoRA adapter",
         before="clear: but only at the final save, after training"),
    Case("api-resume-explicit-partial-checkpoint",
         lambda t: api(t, resume=str(t / "run" / "checkpoint-2")), CheckpointError,
         ("checkpoint-2", "killed", "complete checkpoint"),
         setup=lambda t: tiny_checkpoint(t, subtune.S2FTConfig(), complete=False),
         tries="`resume=` a checkpoint killed mid-write", before="raw"),
    Case("api-resume-onto-another-base", lambda t: api(t, "smt", model_seed=1, resume=True), CheckpointError,
         ("base model differs", "resume with the run's model"), setup=tiny_run,
         tries="resume an SMT run onto another base model", before="raw"),
    Case("api-resume-with-other-data-selects-other-blocks",
         lambda t: api(t, "smt", records=OTHER_RECORDS, resume=True), CheckpointError,
         ("selects now differs", "blocks", "resume with the run's data"), setup=tiny_run,
         tries="resume an SMT run with data whose warm-up selects other blocks", before="silent"),
    Case("api-lr-1e6-diverges", lambda t: api(t, "lora", learning_rate=1e6, max_steps=20), TrainingDivergedError,
         ("diverged at step", "not finite", "no checkpoint had been written", "lower the learning rate"),
         tries="`finetune(learning_rate=1e6)` (LoRA)", before="silent: an all-NaN adapter saved"),
]


@cases_param(CASES)
def test_catalogue_training(case, tmp_path):
    check_case(case, tmp_path)
