from __future__ import annotations

import torch
from torch import nn

from subtune.core.method import LayerMethod, Selection, per_layer_summary, register_method
from subtune.core.surgery import decoder_layers, wrap_linear
from subtune.methods.s2ft.config import S2FTConfig
from subtune.methods.s2ft.select import components, is_gqa, select_units
from subtune.ops.sliced import SlicedDeltaLinear


def _expand(units: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Unit ids -> weight column/row indices (a head of size dh covers dh consecutive columns)."""
    return (units[:, None] * unit_size + torch.arange(unit_size)).flatten()


class S2FTMethod(LayerMethod):
    id = "s2ft"
    config_class = S2FTConfig
    layer_class = SlicedDeltaLinear
    paper = "S²FT (Yang et al., NeurIPS 2024, arXiv 2412.06289)"
    demo = {"lr": 2e-2, "config": {"o_ratio": 0.25, "v_ratio": 0.5, "d_ratio": 0.1, "u_ratio": 0.1}}
    default_lr = 3e-2  # docs/DEFAULTS.md sweep: few trained columns take a large lr (2e-4 left the loss where it was)

    def calibration_batches(self, config: S2FTConfig) -> int:
        return 0 if config.strategy in ("random", "weight") else config.calibration_batches

    def select(self, model, config: S2FTConfig, calibration) -> Selection:
        chosen = select_units(model, config, calibration)
        tensors, info = {}, {"units": {}}
        for comp_name, per_layer in chosen.items():
            for layer_idx, units in enumerate(per_layer):
                if units:  # a layer with no selected unit keeps its plain Linear (no zero-width parameters)
                    tensors[f"layers.{layer_idx}.{comp_name}"] = torch.tensor(units, dtype=torch.long)
            info["units"][comp_name] = sum(len(u) for u in per_layer)
        info["ratios"] = config.resolved_ratios(is_gqa(model))
        return Selection(tensors, info)

    def selection_summary(self, model, state) -> str:
        """Units per decoder layer: query heads for o_proj, KV heads for v_proj, FFN channels for down/up_proj."""
        counts = {key: len(units) for key, units in state.selection.tensors.items()}
        total = ", ".join(f"{n} {comp}" for comp, n in state.selection.info["units"].items() if n)
        return (f"s2ft selected {total} units (o_proj: query heads, v_proj: KV heads, down/up_proj: channels); per "
                f"layer: {per_layer_summary(counts, len(decoder_layers(model)))}")

    def config_for_budget(self, model_config, trainable: int) -> S2FTConfig:
        """The paper's split at a given budget: MHA -> half to O heads, half to Down channels; GQA -> Down only."""
        from subtune.core.surgery import head_dim, kv_heads

        layers, hidden, k = model_config.num_hidden_layers, model_config.hidden_size, model_config.intermediate_size
        heads = model_config.num_attention_heads
        gqa = kv_heads(model_config) < heads
        per_channel, per_head = hidden, head_dim(model_config) * hidden
        if gqa:
            return S2FTConfig(o_ratio=0.0, d_ratio=min(1.0, trainable / per_channel / (layers * k)))
        n_heads = max(1, round(trainable / 2 / per_head))
        n_channels = max(1, round((trainable - n_heads * per_head) / per_channel))
        # the small offset keeps int(total * ratio) from rounding a whole unit away
        return S2FTConfig(o_ratio=min(1.0, (n_heads + 0.5) / (layers * heads)),
                          d_ratio=min(1.0, (n_channels + 0.5) / (layers * k)))

    def _targets(self, model, selection: Selection):
        """(module path, component, unit ids) for every module with selected units, gate following up if asked."""
        comps = components(model)
        layers = decoder_layers(model)
        prefix = next(n for n, m in model.named_modules() if m is layers)
        for key, units in selection.tensors.items():
            _, layer_idx, comp_name = key.split(".")
            comp = comps[comp_name]
            yield f"{prefix}.{layer_idx}.{comp.module}", comp, units

    def attach(self, model: nn.Module, config: S2FTConfig, selection: Selection) -> None:
        comps = components(model)
        for path, comp, units in list(self._targets(model, selection)):
            paths = [path]
            if comp.module == comps["up_proj"].module and config.train_gate_with_up:
                paths.append(path.replace("up_proj", "gate_proj"))
            index = _expand(units, comp.unit_size)
            for p in paths:
                wrap_linear(model, p, lambda base: SlicedDeltaLinear(base, index, comp.kind))


register_method(S2FTMethod())
