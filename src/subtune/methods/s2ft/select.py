"""S²FT policy: which heads/channels to train. Units are whole heads (O: query heads, V: KV heads) or FFN channels.

Index-based selection (spec B5): nothing is permuted, so GQA, explicit head_dim and q/k/v biases need no special
care, and saved indices line up with the base model.

`disjoint_from` (the paper's non-overlapping fusion variant): the units that saved adapters train are read from their
columns/rows deltas (`subtune.core.api.read_deltas`, no method code) and left out of the candidates, per trained
matrix; the choice is then made among the free units exactly as it is made over all units (same draws, same scores).
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from subtune.core.calibration import Calibration, accumulate_activation_statistic, accumulate_gradient_statistic
from subtune.core.config import ConfigError
from subtune.core.distributed import broadcast_from_rank0
from subtune.core.errors import DataError, SubtuneError
from subtune.core.fingerprint import fingerprint, fingerprint_difference
from subtune.core.surgery import decoder_layers, head_dim
from subtune.methods.s2ft.config import COMPONENTS, S2FTConfig
from subtune.ops.sliced import INPUT_COLUMNS, OUTPUT_ROWS


@dataclass(frozen=True)
class Component:
    module: str  # attribute path inside a decoder layer
    kind: str  # INPUT_COLUMNS or OUTPUT_ROWS
    units: int  # candidate units per layer
    unit_size: int  # weight columns/rows per unit


def components(model: nn.Module) -> dict[str, Component]:
    cfg = model.config
    dh = head_dim(cfg)
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    k = cfg.intermediate_size
    return {
        "o_proj": Component("self_attn.o_proj", INPUT_COLUMNS, cfg.num_attention_heads, dh),
        "v_proj": Component("self_attn.v_proj", OUTPUT_ROWS, n_kv, dh),  # V rows only by whole KV heads
        "down_proj": Component("mlp.down_proj", INPUT_COLUMNS, k, 1),
        "up_proj": Component("mlp.up_proj", OUTPUT_ROWS, k, 1),
    }


def is_gqa(model: nn.Module) -> bool:
    cfg = model.config
    return (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) < cfg.num_attention_heads


def unit_count(total_units: int, ratio: float, name: str) -> int:
    n = int(total_units * ratio)
    if ratio > 0 and n == 0:
        warnings.warn(f"s2ft: {name} ratio {ratio} selects 0 of {total_units} units; training 1 instead",
                      stacklevel=3)
        n = 1
    return n


def _per_layer_counts(n: int, layers: int, rng: random.Random) -> list[int]:
    counts = [n // layers] * layers
    for i in rng.sample(range(layers), n % layers):
        counts[i] += 1
    return counts


def choose_units(n: int, layers: int, units: int, allocation: str, rng: random.Random,
                 scores: torch.Tensor | None, largest: bool, excluded: list[set[int]] | None = None,
                 what: str = "units") -> list[list[int]]:
    """Per layer, the sorted unit ids to train: random or by score, globally or uniformly over layers.

    `excluded` (per layer, unit ids) are never chosen; with nothing excluded the draws are today's exactly (sampling
    a list of the candidates picks the same positions as sampling the range)."""
    free = [[u for u in range(units) if not excluded or u not in excluded[layer]] for layer in range(layers)]
    chosen: list[list[int]] = [[] for _ in range(layers)]
    if allocation == "global":
        flat_free = [layer * units + u for layer in range(layers) for u in free[layer]]
        if scores is None:  # the official S²FT-R: uniform sampling over all (layer, unit) pairs
            flat = rng.sample(flat_free, n)
        else:
            flat = _top(scores.flatten(), flat_free, n, largest)
        for f in flat:
            chosen[f // units].append(f % units)
    else:
        for layer, count in enumerate(_per_layer_counts(n, layers, rng)):
            if count > len(free[layer]):
                raise ConfigError(
                    f"s2ft: allocation='uniform' needs {count} {what} in layer {layer}, but only {len(free[layer])} "
                    f"of its {units} are free after disjoint_from; use allocation='global' (it draws from every free "
                    "unit) or a smaller ratio")
            if scores is None:
                chosen[layer] = rng.sample(free[layer], count)
            else:
                chosen[layer] = _top(scores[layer], free[layer], count, largest)
    return [sorted(c) for c in chosen]


def _top(scores: torch.Tensor, candidates: list[int], n: int, largest: bool) -> list[int]:
    """The n candidates with the largest (smallest) scores."""
    index = torch.tensor(candidates, dtype=torch.long)
    return index[torch.topk(scores[index], n, largest=largest).indices].tolist()


def _unit_norms(per_index_sq: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Sum of squares per weight column/row -> L2 norm per unit."""
    return per_index_sq.view(-1, unit_size).sum(-1).sqrt()


