from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from subtune.core.deltas import Delta
from subtune.core.errors import AdapterLoadError
from subtune.core.method import Method, Selection, register_method
from subtune.methods.full.config import FullConfig


class FullMethod(Method):
    id = "full"
    config_class = FullConfig
    paper = "baseline"
    default_lr = 3e-4  # docs/DEFAULTS.md sweep on the embedded model; 7B-scale full fine-tuning uses ~1e-5 to 2e-5
    bench_reference = "full"  # the benchmark's "vs full" columns
    demo = {"lr": 3e-4}  # far below the adapters': every weight moves

    def attach(self, model: nn.Module, config: FullConfig, selection: Selection) -> None:
        embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
        for p in model.parameters():
            p.requires_grad_(config.train_embeddings or id(p) not in embeddings)

    def base_changed(self, state) -> bool:
        return True  # the adapter is the model: absolute weights, no copy of the original to subtract

    def deltas(self, model: nn.Module, state) -> dict[str, Delta]:
        """None: training changed the weights in place and the original base is not kept. The absolute weights are
        the training state; `subtune.read_deltas(dir, base=...)` states them as dense deltas against a base."""
        return {}

    def training_state(self, model: nn.Module, state) -> dict[str, torch.Tensor]:
        """Every tensor of the model by its state_dict name (the adapter is the model)."""
        seen, out = set(), {}
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() in seen:  # tied weights are stored once
                continue
            seen.add(tensor.data_ptr())
            out[name] = tensor
        return out

    def restore(self, model: nn.Module, state, deltas: Mapping[str, Delta],
                training_state: Mapping[str, torch.Tensor]) -> None:
        result = model.load_state_dict(dict(training_state), strict=False)
        tied = {k for k in result.missing_keys if "lm_head" in k and model.config.tie_word_embeddings}
        missing = sorted(set(result.missing_keys) - tied)
        if missing or result.unexpected_keys:
            raise AdapterLoadError(
                f"full-model checkpoint does not fit this model: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}")


register_method(FullMethod())
