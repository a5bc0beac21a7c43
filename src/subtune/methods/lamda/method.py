from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from subtune.core.config import LORA_TARGETS, check_rank_fits
from subtune.core.deltas import Delta
from subtune.core.method import LayerMethod, Selection, per_layer_summary, register_method
from subtune.core.surgery import decoder_layers, find_targets, replace_module
from subtune.methods.lamda.config import LaMDAConfig, LaMDAPlusConfig
from subtune.methods.lamda.freeze import frozen_columns, set_frozen_columns
from subtune.methods.lamda.select import init_factors, ranks_for
from subtune.ops.lowdim import LowDimLinear

RESIDUAL_INITS = ("svd_identity_residual", "svd_sigma_residual")  # attach moves s·B0 S0 A out of W


class LaMDAMethod(LayerMethod):
    layer_class = LowDimLinear

    default_lr = 3e-2  # docs/DEFAULTS.md sweep on the embedded model (LaMDA and LaMDA++ share it): S sits between
    # orthonormal projections, scaled by lora_alpha / r, so LoRA's lr does not carry over (paper: sweep 1e-4..1e-3)

    def __init__(self, method_id: str, config_class: type[LaMDAConfig], paper: str, demo: dict):
        self.id, self.config_class, self.paper, self.demo = method_id, config_class, paper, demo

    def config_for_budget(self, model_config, trainable: int) -> LaMDAConfig:
        """Same rank as a LoRA of that budget on the same targets (LaMDA is compared with LoRA at equal rank)."""
        from subtune.methods.lora.method import _lora_params_per_rank

        per_rank = _lora_params_per_rank(model_config, list(LORA_TARGETS))
        return self.config_class(r=max(1, round(trainable / per_rank)), target_modules=list(LORA_TARGETS))

    def select(self, model, config: LaMDAConfig, calibration) -> Selection:
        """SVD of every target weight (done once; the factors are saved, never recomputed at load)."""
        targets = find_targets(model, config.target_modules)
        if not isinstance(config, LaMDAPlusConfig):  # LaMDA++ caps each rank at its matrix itself
            check_rank_fits(self.id, config.r, {n: (m.out_features, m.in_features) for n, m in targets.items()})
        ranks = ranks_for(model, targets, config)
        generator = torch.Generator().manual_seed(config.seed)
        tensors = {}
        for name, module in targets.items():
            r = ranks[name]
            f = init_factors(module.weight, r, config.init, config.lora_alpha / r, generator)
            tensors[f"{name}.A"] = f["A"]
            tensors[f"{name}.B0"] = f["B"]
            tensors[f"{name}.S0"] = f["S"]  # B0, S0 are kept only for residual inits (see attach)
        info = {"ranks": ranks, "init": config.init}
        if isinstance(config, LaMDAPlusConfig):
            info["rank_budget"] = config.r * len(targets)
        return Selection(tensors, info)

    def selection_summary(self, model, state) -> str:
        """The rank of each target matrix: one number for plain LaMDA, LaMDA++'s allocation per layer."""
        ranks = state.selection.info["ranks"]
        if len(set(ranks.values())) == 1:
            return f"{self.id}: rank {next(iter(ranks.values()))} in each of the {len(ranks)} target matrices"
        budget = state.selection.info.get("rank_budget", sum(ranks.values()))
        return (f"{self.id} ranks (sum {sum(ranks.values())} of budget {budget}, {min(ranks.values())}.."
                f"{max(ranks.values())}); per layer: {per_layer_summary(ranks, len(decoder_layers(model)))}")

    def attach(self, model: nn.Module, config: LaMDAConfig, selection: Selection) -> None:
        ranks = selection.info["ranks"]
        residual_init = config.init in RESIDUAL_INITS
        for name, r in ranks.items():
            base = model.get_submodule(name)
            a = selection.tensors[f"{name}.A"]
            # on load, a pure-delta adapter has no B0/S0: B and S come from the saved values right after
            b0 = selection.tensors.get(f"{name}.B0", torch.zeros(base.out_features, r))
            s0 = selection.tensors.get(f"{name}.S0", torch.zeros(r, r))
            scaling = config.lora_alpha / r
            if residual_init:
                with torch.no_grad():  # move the principal part out of W: the model is unchanged at init
                    residual = (scaling * (b0.double() @ s0.double() @ a.double())).to(base.weight.dtype)
                    base.weight.sub_(residual.to(base.weight.device))
            layer = LowDimLinear(base, a, b0, s0, scaling)
            replace_module(model, name, layer)
            # keep no second copy: the saved A is the layer's buffer; B0 S0 matter only for residual inits
            selection.tensors[f"{name}.A"] = layer.lora_A
            if not residual_init:
                selection.tensors.pop(f"{name}.B0", None)
                selection.tensors.pop(f"{name}.S0", None)

    def modifies_base(self, config: LaMDAConfig) -> bool:
        return config.init in RESIDUAL_INITS  # attach subtracts W's principal part

    def benchmark_variant(self, model: nn.Module, variant: str) -> None:
        """`b_frozen`: the steady state after the PMB phase (only S trains)."""
        if variant != "b_frozen":
            super().benchmark_variant(model, variant)
        for layer in self.layers(model).values():
            layer.lora_B.requires_grad_(False)

    def callbacks(self, model: nn.Module, state) -> list:
        from subtune.methods.lamda.callback import PMBFreezeCallback  # transformers: only when training

        return [PMBFreezeCallback(model, state.config)]

    def deltas(self, model: nn.Module, state) -> dict[str, Delta]:
        """lowrank(A, B S − B0 S0, s) per layer: the update against the original base. A residual init moved
        s·B0 S0 A out of W at attach, so it is subtracted from the layer's own term (computed in float64: B stays
        near B0 early on); the other inits start from B0 S0 = 0 and the layer's term is the whole update."""
        if state.config.init not in RESIDUAL_INITS:
            return super().deltas(model, state)
        selection, out = state.selection.tensors, {}
        for name, layer in self.layers(model).items():
            b, s = layer.lora_B.detach(), layer.lora_S.detach()
            b0, s0 = (selection[f"{name}.{k}"].to(b.device, torch.float64) for k in ("B0", "S0"))
            core = b.double() @ s.double() - b0 @ s0
            out[name] = Delta.lowrank(layer.lora_A, core.to(b.dtype), layer.scaling)
        return out

    def training_state(self, model: nn.Module, state) -> dict[str, torch.Tensor]:
        """B and S (the deltas hold only their product) and which columns of B are frozen (PMB)."""
        out = {}
        for name, layer in self.layers(model).items():
            out[f"{name}.lora_B"] = layer.lora_B.detach()
            out[f"{name}.lora_S"] = layer.lora_S.detach()
            out[f"{name}.frozen"] = frozen_columns(layer)
        return out

    @torch.no_grad()
    def restore(self, model: nn.Module, state, deltas: Mapping[str, Delta],
                training_state: Mapping[str, torch.Tensor]) -> None:
        for name, layer in self.layers(model).items():
            layer.lora_B.copy_(training_state[f"{name}.lora_B"])
            layer.lora_S.copy_(training_state[f"{name}.lora_S"])
            set_frozen_columns(layer, training_state[f"{name}.frozen"])


register_method(LaMDAMethod("lamda", LaMDAConfig, "LaMDA (Azizi et al., EMNLP Findings 2024, arXiv 2406.12832)",
                            demo={"lr": 2e-2, "config": {"r": 16}}))
register_method(LaMDAMethod("lamda++", LaMDAPlusConfig,
                            "LaMDA++ (Azizi et al., EMNLP Findings 2024, arXiv 2406.12832)",
                            demo={"lr": 2e-2, "config": {"r": 16, "rank_min": 8, "rank_max": 64}}))
