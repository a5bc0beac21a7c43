"""Runs for tests/test_distributed.py, in one process or in several under torchrun (gloo on the CPU, loopback):

    python tests/dist_worker.py OUT RUN...                                            # one process: the global batch
    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port P tests/dist_worker.py OUT RUN...  # half each

RUN is one of
    train:METHOD   prepare, then an unmodified HF Trainer for STEPS steps (DDP when launched); every rank calls
                   subtune.save (rank 0 writes); s2ft also exports a LoRA and a merged model the same way
    fsdp:METHOD    FSDP2 (fully_shard on each decoder layer and the root) with gradient checkpointing, taking the
                   Trainer's own step by hand (fsdp() says why not the Trainer itself); save and LoRA export gather
                   the shards, a merge is refused
    zotrainer:METHOD   the ZOTrainer (the method's trainer_class) for STEPS steps over rows whose ranks hold
                   different loss-token counts
    zo:METHOD      STEPS zeroth-order steps (ops.zo.spsa_step, reduce=all_reduce_mean) over this rank's rows
    zo-weighted:METHOD   the same over rows whose ranks hold different loss-token counts (all_reduce_weighted_mean)
    calibration    the calibration pass alone (core/calibration.py), where ranks outnumber batches
    mismatch       every rank passes different calibration batches to an activation-strategy S2FT prepare
    rank-failure   only rank 1's calibration batch is broken (a token outside the vocabulary)
Every rank writes OUT/RUN/selection-rank{R}.json (what prepare chose) and stats-rank{R}.json (wall seconds of the
run, peak RSS of the process so far, and an error if the run raised); rank 0 writes the adapter (OUT/RUN/adapter)
or, for zo runs, the perturbed tensors (OUT/RUN/zo.safetensors). Every process of a group runs the same RUNs in
the same order, so the imports (most of the cost) happen once per process. `--group-at prepare` starts no process group in main(): the first
prepare (before any TrainingArguments) starts it. `--device cuda` puts each rank on
cuda:LOCAL_RANK (one GPU per rank, as nccl and accelerate need); `--model default --global-batch 8 --seq 256
--steps 20` measures the embedded model instead of the tiny one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from conftest import make_tiny  # noqa: E402

import subtune  # noqa: E402
from subtune.core import distributed  # noqa: E402
from subtune.core.api import state_of  # noqa: E402

GLOBAL_BATCH, SEQ, STEPS, LR, VOCAB, MODEL = 4, 8, 4, 1e-2, 64, "tiny"  # main() may change them (measurements)
ZO_LR, ZO_DIRECTIONS = 1e-3, 2
# AdamW moves a value whose gradient is near its eps (1e-8) by up to lr on rounding alone, so a few of full
# fine-tuning's 20k values differ by ~3e-6 at lr 1e-2 between 2 ranks and 1 (gradients summed in another order);
# the difference scales with lr, and 1e-3 is still above any full fine-tuning rate used in practice
METHOD_LR = {"full": 1e-3}

METHODS = {
    "s2ft": lambda: subtune.S2FTConfig(strategy="activation", o_ratio=0.25, d_ratio=0.1, calibration_batches=4),
    "smt": lambda: subtune.SMTConfig(block_size=8, num_blocks=6, warmup_steps=4),
    # real AdamW warm-up steps: run whole on every rank, rank 0's warmed base and statistics broadcast
    "smt-updates": lambda: subtune.SMTConfig(block_size=8, num_blocks=6, warmup_steps=4, warmup_updates=True),
    # T_f = 2 of 4 steps: B freezes column by column, then leaves the optimizer, under DDP as in one process
    "lamda": lambda: subtune.LaMDAConfig(r=4, freeze_fraction=0.5),
    "lora": lambda: subtune.LoraConfig(r=4, lora_dropout=0.0),  # dropout would draw per-rank noise
    "dora": lambda: subtune.DoraConfig(r=4, lora_dropout=0.0),
    "lamda++": lambda: subtune.LaMDAPlusConfig(r=4, rank_min=2, rank_max=8, rank_multiple=2, freeze_fraction=0.5),
    "full": lambda: subtune.FullConfig(),
    "mezo": lambda: subtune.MeZOConfig(),
    "senszo": lambda: subtune.SensZOConfig(density=0.05, quantize="none", mask_source="sensitivity",
                                           calibration_samples=8),
}


def _ids(seed: int, rows: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(seed))


def training_rows() -> list[dict]:
    """The fixed global batch: GLOBAL_BATCH rows of SEQ tokens, no padding (every rank's half has as many loss
    tokens as the other, so the mean of the halves' losses is the loss of the whole)."""
    ids = _ids(5, GLOBAL_BATCH)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def calibration(seed: int = 6) -> list[dict]:
    """Four batches of two rows, the same on every rank (the pass deals them out across ranks itself), distinct from
    the training rows."""
    ids = _ids(seed, 8)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()} for b in ids.split(2)]


