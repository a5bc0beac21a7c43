from __future__ import annotations

import torch
from torch import nn

from subtune.core.errors import AdapterLoadError
from subtune.core.method import Method, Selection, register_method
from subtune.methods.full.config import FullConfig


class FullMethod(Method):
    id = "full"
    config_class = FullConfig
    paper = "baseline"
    default_lr = 2e-5

    def attach(self, model: nn.Module, config: FullConfig, selection: Selection) -> None:
        embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
        for p in model.parameters():
            p.requires_grad_(config.train_embeddings or id(p) not in embeddings)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        seen, out = set(), {}
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() in seen:  # tied weights are stored once
                continue
            seen.add(tensor.data_ptr())
            out[name] = tensor
        return out

    def load_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        result = model.load_state_dict(tensors, strict=False)
        tied = {k for k in result.missing_keys if "lm_head" in k and model.config.tie_word_embeddings}
        missing = sorted(set(result.missing_keys) - tied)
        if missing or result.unexpected_keys:
            raise AdapterLoadError(
                f"full-model checkpoint does not fit this model: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}")


register_method(FullMethod())
