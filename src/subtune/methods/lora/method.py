from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import peft
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from subtune.core import io
from subtune.core.config import check_rank_fits
from subtune.core.errors import AdapterLoadError, ExportError
from subtune.core.method import Method, Selection, register_method
from subtune.core.peft_format import PEFT_PREFIX, write_peft_adapter
from subtune.core.surgery import find_targets, replace_module
from subtune.methods.lora.config import DoraConfig, LoraConfig  # noqa: F401  (re-exported)

ADAPTER = "default"


def _lora_params_per_rank(model_config, targets: list[str]) -> int:
    """LoRA values per unit of rank over all layers: sum of (in + out) of the targeted projections."""
    from subtune.core.surgery import linear_shapes

    shapes = linear_shapes(model_config)
    return model_config.num_hidden_layers * sum(sum(shapes[t]) for t in targets)


def _lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


class PeftLoraMethod(Method):
    config_class = LoraConfig

    def __init__(self, method_id: str, config_class: type[LoraConfig], paper: str):
        self.id, self.config_class, self.paper = method_id, config_class, paper

    def attach(self, model: nn.Module, config: LoraConfig, selection: Selection) -> None:
        targets = find_targets(model, config.target_modules)  # our clear error before PEFT's
        check_rank_fits(self.id, config.r, {n: (m.out_features, m.in_features) for n, m in targets.items()})
        peft.inject_adapter_in_model(config.to_peft(), model, adapter_name=ADAPTER)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
            if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()  # fp32 masters on a low-precision base (PEFT casts inputs to match)

    def config_for_budget(self, model_config, trainable: int) -> LoraConfig:
        """The rank whose LoRA on the default targets trains about `trainable` values."""
        per_rank = _lora_params_per_rank(model_config, self.config_class().target_modules)
        return self.config_class(r=max(1, round(trainable / per_rank)))

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return peft.get_peft_model_state_dict(model, adapter_name=ADAPTER)

    def load_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        result = peft.set_peft_model_state_dict(model, tensors, adapter_name=ADAPTER)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise AdapterLoadError(f"{self.id} tensors do not fit: missing {missing[:5]}, "
                                   f"unexpected {result.unexpected_keys[:5]}")

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

    def export_lora(self, model: nn.Module, directory: Path, max_rank: int, fallback: str = "error") -> dict[str, Any]:
        state = model.subtune_state
        config: LoraConfig = state.config
        if config.r > max_rank:
            raise ExportError(f"LoRA rank {config.r} exceeds max_rank={max_rank}")
        tensors = {PEFT_PREFIX + k: v for k, v in self.state_dict(model).items()}
        peft_cfg = config.to_peft()
        peft_cfg.base_model_name_or_path = state.base_name or None
        peft_cfg.inference_mode = True
        write_peft_adapter(directory, tensors, json.loads(json.dumps(peft_cfg.to_dict(), default=list)))
        return {"modules": len(_lora_layers(model)), "max_rank": config.r, "directory": str(directory)}


register_method(PeftLoraMethod("lora", LoraConfig, "LoRA (Hu et al., 2021, arXiv 2106.09685)"))
register_method(PeftLoraMethod("dora", DoraConfig, "DoRA (Liu et al., 2024, arXiv 2402.09353)"))
