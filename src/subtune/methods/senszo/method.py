from __future__ import annotations

import torch
from torch import nn

from subtune.core.errors import AdapterLoadError, ModelLayoutError
from subtune.core.method import LayerMethod, Selection, register_method
from subtune.core.surgery import find_targets, wrap_linear
from subtune.methods.full.method import FullMethod
from subtune.methods.senszo.config import MeZOConfig, SensZOConfig
from subtune.methods.senszo.mask import compute_mask, index_problem
from subtune.ops.sparse import DenseAndSparseLinear
from subtune.ops.zo import spsa_step


class ZerothOrderMixin:
    """What the ZO trainer and the benchmark need from a zeroth-order method."""

    zeroth_order = True
    exact_restore = True

    def trainer_class(self):
        from subtune.train.zo import ZOTrainer

        return ZOTrainer

    def benchmark_step(self, model: nn.Module, batch: dict) -> None:
        from subtune.train.zo import fp32_lm_loss

        config = model.subtune_state.config
        with torch.inference_mode():
            spsa_step(self.zo_tensors(model), lambda: fp32_lm_loss(model, batch), list(range(config.directions)),
                      config.eps, 1e-6, exact_restore=self.exact_restore)


class SensZOMethod(ZerothOrderMixin, LayerMethod):
    id = "senszo"
    config_class = SensZOConfig
    layer_class = DenseAndSparseLinear
    value_names = ("values",)
    paper = "SensZOQ (Guo et al., ICLR 2025, arXiv 2406.02913)"
    default_lr = 1e-5  # sparse ZO tolerates a larger lr than MeZO (spec pitfall 10)

    def calibration_batches(self, config: SensZOConfig) -> int:
        return 0 if config.mask_path or config.mask_source != "sensitivity" else config.calibration_samples

    def select(self, model, config: SensZOConfig, calibration) -> Selection:
        targets = find_targets(model, config.target_modules)
        mask = compute_mask(model, targets, config, calibration)
        return Selection({f"{name}.index": idx for name, idx in mask.items()},
                         {"values": {name: int(idx.numel()) for name, idx in mask.items()},
                          "mask_source": config.mask_source if not config.mask_path else f"file:{config.mask_path}"})

    def attach(self, model: nn.Module, config: SensZOConfig, selection: Selection) -> None:
        for name, index in checked_positions(model, selection).items():
            wrap_linear(model, name, lambda base, index=index: DenseAndSparseLinear(base, index, config.quantize))
        for layer in self.layers(model).values():
            layer.values.requires_grad_(True)  # an ordinary Parameter for the Trainer; ZO never calls backward

    def zo_tensors(self, model: nn.Module) -> list[torch.Tensor]:
        return [layer.values for layer in self.layers(model).values()]


def checked_positions(model: nn.Module, selection: Selection) -> dict[str, torch.Tensor]:
    """The selection's positions per module, all checked before any layer is swapped (a saved adapter may have been
    edited or made for another model): every module exists and is a Linear, every index set is valid for it."""
    if not selection.tensors:
        raise AdapterLoadError("senszo: the selection holds no sparse positions; re-save the adapter from a model "
                               "prepared with SensZOConfig")
    out = {}
    for key, index in selection.tensors.items():
        name = key.removesuffix(".index")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterLoadError(f"senszo: the selection names {name}, which this model lacks, so it does not fit "
                                   "this model; load the adapter onto the base model it was trained on") from None
        if not isinstance(module, nn.Linear):
            raise ModelLayoutError(f"{name} is {type(module).__name__}, expected nn.Linear; use the plain "
                                   "(unquantised, un-adapted) base model")
        problem = index_problem(index, module.weight.numel())
        if problem:
            raise AdapterLoadError(f"senszo: the selection for {name} {problem}, so it does not fit this model; the "
                                   "adapter is damaged or made for another model: re-save it from the trained model")
        out[name] = index
    return out


class MeZOMethod(ZerothOrderMixin, FullMethod):
    """MeZO: every parameter, in place. Saves like full fine-tuning (the whole model)."""

    id = "mezo"
    config_class = MeZOConfig
    paper = "MeZO (Malladi et al., NeurIPS 2023, arXiv 2305.17333)"
    default_lr = 1e-6
    exact_restore = False  # a copy of every weight would double memory; z is regenerated instead

    def attach(self, model: nn.Module, config: MeZOConfig, selection: Selection) -> None:
        for p in model.parameters():
            p.requires_grad_(True)

    def zo_tensors(self, model: nn.Module) -> list[torch.Tensor]:
        seen, out = set(), []
        for p in model.parameters():
            if id(p) not in seen:  # tied weights are perturbed once
                seen.add(id(p))
                out.append(p.data)
        return out


register_method(SensZOMethod())
register_method(MeZOMethod())