def weight_scores(model: nn.Module, comp: Component) -> torch.Tensor:
    rows = []
    for layer in decoder_layers(model):
        w = layer.get_submodule(comp.module).weight.detach().float()
        sq = (w * w).sum(0) if comp.kind == INPUT_COLUMNS else (w * w).sum(1)
        rows.append(_unit_norms(sq, comp.unit_size))
    return torch.stack(rows)


def _per_index_sq(kind: str, t: torch.Tensor) -> torch.Tensor:
    """Σ t² per weight column (column slices) or per row (row slices), in fp32 on the CPU."""
    t = t.detach().float()
    return ((t * t).sum(0) if kind == INPUT_COLUMNS else (t * t).sum(1)).cpu()


def _per_layer_norms(comps: dict[str, Component], layers: int, totals: dict) -> dict[str, torch.Tensor]:
    return {name: torch.stack([_unit_norms(totals[name, li], comp.unit_size) for li in range(layers)])
            for name, comp in comps.items()}


def _check_read(calibration: Calibration, strategy: str) -> None:
    if calibration.batches == 0:
        raise DataError(f"s2ft: the calibration data gave no batch for strategy {strategy!r}; pass calibration "
                        "batches (dicts with input_ids, attention_mask, labels), or use strategy 'random' or 'weight'")


def activation_scores(model: nn.Module, comps: dict[str, Component], calibration, limit: int) -> dict[str, torch.Tensor]:
    """‖A‖₂ per unit: the trained matrix's input for column slices, its output for row slices."""
    layers = decoder_layers(model)
    modules = {(name, li): layer.get_submodule(comp.module) for name, comp in comps.items()
               for li, layer in enumerate(layers)}

    def statistic(key, inputs, output):
        kind = comps[key[0]].kind
        act = inputs[0] if kind == INPUT_COLUMNS else output
        return act.detach().float().pow(2).reshape(-1, act.shape[-1]).sum(0).cpu()

    result = accumulate_activation_statistic(model, modules, calibration, statistic, limit=limit,
                                             desc="s2ft activations")
    _check_read(result, "activation")
    return _per_layer_norms(comps, len(layers), result.statistics)


def gradient_scores(model: nn.Module, comps: dict[str, Component], calibration, limit: int) -> dict[str, torch.Tensor]:
    """‖∂L/∂W‖ per unit; each weight's gradient is folded into per-unit sums and dropped as soon as it exists."""
    layers = decoder_layers(model)
    weights = {(name, li): layer.get_submodule(comp.module).weight for name, comp in comps.items()
               for li, layer in enumerate(layers)}
    result = accumulate_gradient_statistic(model, weights, calibration,
                                           lambda key, grad: _per_index_sq(comps[key[0]].kind, grad),
                                           limit=limit, desc="s2ft gradients")
    _check_read(result, "gradient")
    return _per_layer_norms(comps, len(layers), result.statistics)


UNIT_NAMES = {"o_proj": "O query heads", "v_proj": "V key/value heads", "down_proj": "Down channels",
              "up_proj": "Up channels"}


def _unit_modules(model: nn.Module) -> dict[str, tuple[int, str, Component]]:
    """module path -> (layer, component, the component whose units it holds); Gate rows are Up channels."""
    comps = components(model)
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    out = {}
    for li in range(len(layers)):
        for name, comp in comps.items():
            out[f"{prefix}.{li}.{comp.module}"] = (li, name, comp)
        out[f"{prefix}.{li}.mlp.gate_proj"] = (li, "gate_proj", comps["up_proj"])
    return out


def _unit_deltas(directory: str, model: nn.Module, base_fingerprint: dict, modules: dict) -> dict:
    """The columns/rows deltas of the adapter in `directory`, each checked to name units of this model."""
    from subtune.core.api import read_adapter_config, read_deltas  # the generic reader: no method code

    where = f"s2ft: disjoint_from adapter {directory}"
    drop = "remove it from disjoint_from"
    try:
        cfg = read_adapter_config(directory)
    except SubtuneError as e:
        raise ConfigError(f"{where}: {e}; or {drop}") from None
    diff = fingerprint_difference(cfg["fingerprint"], base_fingerprint)
    if diff:
        raise ConfigError(f"{where} was trained on a different base model ({diff}; its base is "
                          f"{cfg.get('base_model_name_or_path')!r}), so its units say nothing about this one: train "
                          f"on the base it was made from, or {drop}")
    if cfg.get("base_changed"):
        raise ConfigError(f"{where} is a {cfg['method']!r} adapter that replaces base weights (base_changed), not "
                          f"a set of columns/rows deltas naming heads and channels; {drop}")
    try:
        deltas = read_deltas(directory)
    except SubtuneError as e:
        raise ConfigError(f"{where}: {e}; or {drop}") from None
    for path, delta in deltas.items():
        if delta.kind not in ("columns", "rows"):
            raise ConfigError(f"{where} is a {cfg['method']!r} adapter with {delta.kind} deltas (e.g. {path}); S²FT "
                              "can keep clear only of the heads and channels that columns/rows deltas (S²FT "
                              f"adapters) name: {drop}")
        _, name, comp = modules.get(path, (None, None, None))
        if comp is None or delta.kind != ("columns" if comp.kind == INPUT_COLUMNS else "rows"):
            raise ConfigError(f"{where} has a {delta.kind} delta on {path}, which is not a set of S²FT heads or "
                              "channels (O and Down input columns, V, Up and Gate output rows), so every unit there "
                              f"would overlap it; {drop}")
        if tuple(model.get_submodule(path).weight.shape) != delta.shape:
            raise ConfigError(f"{where}: its delta on {path} has shape {delta.shape}, but this model's weight is "
                              f"{tuple(model.get_submodule(path).weight.shape)}; {drop}")
    return deltas


