"""Several processes give what one process gives (issue 14): DDP through an unmodified HF Trainer, FSDP2, and
data-parallel zeroth-order steps (spsa_step and the ZOTrainer), each with 2 gloo ranks under torchrun on loopback,
against one process on the same global batch (tests/dist_worker.py does the runs; one torchrun for every
configuration, one whose only run is SMT's, so that its prepare starts the process group, and one plain process
for the references, all at once). Saving and exporting from 2 ranks write once. Then the single-process behaviour of core/distributed.py and spsa_step's `reduce`,
and the catalogue rows."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny
from reliability import Case, cases_param, check_case

from subtune.core import distributed
from subtune.core.distributed import DistributedError
from subtune.ops.zo import ZOError, spsa_step

WORKER = Path(__file__).with_name("dist_worker.py")
TRAINED = ["s2ft", "smt", "smt-updates", "lamda", "lamda++", "lora", "dora", "full"]
ZEROTH = ["mezo", "senszo"]
REFERENCE_RUNS = ([f"train:{m}" for m in TRAINED] + [f"zo:{m}" for m in ZEROTH] + ["zo-weighted:senszo"]
                  + [f"zotrainer:{m}" for m in ZEROTH] + ["calibration"])
GROUP_RUNS = REFERENCE_RUNS + ["fsdp:s2ft", "mismatch", "rank-failure"]
TIMEOUT_S = 300  # both groups together; about 20 s on a quiet 2-core machine
TOL = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, device):
    """OUT/one (one process, the whole batch), OUT/two and OUT/order (torchrun, 2 ranks, half each; no process
    group until the first prepare, which runs before any TrainingArguments), run side by side."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("2 ranks on CUDA need 2 GPUs (nccl and accelerate take one per rank); the CPU run covers it")
    root = tmp_path_factory.mktemp("distributed")
    def torchrun(group: str, runs: list[str]) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port()), str(WORKER), str(root / group), *runs, "--device", device.type,
                "--group-at", "prepare"]

    commands = {"one": [sys.executable, str(WORKER), str(root / "one"), *REFERENCE_RUNS, "--device", device.type],
                "two": torchrun("two", GROUP_RUNS), "order": torchrun("order", ["train:smt"])}
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
             for name, cmd in commands.items()}
    failed = []
    for name, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            pytest.fail(f"dist_worker ({name}) ran past {TIMEOUT_S} s")
        if proc.returncode != 0:
            failed.append(f"{name} exited {proc.returncode}:\n{output[-4000:]}")
    assert not failed, "\n".join(failed)
    return root


def _stats(root: Path, group: str, run: str) -> list[dict]:
    folder = root / group / run.replace(":", "-")
    ranks = 1 if group == "one" else 2
    return [json.loads((folder / f"stats-rank{r}.json").read_text()) for r in range(ranks)]


def _ok(root: Path, group: str, run: str) -> list[dict]:
    stats = _stats(root, group, run)
    for s in stats:
        assert "error" not in s, f"{group}/{run} rank {s['rank']}: {s['error']}"
    return stats


def _selections(root: Path, group: str, run: str) -> list[dict]:
    folder = root / group / run.replace(":", "-")
    return [json.loads(p.read_text()) for p in sorted(folder.glob("selection-rank*.json"))]


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for name in a:
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
        if a[name].is_floating_point():
            worst = max(worst, float((a[name].double() - b[name].double()).abs().max()))
        else:
            assert torch.equal(a[name], b[name]), f"{name}: integer tensors (indices) differ"
    return worst


@pytest.mark.parametrize("run", [f"train:{m}" for m in TRAINED] + [f"zo:{m}" for m in ZEROTH] + ["fsdp:s2ft"]
                         + [f"zotrainer:{m}" for m in ZEROTH])
def test_both_ranks_hold_the_selection_one_process_makes(runs, run):
    _ok(runs, "two", run)
    one = _selections(runs, "one", run.replace("fsdp:", "train:"))
    two = _selections(runs, "two", run)
    assert len(two) == 2 and two[0] == two[1], f"{run}: the ranks chose different weights to train"
    assert two[0] == one[0], f"{run}: 2 ranks chose other weights than one process on the same calibration data"


