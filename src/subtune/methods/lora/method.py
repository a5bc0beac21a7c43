from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from subtune.core.config import check_rank_fits
from subtune.core.deltas import Delta
from subtune.core.errors import AdapterLoadError, SubtuneError
from subtune.core.method import Method, Selection, register_method
from subtune.core.surgery import find_targets, replace_module
from subtune.methods.lora.config import DoraConfig, LoraConfig  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # peft (and the bitsandbytes it imports) loads when LoRA is used, not at import
    from peft.tuners.lora import LoraLayer

ADAPTER = "default"


def _lora_params_per_rank(model_config, targets: list[str]) -> int:
    """LoRA values per unit of rank over all layers: sum of (in + out) of the targeted projections."""
    from subtune.core.surgery import linear_shapes

    shapes = linear_shapes(model_config)
    return model_config.num_hidden_layers * sum(sum(shapes[t]) for t in targets)


def _lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _is_dora(layer: LoraLayer) -> bool:
    return ADAPTER in layer.lora_magnitude_vector


@torch.no_grad()
def dora_update(layer: LoraLayer) -> torch.Tensor:
    """W' − W of a DoRA layer, (out, in), as its forward computes W' = m / ‖W + s·B A‖_row · (W + s·B A) (PEFT's
    DoRA: one norm per output row of the unmerged weight), in the adapter's fp32."""
    weight = layer.get_base_layer().weight.detach()
    lora = layer.get_delta_weight(ADAPTER).detach()  # s·B A
    dtype = torch.promote_types(lora.dtype, torch.float32)
    weight, lora = weight.to(dtype), lora.to(weight.device, dtype)
    magnitude = layer.lora_magnitude_vector[ADAPTER]
    norm = magnitude.get_weight_norm(weight, lora, scaling=1).detach()
    factor = (magnitude.weight.detach().to(dtype) / norm).view(-1, 1)
    return factor * (weight + lora) - weight


class PeftLoraMethod(Method):
    config_class = LoraConfig

    demo = {"lr": 5e-3}
    default_lr = 1e-2  # docs/DEFAULTS.md sweep (LoRA and DoRA share it); 3e-2 diverges on the embedded model

    def __init__(self, method_id: str, config_class: type[LoraConfig], paper: str,
                 bench_reference: str | None = None):
        self.id, self.config_class, self.paper = method_id, config_class, paper
        self.bench_reference = bench_reference

    def attach(self, model: nn.Module, config: LoraConfig, selection: Selection) -> None:
        targets = find_targets(model, config.target_modules)  # our clear error before PEFT's
        check_rank_fits(self.id, config.r, {n: (m.out_features, m.in_features) for n, m in targets.items()})
        import peft

        peft.inject_adapter_in_model(config.to_peft(), model, adapter_name=ADAPTER)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
            if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()  # fp32 masters on a low-precision base (PEFT casts inputs to match)

    def config_for_budget(self, model_config, trainable: int) -> LoraConfig:
        """The rank whose LoRA on the default targets trains about `trainable` values."""
        per_rank = _lora_params_per_rank(model_config, self.config_class().target_modules)
        return self.config_class(r=max(1, round(trainable / per_rank)))

    def deltas(self, model: nn.Module, state) -> dict[str, Delta]:
        """LoRA: lowrank(A, B, scaling) per layer, PEFT's own factors. DoRA: its update depends on W through the
        row norms, so it is stated dense, computed from the live (unmerged) layer."""
        out = {}
        for name, layer in _lora_layers(model).items():
            if not _is_dora(layer):
                out[name] = Delta.lowrank(layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight,
                                          float(layer.scaling[ADAPTER]))
            elif state.merged:
                raise SubtuneError(f"{self.id}: the update of a merged DoRA model cannot be read off its layers; "
                                   "call subtune.unmerge(model) first, then save or export")
            else:
                out[name] = Delta.dense(dora_update(layer))
        return out

    def training_state(self, model: nn.Module, state) -> dict[str, torch.Tensor]:
        """DoRA: PEFT's tensors (A, B, magnitudes), which its dense deltas cannot give back. LoRA: none."""
        if not any(_is_dora(layer) for layer in _lora_layers(model).values()):
            return {}
        import peft

        return dict(peft.get_peft_model_state_dict(model, adapter_name=ADAPTER))

    @torch.no_grad()
    def restore(self, model: nn.Module, state, deltas: Mapping[str, Delta],
                training_state: Mapping[str, torch.Tensor]) -> None:
        if training_state:  # DoRA
            import peft

            result = peft.set_peft_model_state_dict(model, dict(training_state), adapter_name=ADAPTER)
            missing = [k for k in result.missing_keys if "lora_" in k]
            if missing or result.unexpected_keys:
                raise AdapterLoadError(f"{self.id} tensors do not fit: missing {missing[:5]}, "
                                       f"unexpected {result.unexpected_keys[:5]}; the adapter is corrupt or was "
                                       "edited: re-save it from the trained model")
            return
        for name, layer in _lora_layers(model).items():  # the core checked kinds, shapes and the scale
            layer.lora_A[ADAPTER].weight.copy_(deltas[name].A)
            layer.lora_B[ADAPTER].weight.copy_(deltas[name].B)

    def merge(self, model: nn.Module) -> None:
        for layer in _lora_layers(model).values():
            layer.merge(adapter_names=[ADAPTER])

    def unmerge(self, model: nn.Module) -> None:
        for layer in _lora_layers(model).values():
            layer.unmerge()

    def unload(self, model: nn.Module) -> None:
        for name, layer in _lora_layers(model).items():
            replace_module(model, name, layer.get_base_layer())
        if hasattr(model, "peft_config"):
            del model.peft_config


register_method(PeftLoraMethod("lora", LoraConfig, "LoRA (Hu et al., 2021, arXiv 2106.09685)",
                               bench_reference="LoRA"))
register_method(PeftLoraMethod("dora", DoraConfig, "DoRA (Liu et al., 2024, arXiv 2402.09353)"))