def used_units(model: nn.Module, directories: list[str], train_gate_with_up: bool = False) -> dict[str, list[set[int]]]:
    """{component: per-layer set of unit ids} that the adapters in `directories` train.

    A unit is used when its delta touches any of its columns/rows (a head is used by any of its dh columns). Gate
    rows count as Up channels only when this run trains Gate with Up; otherwise they cannot overlap."""
    layers = len(decoder_layers(model))
    used: dict[str, list[set[int]]] = {name: [set() for _ in range(layers)] for name in COMPONENTS}
    if not directories:
        return used
    modules = _unit_modules(model)
    base_fingerprint = fingerprint(model)
    for directory in directories:
        for path, delta in _unit_deltas(directory, model, base_fingerprint, modules).items():
            layer, name, comp = modules[path]
            if name == "gate_proj":
                if not train_gate_with_up:
                    continue
                name = "up_proj"
            used[name][layer].update(torch.div(delta.index, comp.unit_size, rounding_mode="floor").tolist())
    return used


def _check_budget(name: str, n: int, total: int, used: int, ratio: float) -> None:
    free = total - used
    if n <= free:
        return
    field_name = COMPONENTS[name]
    fix = (f"set {field_name}=0" if free == 0 else f"lower {field_name} to at most {free / total:.4g}")
    raise ConfigError(f"s2ft: {field_name}={ratio} asks for {n} {UNIT_NAMES[name]}, but only {free} of {total} remain "
                      f"after excluding the {used} that the adapters in disjoint_from train; {fix}, or drop an "
                      "adapter from disjoint_from")


def select_units(model: nn.Module, config: S2FTConfig, calibration) -> dict[str, list[list[int]]]:
    """{component: per-layer sorted unit ids}. Deterministic given the seed; rank 0 decides under torch.distributed."""
    comps = components(model)
    ratios = config.resolved_ratios(is_gqa(model))
    active = {name: comps[name] for name, r in ratios.items() if r > 0}
    if not active:
        raise ConfigError(f"s2ft: no ratio > 0 for target_modules {config.target_modules} on this "
                          f"{'GQA' if is_gqa(model) else 'MHA'} model (resolved ratios {ratios}), so nothing would "
                          "train; set a ratio for a targeted module (e.g. d_ratio=0.03 with down_proj)")
    layers = len(decoder_layers(model))
    counts = {}
    for name, comp in active.items():  # a loop, not a comprehension: unit_count's warning points at our caller
        counts[name] = unit_count(layers * comp.units, ratios[name], name)
    excluded = used_units(model, config.disjoint_from, config.train_gate_with_up)  # before any calibration work
    for name, comp in active.items():
        _check_budget(name, counts[name], layers * comp.units, sum(len(u) for u in excluded[name]), ratios[name])
    scores: dict[str, torch.Tensor] = {}
    if config.strategy != "random":
        if calibration is None and config.strategy != "weight":
            raise SubtuneError(f"s2ft strategy {config.strategy!r} needs calibration batches: pass "
                               "calibration=<iterable of batches>, or use strategy 'random' or 'weight'")
        if config.strategy in ("weight", "weight_activation"):
            scores = {name: weight_scores(model, c) for name, c in active.items()}
        if config.strategy in ("activation", "weight_activation"):
            acts = activation_scores(model, active, calibration, config.calibration_batches)
            scores = {name: acts[name] * scores.get(name, 1.0) for name in active}
        if config.strategy == "gradient":
            scores = gradient_scores(model, active, calibration, config.calibration_batches)
    rng = random.Random(config.seed)
    selected = {}
    for name in ("o_proj", "v_proj", "down_proj", "up_proj"):  # fixed order: same draws for the same seed
        if name not in active:
            continue
        comp = active[name]
        selected[name] = choose_units(counts[name], layers, comp.units, config.allocation, rng, scores.get(name),
                                      largest=config.direction == "large", excluded=excluded[name],
                                      what=UNIT_NAMES[name])
    return broadcast_from_rank0(selected)
