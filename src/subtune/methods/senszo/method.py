from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from subtune.core.deltas import Delta
from subtune.core.errors import AdapterLoadError, ModelLayoutError
from subtune.core.method import LayerMethod, Selection, check_same_support, register_method
from subtune.core.surgery import find_targets, wrap_linear
from subtune.methods.full.method import FullMethod
from subtune.methods.senszo.config import MeZOConfig, SensZOConfig
from subtune.methods.senszo.mask import compute_mask, index_problem
from subtune.ops.sparse import DenseAndSparseLinear

class ZerothOrderMixin:
    """The members a zeroth-order method declares (core/method.py): trained by SPSA steps (train/zo.py, which the
    trainer and the benchmark share), with the objective its ZO config names."""

    zeroth_order = True
    exact_restore = True

    def trainer_class(self):
        from subtune.train.zo import ZOTrainer

        return ZOTrainer

    def objective(self, config) -> str:
        return config.objective


class SensZOMethod(ZerothOrderMixin, LayerMethod):
    id = "senszo"
    config_class = SensZOConfig
    layer_class = DenseAndSparseLinear
    paper = "SensZOQ (Guo et al., ICLR 2025, arXiv 2406.02913)"
    # SPSA's variance grows with the number of perturbed values (k here, every weight for MeZO), so the sparse
    # method tolerates a larger lr than MeZO. 1e-1: the lr `subtune repro senszo` chose on dev loss for the embedded
    # model (1e-3 and 1e-2 barely moved it, 1 diverged; docs/DEFAULTS.md); far smaller for 7B-scale models
    default_lr = 1e-1
    own_base_floor = True  # the bench compares its step with inference on the same (4-bit) base
    # not in the default demo: ZO needs hundreds of steps to move accuracy (`subtune repro senszo` measures it)
    demo = None

    def calibration_batches(self, config: SensZOConfig) -> int:
        return 0 if config.mask_path or config.mask_source != "sensitivity" else config.calibration_samples

    def calibration_source(self, config: SensZOConfig) -> str:
        return config.calibration_source  # "corpus" by default: sensitivity from pretraining text, as the paper

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

    @torch.no_grad()
    def restore(self, model: nn.Module, state, deltas: Mapping[str, Delta],
                training_state: Mapping[str, torch.Tensor]) -> None:
        """The layers' deltas are measured from the base's entries (`DenseAndSparseLinear.as_delta`), so restoring
        adds the saved delta to them rather than copying it into storage."""
        for name, layer in self.layers(model).items():
            check_same_support(self.id, name, layer.as_delta(), deltas[name])
            layer.restore_delta(deltas[name])

    def zo_tensors(self, model: nn.Module, state) -> list[torch.Tensor]:
        return [layer.values for layer in self.layers(model).values()]

    def callbacks(self, model: nn.Module, state) -> list:
        """The dense cache for the run (config.dense_cache): each ZO probe runs one matmul per layer."""
        from subtune.train.zo import DenseCacheCallback

        return [DenseCacheCallback(model)] if state.config.dense_cache else []


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
    """MeZO: every parameter, in place. Saves like full fine-tuning (the whole model, as absolute weights)."""

    id = "mezo"
    config_class = MeZOConfig
    paper = "MeZO (Malladi et al., NeurIPS 2023, arXiv 2305.17333)"
    default_lr = 1e-3  # chosen on dev loss for the embedded model by `subtune repro senszo`; the paper's 1e-6..1e-7
    # is for 13B-scale models (docs/DEFAULTS.md)
    exact_restore = False  # a copy of every weight would double memory; z is regenerated instead
    bench_reference = None  # full fine-tuning is the reference, not MeZO
    demo = None  # as SensZOQ: `subtune repro senszo` measures it

    def attach(self, model: nn.Module, config: MeZOConfig, selection: Selection) -> None:
        for p in model.parameters():
            p.requires_grad_(True)

    def zo_tensors(self, model: nn.Module, state) -> list[torch.Tensor]:
        seen, out = set(), []
        for p in model.parameters():
            if id(p) not in seen:  # tied weights are perturbed once
                seen.add(id(p))
                out.append(p.data)
        return out


register_method(SensZOMethod())
register_method(MeZOMethod())
