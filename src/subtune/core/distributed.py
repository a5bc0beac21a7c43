"""Several processes (torchrun, `accelerate launch`): the process group, who writes, and how ranks agree.

Every rank must hold the same selection, or DDP's first all-reduce fails (different shapes) or, worse, averages
gradients of different parameters. How each kind of selection is made to agree:

- **Seeded or weight-only choices** (S²FT `random`/`weight`, SensZOQ `random`/`magnitude` masks, LaMDA's SVD
  initialisation, LaMDA++'s rank allocation, PEFT's LoRA init): a pure function of the seed and the base weights,
  so every rank computes the same result itself; S²FT and SMT still broadcast rank 0's indices (a few bytes) as a
  guard against a rank whose weights or kernels differ.
- **Additive calibration statistics** (S²FT `activation`/`weight_activation`/`gradient`, SMT's gradient-only
  warm-up, SensZOQ's Fisher sums): *all-reduced*. Every rank passes the same global calibration batches
  (checked: a digest of the batches is compared, and ranks that were given different data get an error instead of
  a silent rank-0 choice); the pass deals them round-robin, each rank accumulates its share and the statistics are
  summed across ranks (core/calibration.py). Each rank does 1/N of the calibration work (SensZOQ's per-sample
  gradients are the costly part on a 7B+ base), every rank ends with the bitwise same global statistic, and it
  equals the one-process statistic up to float summation order. Broadcasting rank 0's result instead would cost
  every rank the whole pass.
- **Sequential calibration** (SMT's `warmup_updates`: real AdamW steps, each depending on the last): not
  shardable without an all-reduce of every warm-up gradient, so every rank runs the whole warm-up on the same
  batches, then rank 0's warmed weights and statistics are broadcast (nondeterministic GPU kernels cannot make the
  bases drift apart).

`prepare` calls `ensure_process_group()` first when launched, so these collectives are active whatever the
order of `prepare` and `TrainingArguments` (accelerate and the HF Trainer join an existing group).
Without a process group every helper here is a no-op (one process).

Writing (`save`, `export_lora`, `export_merged`): only rank 0 touches the disk (`on_main_process`). Under DDP
the other ranks return at once without communicating, so rank 0 may also save alone (the HF Trainer's
checkpoints); a rank that reads the files rank 0 wrote calls `barrier()` first. Under FSDP2 every rank must call
it (the shards are gathered collectively); they all leave with rank 0's result or its error, so no rank waits
forever for a writer that failed.

FSDP2 (`fully_shard` on each decoder layer after `prepare`): the method layers' trainable values are parameters of
their decoder layer, so they are sharded with it, like the frozen base, and so is their optimizer state; nothing
is replicated, and the result equals DDP's (tests/test_distributed.py). Reading whole tensors (save, export_lora)
runs inside `gathered(model)` on every rank. Changing base weights in place (merge, unmerge, unload,
export_merged) is refused on a sharded model (`refuse_sharded`): FSDP2 all-gathers into a separate buffer that
resharding frees, so a merge into the gathered weights would be silently lost.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
from torch import nn

from subtune.core.errors import SubtuneError

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
T = TypeVar("T")


class DistributedError(SubtuneError, RuntimeError):
    """The launcher's environment cannot start a process group, or ranks disagree (another rank failed, ranks were
    given different calibration data)."""


def launched() -> bool:
    """True under a launcher that started several processes (torchrun, `accelerate launch`): WORLD_SIZE > 1."""
    return _env_int("WORLD_SIZE", 1) > 1


def active() -> bool:
    """True when a process group with more than one rank is up (the collectives below then communicate)."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def rank() -> int:
    """This process's global rank: the group's, else the launcher's RANK (0 for a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return _env_int("RANK", 0)


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def is_main_process() -> bool:
    """Whether this process should write adapters and print: rank 0, also before the group exists."""
    return rank() == 0


def ensure_process_group(timeout: datetime.timedelta = DEFAULT_TIMEOUT, backend: str | None = None) -> str:
    """Join the launcher's process group: init gloo (CPU) or nccl (CUDA, with gloo for CPU tensors) from the
    launcher's env:// variables when launched and none exists yet. Idempotent. Returns what it did, in words.

    `backend` overrides the choice (e.g. "gloo" for ranks that share one GPU, which nccl refuses)."""
    if not launched():
        return "single process: no launcher (WORLD_SIZE is not > 1), no process group"
    if not torch.distributed.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process, or "
                               "install a torch build with distributed support")
    if torch.distributed.is_initialized():
        return (f"joined the existing process group ({torch.distributed.get_backend()}, rank "
                f"{torch.distributed.get_rank()} of {torch.distributed.get_world_size()})")
    missing = [name for name in LAUNCHER_ENV if name not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} "
                               f"{'is' if len(missing) == 1 else 'are'} not set, so no process group can start; "
                               "launch with `torchrun --nproc_per_node N` or `accelerate launch`, or unset WORLD_SIZE "
                               "to run one process")
    for name in ("RANK", "LOCAL_RANK"):
        _env_int(name, 0)  # a non-number fails here, with its name, before torch parses it
    if backend is None:  # nccl for the model's tensors, gloo so that CPU statistics can be reduced too
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if "nccl" in backend:
        local = _env_int("LOCAL_RANK", 0)
        if local >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} CUDA "
                                   "device(s), and nccl needs one per process; start at most that many processes "
                                   "per node (--nproc_per_node), or use backend='gloo'")
        torch.cuda.set_device(local)
    torch.distributed.init_process_group(backend=backend, timeout=timeout)
    return (f"initialised a {backend} process group from the launcher's environment (rank "
            f"{torch.distributed.get_rank()} of {torch.distributed.get_world_size()})")


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place (through the backend's device when it cannot take this one)."""
    if not active():
        return tensor
    wire = tensor.to(_wire_device(tensor))
    torch.distributed.all_reduce(wire, op=torch.distributed.ReduceOp.SUM)
    if wire is not tensor:
        tensor.copy_(wire)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over the ranks, as a new tensor (the input is untouched); `tensor` itself without a
    process group. Floating tensors only: an integer mean would be truncated."""
    if not tensor.is_floating_point():
        raise DistributedError(f"all_reduce_mean needs a floating-point tensor, got {tensor.dtype} (an integer "
                               "mean would be truncated); convert it with .float() first")
    if not active():
        return tensor
    total = all_reduce_sum_(tensor.detach().clone())
    return total / torch.distributed.get_world_size()


def all_reduce_weighted_mean(tensor: torch.Tensor, weight: float) -> torch.Tensor:
    """Σ_r weight_r · tensor_r / Σ_r weight_r: the mean over the union when each rank's `tensor` is a mean over
    `weight` items (e.g. loss tokens) and the ranks hold different counts, where a plain mean of means is not."""
    if not tensor.is_floating_point():
        raise DistributedError(f"all_reduce_weighted_mean needs a floating-point tensor, got {tensor.dtype}; "
                               "convert it with .float() first")
    if not active():
        return tensor
    packed = torch.cat([tensor.detach().flatten().double() * weight,
                        torch.tensor([float(weight)], dtype=torch.float64, device=tensor.device)])
    all_reduce_sum_(packed)  # one collective for the values and the total weight
    if packed[-1] <= 0:
        raise DistributedError("all_reduce_weighted_mean: the weights sum to zero over all ranks (no rank has an "
                               "item to average); give every batch at least one loss token")
    return (packed[:-1] / packed[-1]).view(tensor.shape).to(tensor.dtype)


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (any picklable value; for a handful of indices, not for weights)."""
    if active():
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def broadcast_tensors_(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite every tensor with rank 0's, in place (same shapes and order on every rank)."""
    if not active():
        return
    for t in tensors:
        device = _wire_device(t)
        wire = t.detach() if device == t.device else t.detach().to(device)
        torch.distributed.broadcast(wire, src=0)
        if device != t.device:
            t.detach().copy_(wire)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order ([obj] for one process)."""
    if not active():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def digest(batches: Iterable[dict]) -> str:
    """A short hash of batches' tensors (names, dtypes, shapes, values): equal on ranks given the same data."""
    h = hashlib.blake2b(digest_size=16)
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            if isinstance(value, torch.Tensor):
                t = value.detach().to("cpu", copy=True).contiguous()  # a copy: .numpy() pins a storage's size
                h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every FSDP2 (`fully_shard`) module of `model` holds its full, unsharded parameters, so code that
    reads weights (save, merge, export) sees whole tensors; they are resharded afterwards. Collective: call it on
    every rank. Without FSDP2 modules it changes nothing. Keep no `.numpy()` view of a gathered tensor: it pins
    the storage that resharding frees ("Trying to resize storage that is not resizable")."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
    try:
        yield model
    finally:
        for m in reversed(sharded):
            m.reshard()


def fsdp_modules(model: nn.Module) -> list[str]:
    """The names of `model`'s FSDP2 (`fully_shard`) modules ("" for the root); empty when nothing is sharded."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]


def refuse_sharded(model: nn.Module, verb: str) -> None:
    """Refuse `verb` on an FSDP2-sharded model, before anything changes (the module docstring says why)."""
    if fsdp_modules(model):
        raise DistributedError(
            f"{verb} changes base weights in place, which FSDP2 cannot take (a change to the gathered weights is "
            "lost when they are resharded); save the adapter instead (subtune.save gathers the shards and rank 0 "
            f"writes it), then {verb} in one process on a plain base: subtune.load(base, adapter_dir)")


def on_main_process(what: str, fn: Callable[[], T], collective: bool = False) -> T | None:
    """Run `fn` (a write) on rank 0 only. Not `collective`: the other ranks return None at once, with no
    communication, so rank 0 may also call it alone (the HF Trainer saves checkpoints from rank 0 only).
    `collective` (every rank calls it, as it must under FSDP2, whose gather is collective): every rank waits for
    rank 0 and gets its result; if rank 0 fails, it raises its own error and the others a DistributedError naming
    it. One process: just `fn()`."""
    if not active():
        return fn()
    if not collective:
        return fn() if is_main_process() else None
    result, error = None, None
    if is_main_process():
        try:
            result = fn()
        except Exception as e:  # re-raised below, after the other ranks have heard of it
            error = e
    outcome = broadcast_from_rank0({"result": result,
                                    "error": None if error is None else f"{type(error).__name__}: {error}"})
    if error is not None:
        raise error
    if outcome["error"] is not None:
        raise DistributedError(f"{what} failed on rank 0, which writes for every rank ({outcome['error']}); fix "
                               "that error, every rank stops")
    return outcome["result"]


class BatchShare:
    """This rank's part of the first `limit` batches of a calibration pass (core/calibration.py), and the
    agreement of the ranks afterwards.

    One process (or `whole`: a sequential pass) takes every batch. Under a process group each rank reads every
    batch (hashing it, to check that all ranks were given the same data) and computes on every world-th one; the
    statistics are then summed across ranks, so each rank holds the global statistic (the module docstring says
    why all-reduce rather than a rank-0 broadcast). A `whole` pass instead takes rank 0's statistics.
    """

    def __init__(self, whole: bool):
        self.active = active()
        self.whole = whole
        self.rank, self.world = (0, 1) if whole or not self.active else (rank(), world_size())
        self.read, self.hash = 0, hashlib.blake2b(digest_size=16)

    def take(self, batches: Iterable[dict], limit: int | None) -> Iterator[dict]:
        for i, batch in enumerate(islice(batches, limit)):  # never reads a batch past `limit`
            self.read += 1
            if self.active:
                self.hash.update(digest([batch]).encode())
            if i % self.world == self.rank:
                yield batch

    def total(self, batches: Iterable[dict], limit: int | None) -> int | None:
        """How many batches this rank computes on at most, for the progress bar (None: unknown)."""
        n = limit
        if hasattr(batches, "__len__"):
            n = len(batches) if limit is None else min(limit, len(batches))
        return None if n is None else len(range(self.rank, n, self.world))

    def agree(self, totals: dict, keys: list, seen: int, error: Exception | None, desc: str) -> int:
        """Raise `error` (every rank, if any rank failed), check the ranks read the same batches, and leave the
        global statistic in `totals` (summed over ranks, or rank 0's for a whole pass). Returns the global count of
        batches computed on."""
        if not self.active:
            if error is not None:
                raise error
            return seen
        ranks = all_gather_objects({
            "error": None if error is None else f"{type(error).__name__}: {error}", "read": self.read,
            "digest": self.hash.hexdigest(), "seen": seen,
            "shapes": {i: (tuple(totals[k].shape), totals[k].dtype, totals[k].device.type)
                       for i, k in enumerate(keys) if k in totals}})
        _raise_on_disagreement(ranks, error, desc)
        shapes = {}
        for info in ranks:
            shapes.update(info["shapes"])
        for i in sorted(shapes):  # the same keys, in the same order, on every rank
            shape, dtype, device = shapes[i]
            if keys[i] not in totals:  # this rank's share reached no gradient or hook of this key
                totals[keys[i]] = torch.zeros(shape, dtype=dtype, device=_local(device))
            if self.whole:
                broadcast_tensors_([totals[keys[i]]])
            else:
                all_reduce_sum_(totals[keys[i]])
        return ranks[0]["seen"] if self.whole else sum(info["seen"] for info in ranks)


def _raise_on_disagreement(ranks: list[dict], error: Exception | None, desc: str) -> None:
    """A failed rank re-raises its own error, the others name it; ranks that read different batches all refuse."""
    failed = next((r for r, info in enumerate(ranks) if info["error"]), None)
    if error is not None:
        raise error
    if failed is not None:
        raise DistributedError(f"calibration ({desc}) failed on rank {failed} ({ranks[failed]['error']}); fix that "
                               "rank's error, every rank stops")
    if len({(info["read"], info["digest"]) for info in ranks}) > 1:
        read = ", ".join(f"rank {r}: {info['read']} batches, digest {info['digest'][:8]}"
                         for r, info in enumerate(ranks))
        raise DistributedError(f"calibration ({desc}): the ranks were given different calibration batches ({read}), "
                               "so they would choose different weights to train; pass the same (global) calibration "
                               "batches on every rank: the pass splits them across ranks itself")


def _local(device_type: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device(device_type)


def _wire_device(tensor: torch.Tensor) -> torch.device:
    """The device a collective on `tensor` runs on: its own, unless the group has only nccl and it is on the CPU."""
    backend = str(torch.distributed.get_backend())
    if tensor.device.type == "cpu" and "gloo" not in backend and "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not a whole number; the launcher sets it (torchrun, accelerate "
                               f"launch): unset {name} or start the processes with a launcher") from None


def trainer_fsdp_args(enabled: bool) -> dict:
    """The TrainingArguments that make the HF Trainer shard the base with FSDP2 (the CLI's `--fsdp`): {} when not
    asked; refused without CUDA, where the stock Trainer cannot shard (docs/DISTRIBUTED.md)."""
    if not enabled:
        return {}
    if not torch.cuda.is_available():
        raise DistributedError(
            "--fsdp needs CUDA: on the CPU the HF Trainer does not shard (accelerate's MULTI_CPU mode ignores the FSDP "
            "plugin, and the Trainer's DDP wrap refuses sharded parameters); drop --fsdp to train with DDP, or shard "
            "from Python: subtune.prepare, then torch.distributed.fsdp.fully_shard on each decoder layer and the "
            "root, then your own loop (docs/DISTRIBUTED.md, FSDP2)")
    return {"fsdp": "full_shard auto_wrap", "fsdp_config": {"version": 2, "reshard_after_forward": True}}