@pytest.mark.parametrize("method", TRAINED)
def test_ddp_adapter_equals_one_process_on_the_same_global_batch(runs, method):
    one, two = _ok(runs, "one", f"train:{method}"), _ok(runs, "two", f"train:{method}")
    assert two[0]["world_size"] == 2 and one[0]["world_size"] == 1
    got = load_file(runs / "two" / f"train-{method}" / "adapter" / "adapter.safetensors")
    want = load_file(runs / "one" / f"train-{method}" / "adapter" / "adapter.safetensors")
    assert _max_difference(got, want) <= TOL
    assert two[0]["trained_sha256"] == two[1]["trained_sha256"], "the ranks' trained values differ"
    assert [s["trainable_after"] for s in two] == [one[0]["trainable_after"]] * 2
    if method.startswith("lamda"):  # T_f = 2 of 4 steps: B froze and left training on every rank, as in one process
        assert all(s["trainable_after"] < s["trainable_before"] for s in [*one, *two])


@pytest.mark.parametrize("group, method", [("two", "s2ft"), ("order", "smt")])
def test_prepare_before_the_trainer_arguments_starts_the_group_and_the_ranks_agree(runs, group, method):
    """The order of a user's own script that used to fail: prepare, then TrainingArguments (the first prepare of
    the process starts the process group itself, so the data-driven selection is collective)."""
    one, two = _ok(runs, "one", f"train:{method}"), _ok(runs, group, f"train:{method}")
    assert [(s["group_before_prepare"], s["group_after_prepare"]) for s in two] == [(False, True)] * 2
    selections = _selections(runs, group, f"train:{method}")
    assert selections[0] == selections[1] == _selections(runs, "one", f"train:{method}")[0]
    got = load_file(runs / group / f"train-{method}" / "adapter" / "adapter.safetensors")
    want = load_file(runs / "one" / f"train-{method}" / "adapter" / "adapter.safetensors")
    assert _max_difference(got, want) <= TOL
    assert one[0]["group_after_prepare"] is False  # one process: no group is started