def _device(name: str) -> torch.device:
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def base_model():
    """The tiny random LLaMA of the tests, or (--model default, for measurements) the embedded pretrained one."""
    if MODEL == "tiny":
        return make_tiny(0)
    from subtune.zoo import load_model

    return load_model(MODEL)[0]


def prepared(method: str, device: torch.device, calib: list[dict] | None = None):
    model = base_model().to(device)
    return subtune.prepare(model, METHODS[method](), calibration=calibration() if calib is None else calib)


def dump_selection(model, folder: Path) -> None:
    state = state_of(model)
    tensors = {name: t.tolist() for name, t in state.selection.tensors.items()}
    (folder / f"selection-rank{distributed.rank()}.json").write_text(
        json.dumps({"tensors": tensors, "info": state.selection.info}, sort_keys=True, default=str))


def training_args(method: str, folder: Path, device: torch.device, world: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(folder / "trainer"), per_device_train_batch_size=GLOBAL_BATCH // world, max_steps=STEPS,
        learning_rate=METHOD_LR.get(method, LR), lr_scheduler_type="constant", logging_strategy="no",
        save_strategy="no", report_to=[], seed=0, use_cpu=device.type == "cpu", disable_tqdm=True,
        dataloader_num_workers=0, train_sampling_strategy="sequential")  # rank r takes rows [r·B, (r+1)·B): the FSDP loop below does too


WRITES: list[str] = []  # the directories this process wrote through core/io (atomic_directory), in order


def _count_writes() -> None:
    import contextlib

    from subtune.core import io

    plain = io.atomic_directory

    @contextlib.contextmanager
    def counted(directory, *args, **kwargs):
        WRITES.append(Path(directory).name)
        with plain(directory, *args, **kwargs) as tmp:
            yield tmp

    io.atomic_directory = counted


def save_adapter(model, folder: Path, exports: bool = False) -> dict:
    """Every rank calls subtune.save (FSDP2 shards gathered inside, rank 0 writes); `exports`: export_lora too, and
    export_merged (refused under FSDP2: the refusal is recorded). Returns what every rank holds: a hash of its
    trained tensors, how many parameters still train, the FSDP2 modules and the directories this rank wrote."""
    from subtune.core.api import adapter_tensors

    sharded = sorted(n or "<root>" for n in distributed.fsdp_modules(model))
    with distributed.gathered(model):
        trained = _sha(t for _, t in sorted(adapter_tensors(model).items()))
    start = len(WRITES)
    saved = subtune.save(model, folder / "adapter")
    out = {"trained_sha256": trained, "fsdp_modules": sharded, "saved_to": str(saved),
           "trainable_after": sum(p.requires_grad for p in model.parameters())}
    if exports:
        out["lora_info"] = subtune.export_lora(model, folder / "lora")
        try:
            subtune.export_merged(model, folder / "merged")
        except subtune.SubtuneError as e:
            out["merged_error"] = {"type": type(e).__name__, "message": str(e)}
    out["writes"] = WRITES[start:]
    distributed.barrier()  # under DDP the other ranks did not wait for rank 0's writes
    return out


