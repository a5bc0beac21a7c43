"""`subtune plan`: the memory one training rank needs, estimated before launching, for one method or all.

Nothing of the real size is allocated. The trainable count comes from the method prepared on the whole
architecture with no weight values: its selection runs on the `meta` device, and it attaches there, or, where
its layers check their indices, on a *hollow* copy whose weights are one zero each, broadcast to their shape (no
memory). A method that reads values to select (SMT's warm-up, S²FT's data strategies, SensZOQ's mask, LaMDA's
SVD) is instead prepared for real on *proxies*: the same widths with 1 and 2 decoder layers and a 128-token
vocabulary; a count for L layers is then `one_layer + (L - 1) * per_layer` (exact for per-layer budgets plus a
constant, such as a global block count) and the vocabulary's share is added from its real size. The proxies also
give the activations (below), so every method is prepared on them; they cost about two decoder layers of memory.

Per rank, in bytes (e: bytes per base element, 2 for bf16, 4 for fp32; N: world size; b, s: per-device batch
and sequence length; V: vocabulary):

- base weights: the frozen parameters and buffers of the prepared model (a SensZOQ 4-bit base is counted as
  stored); /N with FSDP2.
- trainable values: their stored entries (fp32 master values); gradients: as many again (none for zeroth-order
  methods); AdamW: two fp32 moments per entry (none for zeroth-order); all /N with FSDP2, where the method layers
  are sharded with their decoder layer (core/distributed.py).
- DDP (N > 1, no FSDP2): + one copy of the gradients (DDP's all-reduce buckets).
  FSDP2: + two decoder layers unsharded at a time (the gathered layer and the prefetched next one).
- activations: the peak that torch allocates in one step (forward + backward, each gradient of a trained value
  dropped as it comes; for zeroth-order methods, one inference forward), measured with torch.profiler on the
  proxies (real storage: uninitialised for a meta proxy, since HF's attention-mask code reads values) at 64 and
  128 tokens. Per token it is a constant plus a per-layer share (what each layer keeps for its backward), and a part
  that does not grow with tokens (a weight-sized transient) is counted once: fixed + b·s·(c + L·l). Plus
  b·s·(V - 128)·4·4 for the real vocabulary (four fp32 tokens x V tensors at the loss: logits, log-softmax, and
  their gradients). With gradient checkpointing each layer keeps only its input (b·s·hidden·e) and one layer's
  activations exist at a time (recomputed in its backward): fixed + b·s·(c + l + L·hidden·e). Allocated bytes, as
  CUDA's max_memory_allocated counts them; a CPU process's RSS runs higher (the allocator keeps freed memory).

Attention is assumed to be a fused SDPA kernel (nothing of size s² is kept), as HF uses by default.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # torch.profiler's own log lines (profiler_start/stop) would clutter

PROXY_VOCAB = 128
CALIBRATION_SEQ = 16  # tokens of the random calibration batches of a real proxy
TRACE_TOKENS = (64, 128)  # the step is measured at two lengths: what grows with tokens, and what does not
VOCAB_COPIES = 4  # fp32 (tokens x vocabulary) tensors alive at the loss: logits, log-softmax, and their gradients
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
GIB = 2**30


@dataclass
class Census:
    """What one prepared proxy holds and saves."""

    trainable: int
    trainable_bytes: int
    frozen_bytes: int
    step_peaks: tuple[int, int]  # a step's activation peak at each of TRACE_TOKENS (_step_peak)
    layer_input_bytes: int  # one layer's input hidden state, per token
    embedding_trains: bool


@dataclass
class MemoryPlan:
    """The estimate for one method on one rank, in bytes."""

    method: str
    trainable: int
    counted: str  # "meta", "hollow" (the whole architecture, no values) or "1- and 2-layer proxies"
    world_size: int
    fsdp: bool
    batch: int
    seq: int
    dtype: str
    zeroth_order: bool
    weights: int
    trainable_values: int
    gradients: int
    optimizer: int
    communication: int
    activations: int
    activations_checkpointed: int
    notes: list[str] = field(default_factory=list)

    def total(self, checkpointing: bool = False) -> int:
        acts = self.activations_checkpointed if checkpointing else self.activations
        return self.weights + self.trainable_values + self.gradients + self.optimizer + self.communication + acts

    def beyond_weights(self, checkpointing: bool = False) -> int:
        """What a training step adds on top of the loaded base (what `subtune bench`'s peak_mib measures)."""
        return self.total(checkpointing) - self.weights


def model_config(name_or_path: str):
    """A model's architecture (no weights): 'default', a bench preset (subtune.bench.presets) or a local HF dir."""
    from subtune.bench.presets import PRESETS, preset_config

    if name_or_path in PRESETS:
        return preset_config(name_or_path)
    from subtune.zoo import resolve_model_path

    return preset_config(str(resolve_model_path(name_or_path)))


def _proxy_config(config, layers: int):
    proxy = copy.deepcopy(config)
    proxy.num_hidden_layers = layers
    proxy.vocab_size = PROXY_VOCAB
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # ids of the real vocabulary may not fit
        setattr(proxy, name, None)
    return proxy


def _build(config, device: str, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    return model


def _hollow(model) -> None:
    """Give every meta parameter of `model` one real zero broadcast to its shape: real tensors, no memory."""
    import torch
    from torch import nn

    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                zero = torch.zeros((), dtype=p.dtype).expand(p.shape)
                setattr(module, name, nn.Parameter(zero, requires_grad=p.requires_grad))


def _meta_selection(config, method_config, dtype):
    """The method's selection made on a `meta` model of `config`, or None where selecting reads values (an SVD, a
    spectrum, calibration data). Returns (model, selection)."""
    from subtune.core.method import get_method
    from subtune.core.rollback import seeded

    method = get_method(method_config.method)
    if method.calibration_batches(method_config):
        return None, None
    model = _build(config, "meta", dtype)
    try:  # select by hand: prepare refuses meta weights on purpose (they cannot be trained)
        with seeded(method_config.seed):
            return model, method.select(model, method_config, None)
    except (RuntimeError, NotImplementedError):
        return None, None


def _attached(model, method_config, selection) -> bool:
    """Attach the selection by hand (False where a layer reads a value of a meta tensor, e.g. checks indices)."""
    from subtune.core.method import get_method
    from subtune.core.rollback import seeded
    from subtune.core.surgery import freeze

    freeze(model)
    try:
        with seeded(method_config.seed):
            get_method(method_config.method).attach(model, method_config, selection)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _sizes(model) -> tuple[int, int, int]:
    """(trainable values, their bytes, frozen parameter and buffer bytes) of a prepared model."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    frozen = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    frozen += sum(b.numel() * b.element_size() for b in model.buffers())
    return sum(p.numel() for p in trainable), sum(p.numel() * p.element_size() for p in trainable), frozen


def whole_model_census(config, method_config, dtype) -> tuple[int, int, int, str] | None:
    """(trainable values, their bytes, frozen bytes, how) of the method on the whole architecture without weight
    values, or None where its selection reads values (module docstring)."""
    from subtune.core.method import Selection

    model, selection = _meta_selection(config, method_config, dtype)
    if model is None:
        return None
    if _attached(model, method_config, selection):
        return (*_sizes(model), "meta")
    model = _build(config, "meta", dtype)  # a layer checked its indices: a hollow copy has real (empty) tensors
    _hollow(model)
    on_cpu = Selection({k: t.to("cpu") for k, t in selection.tensors.items()}, selection.info)
    return (*_sizes(model), "hollow") if _attached(model, method_config, on_cpu) else None


def _prepare_proxy(config, method_config, dtype):
    """A proxy prepared with the method: on `meta` where it can be (then given uninitialised storage, for the
    step's measurement), else for real, with calibration batches of random tokens."""
    import torch

    import subtune
    from subtune.data.calibration import calibration_for

    model, selection = _meta_selection(config, method_config, dtype)
    if model is not None and _attached(model, method_config, selection):
        model.to_empty(device="cpu")  # HF's attention-mask code reads values
        return model
    model = _build(config, "cpu", dtype)
    ids = torch.randint(0, PROXY_VOCAB, (1, CALIBRATION_SEQ), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    subtune.prepare(model, method_config, calibration=calibration_for(method_config, batch=batch))
    return model


def peak_allocated(step) -> int:
    """The peak of the bytes torch allocates on the CPU while `step()` runs, above the level where it started
    (torch.profiler's memory records, in time order; allocator caching and fragmentation are not in it)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    changes = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                     for e in prof.events())
    level = peak = 0
    for _, change in changes:
        level += change
        peak = max(peak, level)
    return peak


def _step_peak(model, zeroth_order: bool, tokens: int) -> int:
    """The activation peak of one step on a proxy over one row of `tokens` tokens: forward + backward (the
    gradients of the trained values dropped as they come: they are counted on their own), or a ZO step's inference
    forward."""
    import torch

    ids = torch.zeros(1, tokens, dtype=torch.long)
    if zeroth_order:
        model.eval()

        def step():
            with torch.inference_mode():
                model(input_ids=ids, labels=ids)
        return peak_allocated(step)
    model.train()
    # each gradient is dropped as soon as it is accumulated: they are counted on their own, not here
    hooks = [p.register_post_accumulate_grad_hook(_drop_grad) for p in model.parameters() if p.requires_grad]
    try:
        return peak_allocated(lambda: model(input_ids=ids, labels=ids).loss.backward())
    finally:
        for hook in hooks:
            hook.remove()


def _drop_grad(p) -> None:
    p.grad = None


def census(config, method_config, layers: int, dtype, zeroth_order: bool) -> Census:
    import torch

    model = _prepare_proxy(_proxy_config(config, layers), method_config, dtype)
    trainable, trainable_bytes, frozen = _sizes(model)
    element = torch.tensor([], dtype=dtype).element_size()
    return Census(trainable=trainable, trainable_bytes=trainable_bytes, frozen_bytes=frozen,
                  step_peaks=tuple(_step_peak(model, zeroth_order, t) for t in TRACE_TOKENS),
                  layer_input_bytes=config.hidden_size * element,
                  embedding_trains=model.get_input_embeddings().weight.requires_grad)


def _activations(one: Census, two: Census, layers: int, tokens: int, zeroth_order: bool) -> tuple[int, int]:
    """(activations, with gradient checkpointing) at `tokens` per device, from the proxies' step peaks: per token,
    a constant plus a per-layer share (the saved activations); plus the largest part that does not grow with
    tokens (a weight-sized transient), counted once."""
    (t1, t2), span = TRACE_TOKENS, TRACE_TOKENS[1] - TRACE_TOKENS[0]
    slope1, slope2 = ((c.step_peaks[1] - c.step_peaks[0]) / span for c in (one, two))
    per_layer = 0.0 if zeroth_order else max(slope2 - slope1, 0.0)  # nothing is kept from layer to layer in ZO
    per_token = slope1 - per_layer
    fixed = max(0.0, one.step_peaks[0] - t1 * slope1, two.step_peaks[0] - t1 * slope2)
    acts = fixed + tokens * (per_token + layers * per_layer)
    # checkpointed: every layer keeps only its input, one layer's activations are recomputed at a time
    ckpt = acts if zeroth_order else fixed + tokens * (per_token + per_layer + layers * one.layer_input_bytes)
    return int(acts), int(ckpt)


def extrapolate(one: int, two: int, layers: int) -> int:
    """The value at `layers` decoder layers from the 1- and 2-layer proxies (per layer plus a constant)."""
    return one + (layers - 1) * (two - one)


def estimate(config, method_config, *, world_size: int = 1, fsdp: bool = False, batch: int = 1, seq: int = 512,
             dtype: str = "bf16") -> MemoryPlan:
    """The per-rank memory of training `method_config` on a model of `config`'s architecture (module docstring)."""
    import torch

    from subtune.core.config import ConfigError
    from subtune.core.method import get_method

    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}; give fp32 or bf16")
    for name, value in (("world_size", world_size), ("batch", batch), ("seq", seq)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} {value!r} cannot work; give a whole number >= 1")
    method = get_method(method_config.method)
    method_config.validate()
    zo = method.zeroth_order
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    e = DTYPE_BYTES[dtype]
    one, two = (census(config, method_config, n, torch_dtype, zo) for n in (1, 2))
    layers = config.num_hidden_layers
    extra_vocab = (config.vocab_size - PROXY_VOCAB) * config.hidden_size
    extra_vocab *= 1 if getattr(config, "tie_word_embeddings", False) else 2
    whole = whole_model_census(config, method_config, torch_dtype)
    if whole is not None:
        trainable, trainable_bytes, frozen, counted = whole
    else:
        counted = "1- and 2-layer proxies"
        trainable = extrapolate(one.trainable, two.trainable, layers)
        trainable_bytes = extrapolate(one.trainable_bytes, two.trainable_bytes, layers)
        frozen = extrapolate(one.frozen_bytes, two.frozen_bytes, layers)
        if one.embedding_trains:  # the real vocabulary's rows train too (fp32 values)
            trainable, trainable_bytes = trainable + extra_vocab, trainable_bytes + 4 * extra_vocab
        else:
            frozen += e * extra_vocab
    layer_bytes = (two.frozen_bytes - one.frozen_bytes) + (two.trainable_bytes - one.trainable_bytes)
    shard = world_size if fsdp else 1
    grads = 0 if zo else trainable_bytes
    tokens = batch * seq
    acts, ckpt = _activations(one, two, layers, tokens, zo)
    vocab = tokens * (config.vocab_size - PROXY_VOCAB) * VOCAB_COPIES * 4
    acts, ckpt = acts + vocab, ckpt + vocab
    notes = []
    if whole is None:
        notes.append("counted on real 1- and 2-layer proxies (the method reads values to select)")
    comm = 0
    if fsdp and world_size > 1:
        comm = 2 * layer_bytes
    elif world_size > 1 and not zo:
        comm = grads
    return MemoryPlan(
        method=method.id, trainable=trainable, counted=counted, world_size=world_size, fsdp=fsdp,
        batch=batch, seq=seq, dtype=dtype, zeroth_order=zo, weights=frozen // shard,
        trainable_values=trainable_bytes // shard, gradients=grads // shard,
        optimizer=0 if zo else 8 * trainable // shard, communication=comm, activations=acts,
        activations_checkpointed=ckpt, notes=notes)


def plan(model: str, methods: list[str], **kwargs) -> list[MemoryPlan]:
    """`estimate` for each method's default config (the method ids of the registry, or every one)."""
    from subtune.core.method import get_method

    config = model_config(model)
    return [estimate(config, get_method(m).config_class(), **kwargs) for m in methods]


def format_plans(plans: list[MemoryPlan], model: str) -> str:
    """A Markdown table (GiB per rank), with and without gradient checkpointing."""
    first = plans[0]
    mode = f"FSDP2 over {first.world_size}" if first.fsdp else ("DDP over " if first.world_size > 1 else "") + \
        (f"{first.world_size} ranks" if first.world_size > 1 else "one process")
    lines = [f"model {model}: {mode}, {first.dtype} base, per-device batch {first.batch} x {first.seq} tokens "
             "(GiB per rank)",
             "| method | trainable | weights | trainable values | grads | AdamW | comm. | activations | total | "
             "total, grad. ckpt |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in plans:
        cells = [p.weights, p.trainable_values, p.gradients, p.optimizer, p.communication, p.activations,
                 p.total(), p.total(checkpointing=True)]
        lines.append(f"| {p.method} | {p.trainable:,} | " + " | ".join(f"{c / GIB:.2f}" for c in cells) + " |")
    notes = sorted({f"{p.method}: {n}" for p in plans for n in p.notes})
    return "\n".join(lines + ([""] + notes if notes else []))