def test_saving_and_exporting_from_two_ranks_write_once_and_load(runs, tiny):
    import transformers
    from peft import PeftModel

    import subtune

    rank0, rank1 = _ok(runs, "two", "train:s2ft")
    assert rank0["writes"] == ["adapter", "lora", "merged"] and rank1["writes"] == []
    folder = runs / "two" / "train-s2ft"
    assert rank0["saved_to"] == rank1["saved_to"] == str(folder / "adapter")
    assert rank0["lora_info"]["directory"] == str(folder / "lora") and rank1["lora_info"] is None  # DDP: no wait
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        adapted = subtune.load(tiny(0), folder / "adapter")(input_ids=ids).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(folder / "merged")(input_ids=ids).logits
        lora = PeftModel.from_pretrained(tiny(0), folder / "lora")(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
    torch.testing.assert_close(lora, adapted, rtol=0, atol=1e-5)


def test_fsdp2_saves_and_exports_the_gathered_lora_and_refuses_a_merge(runs):
    fsdp, ddp = _ok(runs, "two", "fsdp:s2ft"), _ok(runs, "two", "train:s2ft")
    assert [s["writes"] for s in fsdp] == [["adapter", "lora"], []]
    assert fsdp[0]["lora_info"] == fsdp[1]["lora_info"]  # collective under FSDP2: every rank gets rank 0's info
    got = load_file(runs / "two" / "fsdp-s2ft" / "lora" / "adapter_model.safetensors")
    want = load_file(runs / "two" / "train-s2ft" / "lora" / "adapter_model.safetensors")
    assert _max_difference(got, want) <= TOL
    for s in fsdp:  # before anything changed, on every rank
        assert s["merged_error"]["type"] == "DistributedError"
        assert "FSDP2" in s["merged_error"]["message"] and "subtune.save" in s["merged_error"]["message"]
    assert "merged_error" not in ddp[0]


@pytest.mark.parametrize("method", ZEROTH)
def test_the_zo_trainer_on_two_ranks_equals_one_process_over_the_union_batch(runs, method):
    """Through ZOTrainer itself (DDP-launched HF Trainer, its sampler and step): the same z on every rank, the two
    losses averaged by loss tokens (14 and 10 on the two ranks)."""
    one, two = _ok(runs, "one", f"zotrainer:{method}"), _ok(runs, "two", f"zotrainer:{method}")
    assert [s["steps"] for s in [*one, *two]] == [4] * 3
    assert two[0]["projected_grads"] == two[1]["projected_grads"] and two[0]["zo_sha256"] == two[1]["zo_sha256"]
    # fp32 losses of the halves and of the union differ by a few roundings: ~5e-5 in g at eps 1e-2
    for got, want in zip(sum(two[0]["projected_grads"], []), sum(one[0]["projected_grads"], [])):
        assert got == pytest.approx(want, abs=3e-4)
    assert one[0]["update_max"] > 1e-4
    got = load_file(runs / "two" / f"zotrainer-{method}" / "zo.safetensors")
    want = load_file(runs / "one" / f"zotrainer-{method}" / "zo.safetensors")
    assert _max_difference(got, want) <= TOL


def test_fsdp2_adapter_equals_the_ddp_adapter(runs):
    fsdp, ddp = _ok(runs, "two", "fsdp:s2ft"), _ok(runs, "two", "train:s2ft")
    for s in fsdp:  # each decoder layer and the root were sharded; the base is not replicated
        assert s["fsdp_modules"] == ["<root>", "model.layers.0", "model.layers.1"]
    assert ddp[0]["fsdp_modules"] == []
    got = load_file(runs / "two" / "fsdp-s2ft" / "adapter" / "adapter.safetensors")
    want = load_file(runs / "two" / "train-s2ft" / "adapter" / "adapter.safetensors")
    assert _max_difference(got, want) <= TOL
    assert fsdp[0]["trained_sha256"] == fsdp[1]["trained_sha256"]


@pytest.mark.parametrize("method", ZEROTH)
def test_zo_two_ranks_over_halves_equal_one_rank_over_the_union(runs, method):
    one, two = _ok(runs, "one", f"zo:{method}"), _ok(runs, "two", f"zo:{method}")
    assert two[0]["projected_grads"] == two[1]["projected_grads"], "ranks reduced to different losses"
    assert two[0]["zo_sha256"] == two[1]["zo_sha256"], "ranks hold different values after the same steps"
    for got, want in zip(sum(two[0]["projected_grads"], []), sum(one[0]["projected_grads"], [])):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert one[0]["update_max"] > 1e-4  # the steps moved the values: equal updates, not two no-ops
    got = load_file(runs / "two" / f"zo-{method}" / "zo.safetensors")
    want = load_file(runs / "one" / f"zo-{method}" / "zo.safetensors")
    assert _max_difference(got, want) <= TOL


def test_zo_ranks_holding_different_token_counts_average_by_tokens_to_the_union_loss(runs):
    one, two = _ok(runs, "one", "zo-weighted:senszo"), _ok(runs, "two", "zo-weighted:senszo")
    assert [s["loss_tokens"] for s in two] == [14, 10] and one[0]["loss_tokens"] == 24
    for got, want in zip(sum(two[0]["projected_grads"], []), sum(one[0]["projected_grads"], [])):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    got = load_file(runs / "two" / "zo-weighted-senszo" / "zo.safetensors")
    want = load_file(runs / "one" / "zo-weighted-senszo" / "zo.safetensors")
    assert _max_difference(got, want) <= TOL


def test_calibration_statistics_are_global_on_every_rank_even_where_a_rank_has_no_batch(runs):
    (one,), two = _ok(runs, "one", "calibration"), _ok(runs, "two", "calibration")
    assert [(s["gradient_batches"], s["activation_batches"]) for s in [one, *two]] == [(1, 3)] * 3
    folder = runs / "two" / "calibration"
    rank0, rank1 = (load_file(folder / f"statistics-rank{r}.safetensors") for r in (0, 1))
    want = load_file(runs / "one" / "calibration" / "statistics-rank0.safetensors")
    assert rank0.keys() == rank1.keys() == want.keys() and len(want) == 4  # 2 layers x (Down grads, O inputs)
    for name in want:
        assert torch.equal(rank0[name], rank1[name]), f"{name}: the ranks hold different statistics"
        torch.testing.assert_close(rank0[name], want[name], rtol=1e-5, atol=0)  # summed in another order
        assert want[name].abs().sum() > 0


def test_ranks_given_different_calibration_data_all_refuse(runs):
    for s in _stats(runs, "two", "mismatch"):
        assert s["error"]["type"] == "DistributedError"
        assert "different calibration batches" in s["error"]["message"]
        assert "same (global) calibration batches on every rank" in s["error"]["message"]


def test_a_rank_that_fails_during_calibration_stops_every_rank(runs):
    rank0, rank1 = _stats(runs, "two", "rank-failure")
    assert rank1["error"]["type"] == "IndexError"  # its own error, unchanged
    assert rank0["error"]["type"] == "DistributedError"  # not a hang until the timeout
    assert "failed on rank 1" in rank0["error"]["message"] and "IndexError" in rank0["error"]["message"]


# -- one process: the helpers are no-ops, spsa_step's reduce is used as said


@pytest.fixture
def no_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_one_process_starts_no_process_group_and_the_helpers_change_nothing(no_launcher, device):
    assert not distributed.launched()
    assert distributed.ensure_process_group().startswith("single process")
    assert not torch.distributed.is_initialized()
    assert distributed.is_main_process() and distributed.rank() == 0 and distributed.world_size() == 1
    t = torch.tensor([1.5, -2.0], device=device)
    assert torch.equal(distributed.all_reduce_mean(t), t)
    assert torch.equal(distributed.all_reduce_weighted_mean(t, 7), t)
    assert distributed.broadcast_from_rank0({"a": [1, 2]}) == {"a": [1, 2]}
    model = make_tiny(0).to(device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with distributed.gathered(model) as inside:  # no FSDP2 module: nothing to gather
        assert inside is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    distributed.barrier()


def _quadratic(tensors):
    targets = [torch.full_like(t, 0.3) for t in tensors]
    return lambda: sum(((t - g) ** 2).sum() for t, g in zip(tensors, targets))


def test_spsa_reduce_gets_both_losses_of_every_direction_in_one_call_and_its_result_is_used(device):
    def start():
        gen = torch.Generator().manual_seed(0)
        return [torch.randn(5, 3, generator=gen).to(device), torch.randn(4, generator=gen).to(device)]

    plain = start()
    want = spsa_step(plain, _quadratic(plain), [3, 4, 5], 1e-3, 1e-2)
    calls = []

    def identity(losses):
        calls.append((tuple(losses.shape), losses.dtype))
        return losses.clone()

    reduced = start()
    got = spsa_step(reduced, _quadratic(reduced), [3, 4, 5], 1e-3, 1e-2, reduce=identity)
    assert calls == [((3, 2), torch.float64)]  # one collective per step, whatever the number of directions
    assert got == want and all(torch.equal(a, b) for a, b in zip(reduced, plain))

    halved = start()
    out = spsa_step(halved, _quadratic(halved), [3, 4, 5], 1e-3, 1e-2, reduce=lambda losses: losses / 2)
    assert out["projected_grads"] == pytest.approx([g / 2 for g in want["projected_grads"]], rel=1e-12)


def test_a_reduce_that_returns_nothing_is_refused_before_any_value_moves(device):
    tensors = [torch.randn(6, device=device)]
    before = [t.clone() for t in tensors]
    with pytest.raises(ZOError, match="all_reduce_mean"):
        spsa_step(tensors, _quadratic(tensors), [1], 1e-3, 1e-2, exact_restore=True, reduce=lambda losses: None)
    assert torch.equal(tensors[0], before[0])


# -- the catalogue


def _with_env(env: dict, fn):
    """Run fn with the launcher variables exactly as `env` gives them (the others removed)."""
    def run(tmp):
        cleared = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCHER_ENV + ("LOCAL_RANK",)}
        with mock.patch.dict(os.environ, {**cleared, **env}, clear=True):
            return fn()
    return run


def _spsa_with(reduce):
    def run(tmp):
        tensors = [torch.zeros(4)]
        return spsa_step(tensors, _quadratic(tensors), [1, 2], 1e-3, 1e-2, reduce=reduce)
    return run


CASES = [
    Case("dist-env-incomplete", _with_env({"WORLD_SIZE": "2"}, distributed.ensure_process_group), DistributedError,
         ("RANK", "MASTER_ADDR", "MASTER_PORT", "torchrun", "unset WORLD_SIZE"),
         tries="WORLD_SIZE=2 without the rest of a launcher's variables (RANK, MASTER_ADDR, MASTER_PORT)",
         before="new: torch's init_process_group would raise 'environment variable RANK expected, but not set'"),
    Case("dist-env-not-a-number", _with_env({"WORLD_SIZE": "two"}, distributed.ensure_process_group),
         DistributedError, ("WORLD_SIZE", "'two'", "whole number", "launcher"),
         tries="WORLD_SIZE=two", before="new"),
    Case("dist-mean-of-integers", lambda tmp: distributed.all_reduce_mean(torch.tensor([1, 2])), DistributedError,
         ("floating", "truncated", ".float()"),
         tries="all_reduce_mean of an integer tensor (the mean would be truncated)", before="new"),
    Case("zo-reduce-returns-none", _spsa_with(lambda losses: None), ZOError,
         ("reduce returned nonetype", "all_reduce_mean", "returns none"),
         tries="spsa_step(reduce=...) with a function that reduces in place and returns None, like "
               "torch.distributed.all_reduce",
         before="new"),
    Case("zo-reduce-wrong-shape", _spsa_with(lambda losses: losses.mean()), ZOError,
         ("shape ()", "shape (2, 2)", "reduced tensor"),
         tries="spsa_step(reduce=...) returning one number instead of every direction's two losses", before="new"),
]


@cases_param(CASES)
def test_catalogue_distributed(case, tmp_path):
    check_case(case, tmp_path)