def train(method: str, folder: Path, device: torch.device) -> dict:
    """An unmodified HF Trainer (DDP when launched) over the fixed global batch."""
    from transformers import Trainer

    before_prepare = torch.distributed.is_initialized()
    model = prepared(method, device)
    group = {"group_before_prepare": before_prepare, "group_after_prepare": torch.distributed.is_initialized()}
    dump_selection(model, folder)
    state = state_of(model)
    trainer = Trainer(model=model, args=training_args(method, folder, device, distributed.world_size()),
                      train_dataset=training_rows(), callbacks=state.method.callbacks(model, state))
    before = sum(p.requires_grad for p in model.parameters())
    trainer.train()
    return {"trainable_before": before, **group, **save_adapter(model, folder, exports=method == "s2ft")}


def fsdp(method: str, folder: Path, device: torch.device) -> dict:
    """FSDP2: fully_shard on each decoder layer and the root, gradient checkpointing on, and the Trainer's own
    step (its loss scaling, optimizer class and settings, clipping at max_grad_norm, constant lr) over this rank's
    rows.

    Not the Trainer itself: on the CPU accelerate keeps FSDP for GPU backends (MULTI_CPU ignores the FSDP plugin),
    and the Trainer's DDP wrap refuses DTensor parameters."""
    from torch.distributed.fsdp import fully_shard
    from transformers import Trainer

    from subtune.core.surgery import decoder_layers

    model = prepared(method, device)
    dump_selection(model, folder)
    model.gradient_checkpointing_enable()
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    args = training_args(method, folder, device, distributed.world_size())
    optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_class(params, **{**optimizer_kwargs, "weight_decay": args.weight_decay})  # as its groups
    batch = {k: v.to(device) for k, v in my_rows().items()}
    tokens = sum(int(r["labels"][1:].ne(-100).sum()) for r in training_rows())  # the Trainer's num_items_in_batch
    model.train()
    for _ in range(STEPS):
        # the Trainer's loss: summed over this rank's tokens / the global token count, times the world size, since
        # FSDP2 averages the gradients over ranks (reduce-scatter) as DDP does
        loss = model(**batch, num_items_in_batch=tokens).loss * distributed.world_size()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return save_adapter(model, folder, exports=True)


def zo_trainer(method: str, folder: Path, device: torch.device) -> dict:
    """The method's own trainer class (ZOTrainer) for STEPS steps, DDP-launched or not, over the global batch with
    row 2 labelled on its last 3 tokens only (ranks hold 14 and 10 loss tokens: the losses must be averaged by
    token count). eps 1e-2: the fp32 loss of a half and of the union differ by a few roundings (~5e-7), which
    moves g by ~1e-4 at eps 1e-3, 10 times less at 1e-2."""
    import dataclasses

    from safetensors.torch import save_file

    config = dataclasses.replace(METHODS[method](), eps=1e-2)
    model = subtune.prepare(base_model().to(device), config, calibration=calibration())
    dump_selection(model, folder)
    state = state_of(model)
    rows = training_rows()
    rows[2]["labels"][:SEQ - 3] = -100
    args = training_args(method, folder, device, distributed.world_size())
    args.learning_rate = ZO_LR
    trainer = state.method.trainer_class()(model=model, args=args, train_dataset=rows)
    initial = [t.detach().clone() for t in state.method.zo_tensors(model, state)]
    trainer.train()
    tensors = state.method.zo_tensors(model, state)
    if distributed.is_main_process():
        save_file({f"t{i}": t.detach().cpu().contiguous() for i, t in enumerate(tensors)}, folder / "zo.safetensors")
    distributed.barrier()
    moved = max(float((t.detach() - t0).abs().max()) for t, t0 in zip(tensors, initial))
    return {"projected_grads": [h["projected_grads"] for h in trainer.history], "update_max": moved,
            "zo_sha256": _sha(tensors), "steps": len(trainer.history),
            "loss_tokens": int(sum(r["labels"][1:].ne(-100).sum() for r in rows))}


