"""Model surgery on ordinary HF LLaMA-layout models: checks, target lookup, module swaps, freezing."""

from __future__ import annotations

from torch import nn

from subtune.core.config import LLAMA_LINEARS
from subtune.core.errors import ModelLayoutError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a LLaMA-layout causal LM (`model.model.layers`), or a clear error."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ModelLayoutError(
            f"{type(model).__name__} does not have the LLaMA module layout (model.model.layers[i].self_attn."
            f"{{q,k,v,o}}_proj, .mlp.{{gate,up,down}}_proj); subtune supports LlamaForCausalLM-style models "
            "(LLaMA 1/2/3, Mistral, Qwen2)")
    first = layers[0]
    missing = [n for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj") if _get(first, n) is None]
    if missing:
        raise ModelLayoutError(
            f"{type(model).__name__} layer 0 lacks {missing}; subtune needs the LLaMA module layout")
    return layers


def _get(module: nn.Module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def find_targets(model: nn.Module, target_modules: list[str], kinds: tuple[type, ...] = (nn.Linear,)
                 ) -> dict[str, nn.Module]:
    """Modules inside decoder layers whose last name component is in target_modules (e.g. 'q_proj').

    Raises with the list of names that exist when a target matches nothing.
    """
    decoder_layers(model)
    found: dict[str, nn.Module] = {}
    existing: set[str] = set()
    for name, module in model.named_modules():
        if ".layers." not in name or not isinstance(module, kinds):
            continue
        short = name.rsplit(".", 1)[-1]
        existing.add(short)
        if short in target_modules:
            found[name] = module
    unmatched = sorted(set(target_modules) - {n.rsplit(".", 1)[-1] for n in found})
    if unmatched:
        raise ModelLayoutError(
            f"target module(s) {unmatched} match no linear layer; the model has {sorted(existing)} "
            f"(LLaMA names: {list(LLAMA_LINEARS)})")
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def wrap_linear(model: nn.Module, name: str, make_layer) -> nn.Module:
    """Replace the nn.Linear at `name` by `make_layer(linear)`; a clear error if it is not an nn.Linear (e.g. an
    adapter saved for another architecture, or a model quantised before `prepare`)."""
    base = model.get_submodule(name)
    if not isinstance(base, nn.Linear):
        raise ModelLayoutError(f"{name} is {type(base).__name__}, expected nn.Linear; prepare the plain (unquantised, "
                               "un-adapted) base model")
    layer = make_layer(base)
    replace_module(model, name, layer)
    return layer


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def head_dim(config) -> int:
    """Per-head size from the config; explicit `head_dim` wins over hidden/heads (Qwen3, Gemma)."""
    explicit = getattr(config, "head_dim", None)
    return int(explicit) if explicit else config.hidden_size // config.num_attention_heads


def kv_heads(config) -> int:
    """Key/value heads from the config: `num_key_value_heads` (GQA) when set, else one per attention head (MHA)."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each LLaMA projection, from the config alone."""
    dh = head_dim(config)
    heads = config.num_attention_heads
    kv = kv_heads(config)
    h, k = config.hidden_size, config.intermediate_size
    return {"q_proj": (heads * dh, h), "k_proj": (kv * dh, h), "v_proj": (kv * dh, h), "o_proj": (h, heads * dh),
            "gate_proj": (k, h), "up_proj": (k, h), "down_proj": (h, k)}
