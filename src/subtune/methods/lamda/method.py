from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from subtune.core.config import check_rank_fits
from subtune.core.method import LayerMethod, Selection, register_method
from subtune.core.peft_format import write_lora_factors
from subtune.core.surgery import find_targets, replace_module
from subtune.methods.lamda.config import LaMDAConfig, LaMDAPlusConfig
from subtune.methods.lamda.freeze import PMBFreezeCallback
from subtune.methods.lamda.select import init_factors, ranks_for
from subtune.ops.lowdim import LowDimLinear


class LaMDAMethod(LayerMethod):
    layer_class = LowDimLinear
    value_names = ("lora_B", "lora_S")  # S is always saved (the released code loses it)

    default_lr = 1e-3  # spec P9: orthonormal projections need a larger step than LoRA; sweep 1e-4..1e-3

    def __init__(self, method_id: str, config_class: type[LaMDAConfig], paper: str):
        self.id, self.config_class, self.paper = method_id, config_class, paper

    def config_for_budget(self, model_config, trainable: int) -> LaMDAConfig:
        """Same rank as a LoRA of that budget on the same targets (the spec's same-rank comparison)."""
        from subtune.methods.lora.method import _lora_params_per_rank

        per_rank = _lora_params_per_rank(model_config, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
        return self.config_class(r=max(1, round(trainable / per_rank)),
                                 target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])

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

    def attach(self, model: nn.Module, config: LaMDAConfig, selection: Selection) -> None:
        ranks = selection.info["ranks"]
        residual_init = config.init in ("svd_identity_residual", "svd_sigma_residual")
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
        return config.init in ("svd_identity_residual", "svd_sigma_residual")  # attach subtracts W's principal part

    def benchmark_variant(self, model: nn.Module, variant: str) -> None:
        """`b_frozen`: the steady state after the PMB phase (only S trains)."""
        if variant != "b_frozen":
            super().benchmark_variant(model, variant)
        for layer in self.layers(model).values():
            layer.lora_B.requires_grad_(False)

    def callbacks(self, model: nn.Module, config: LaMDAConfig) -> list:
        return [PMBFreezeCallback(model, config)]

    def export_lora(self, model: nn.Module, directory: Path, max_rank: int, fallback: str = "error") -> dict[str, Any]:
        """Exact rank-r LoRA against the original base (spec §7): A' = A, B' = s·(B S − B0 S0) for residual inits
        (B0 S0 = 0 for pure-delta inits is subtracted as well, which changes nothing)."""
        state = model.subtune_state
        residual = state.config.init in ("svd_identity_residual", "svd_sigma_residual")
        factors = {}
        for name, layer in self.layers(model).items():
            core = layer.lora_B.detach().double() @ layer.lora_S.detach().double()
            if residual:
                sel = state.selection.tensors
                core = core - sel[f"{name}.B0"].double().to(core.device) @ sel[f"{name}.S0"].double().to(core.device)
            factors[name] = (layer.lora_A.float().cpu(), (layer.scaling * core).float().cpu())
        return write_lora_factors(directory, factors, base_name=state.base_name, max_rank=max_rank,
                                  fallback=fallback)


register_method(LaMDAMethod("lamda", LaMDAConfig, "LaMDA (Azizi et al., EMNLP Findings 2024, arXiv 2406.12832)"))
register_method(LaMDAMethod("lamda++", LaMDAPlusConfig,
                            "LaMDA++ (Azizi et al., EMNLP Findings 2024, arXiv 2406.12832)"))