def my_rows(masked: bool = False) -> dict:
    """This rank's equal share of the global batch (all of it for one process); `masked`: row 2 has only its last
    3 tokens labelled, so the ranks' shares hold different numbers of loss tokens."""
    rows = training_rows()
    if masked:
        rows[2]["labels"][:SEQ - 3] = -100
    share = GLOBAL_BATCH // distributed.world_size()
    mine = rows[distributed.rank() * share:(distributed.rank() + 1) * share]
    return {k: torch.stack([r[k] for r in mine]) for k in mine[0]}


def zo(method: str, folder: Path, device: torch.device, weighted: bool = False) -> dict:
    """STEPS SPSA steps with the same seeds on every rank, each over its own rows, losses averaged across ranks.

    `weighted`: the global batch's row 2 (rank 1's first row) has only its last 3 tokens labelled, so the ranks hold
    14 and 10 loss tokens; their mean losses are then averaged by token count (all_reduce_weighted_mean), which is
    the mean over the union that one process computes; a plain mean of the two means would not be."""
    from functools import partial

    from safetensors.torch import save_file

    from subtune.ops.zo import spsa_step

    model = prepared(method, device)
    dump_selection(model, folder)
    state = state_of(model)
    tensors = state.method.zo_tensors(model, state)
    mine = {k: v.to(device) for k, v in my_rows(masked=weighted).items()}
    tokens = int(mine["labels"][:, 1:].ne(-100).sum())
    reduce = partial(distributed.all_reduce_weighted_mean, weight=tokens) if weighted else distributed.all_reduce_mean
    model.eval()

    def loss():
        """The mean next-token loss of this rank's labelled tokens, reduced in fp64 from the fp32 logits: with
        ε = 1e-3 one fp32 rounding of the loss (5e-7 at 4.2) would move g by 2.5e-4 between a batch and its parts."""
        with torch.inference_mode():
            logits = model(input_ids=mine["input_ids"]).logits
            return torch.nn.functional.cross_entropy(logits[:, :-1].double().reshape(-1, logits.shape[-1]),
                                                     mine["labels"][:, 1:].reshape(-1), ignore_index=-100)

    initial = [t.detach().clone() for t in tensors]
    history = []
    for step in range(STEPS):
        seeds = [1000 * step + j for j in range(ZO_DIRECTIONS)]
        out = spsa_step(tensors, loss, seeds, state.config.eps, ZO_LR, exact_restore=state.method.exact_restore,
                        reduce=reduce)
        history.append(out["projected_grads"])
    if distributed.is_main_process():
        save_file({f"t{i}": t.detach().cpu().contiguous() for i, t in enumerate(tensors)}, folder / "zo.safetensors")
    distributed.barrier()
    moved = max(float((t - t0).abs().max()) for t, t0 in zip(tensors, initial))
    return {"projected_grads": history, "update_max": moved, "zo_sha256": _sha(tensors), "loss_tokens": tokens}


def _sha(tensors) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        # a copy: .numpy() on FSDP2's unsharded parameter would pin its storage, and resharding frees it
        h.update(t.detach().to("cpu", copy=True).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def calibration_pass(folder: Path, device: torch.device) -> dict:
    """The pass itself, at its edges: a gradient statistic over fewer batches than ranks (rank 1 computes none) and
    an activation statistic over a generator (no length) of an odd number of batches. Every rank writes what it
    ends with."""
    from safetensors.torch import save_file

    from subtune.core.calibration import accumulate_activation_statistic, accumulate_gradient_statistic

    model = base_model().to(device)
    downs = {n: m.weight for n, m in model.named_modules() if n.endswith("down_proj")}
    grads = accumulate_gradient_statistic(model, downs, calibration(), "sum_sq", limit=1, progress=False)
    outs = {n: m for n, m in model.named_modules() if n.endswith("o_proj")}
    acts = accumulate_activation_statistic(model, outs, (b for b in calibration()),
                                           lambda key, inputs, output: inputs[0].detach().float().pow(2).sum((0, 1)),
                                           limit=3, progress=False)
    tensors = {**{f"grad.{k}": v for k, v in grads.statistics.items()},
               **{f"act.{k}": v for k, v in acts.statistics.items()}}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              folder / f"statistics-rank{distributed.rank()}.safetensors")
    return {"gradient_batches": grads.batches, "activation_batches": acts.batches}


def mismatch(folder: Path, device: torch.device) -> dict:
    prepared("s2ft", device, calibration(seed=100 + distributed.rank()))
    return {}


def rank_failure(folder: Path, device: torch.device) -> dict:
    calib = calibration()
    if distributed.rank() == 1:
        calib[1] = {k: v.clone() for k, v in calib[1].items()}
        calib[1]["input_ids"][0, 0] = VOCAB + 7  # outside the embedding: only this rank's forward fails
    prepared("s2ft", device, calib)
    return {}


def run(spec: str, out: Path, device: torch.device) -> None:
    folder = out / spec.replace(":", "-")
    folder.mkdir(parents=True, exist_ok=True)
    kind, _, method = spec.partition(":")
    start = time.perf_counter()
    stats: dict = {"rank": distributed.rank(), "world_size": distributed.world_size(), "device": str(device),
                   "peak_rss_before_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        if kind == "train":
            stats.update(train(method, folder, device))
        elif kind == "fsdp":
            stats.update(fsdp(method, folder, device))
        elif kind == "zotrainer":
            stats.update(zo_trainer(method, folder, device))
        elif kind in ("zo", "zo-weighted"):
            stats.update(zo(method, folder, device, weighted=kind == "zo-weighted"))
        elif kind == "calibration":
            stats.update(calibration_pass(folder, device))
        elif kind == "mismatch":
            stats.update(mismatch(folder, device))
        elif kind == "rank-failure":
            stats.update(rank_failure(folder, device))
        else:
            raise SystemExit(f"unknown run {spec!r}")
    except Exception as e:  # recorded for the test; the next run goes on (every rank raised at the same point)
        stats["error"] = {"type": type(e).__name__, "message": str(e),
                          "traceback": traceback.format_exc(limit=-8)}
    stats["wall_s"] = time.perf_counter() - start
    stats["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (folder / f"stats-rank{distributed.rank()}.json").write_text(json.dumps(stats))


def main() -> None:
    global GLOBAL_BATCH, SEQ, STEPS, VOCAB, MODEL
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="tiny", help="tiny (the tests) or default (the embedded model)")
    parser.add_argument("--global-batch", type=int, default=GLOBAL_BATCH)
    parser.add_argument("--seq", type=int, default=SEQ)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--group-at", choices=["start", "prepare"], default="start",
                        help="start the process group here, or leave it to the first subtune.prepare")
    args = parser.parse_args()
    GLOBAL_BATCH, SEQ, STEPS, MODEL = args.global_batch, args.seq, args.steps, args.model
    if MODEL != "tiny":
        from transformers import AutoConfig

        from subtune.zoo import resolve_model_path

        VOCAB = AutoConfig.from_pretrained(resolve_model_path(MODEL), local_files_only=True).vocab_size
    torch.set_num_threads(1)
    device = _device(args.device)
    _count_writes()
    if args.group_at == "start":
        said = distributed.ensure_process_group(timeout=datetime.timedelta(seconds=120))
        print(f"rank {distributed.rank()}: {said}", flush=True)
    for spec in args.runs:
        run(spec, args.out, device)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
