from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from subtune.core.errors import AdapterLoadError
from subtune.core.method import LayerMethod, Selection, register_method
from subtune.core.peft_format import write_lora_factors
from subtune.core.surgery import wrap_linear
from subtune.methods.smt.config import SMTConfig
from subtune.methods.smt.select import select_blocks, total_blocks
from subtune.ops.block_sparse import BlockDeltaLinear


WARMED_BASE = "warmed_base."


def lora_factors(layer: BlockDeltaLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (A, B) with B·A = ΔW: one-hot over the fewer of distinct block-rows or block-columns (smt spec §6)."""
    delta = layer.dense_delta().float()
    b = layer.block_size
    row_blocks, col_blocks = layer.rows.unique().tolist(), layer.cols.unique().tolist()
    if len(row_blocks) <= len(col_blocks):  # group by block-row: B one-hot picks output rows, A holds the rows
        idx = torch.cat([torch.arange(r * b, min((r + 1) * b, layer.out_features)) for r in row_blocks])
        one_hot = torch.zeros(layer.out_features, idx.numel())
        one_hot[idx, torch.arange(idx.numel())] = 1.0
        return delta[idx].contiguous(), one_hot
    idx = torch.cat([torch.arange(c * b, min((c + 1) * b, layer.in_features)) for c in col_blocks])
    one_hot = torch.zeros(idx.numel(), layer.in_features)
    one_hot[torch.arange(idx.numel()), idx] = 1.0
    return one_hot, delta[:, idx].contiguous()


class SMTMethod(LayerMethod):
    id = "smt"
    config_class = SMTConfig
    layer_class = BlockDeltaLinear
    paper = "SMT (He et al., ICLR 2025, arXiv 2405.15525)"
    default_lr = 1e-4  # the authors' tuned option (spec A5); 9.65e-6 reproduces the paper runs

    def calibration_batches(self, config: SMTConfig) -> int:
        return config.warmup_steps

    def modifies_base(self, config: SMTConfig) -> bool:
        return config.warmup_updates  # the official warm-up takes real AdamW steps on the base

    def config_for_budget(self, model_config, trainable: int) -> SMTConfig:
        """Blocks of 256 (or the largest power of two dividing the hidden size, for small models) to hit the budget."""
        block = 256
        while model_config.hidden_size % block and block > 8:
            block //= 2
        return SMTConfig(block_size=block, num_blocks=max(1, round(trainable / block**2)), warmup_steps=1)

    def select(self, model, config: SMTConfig, calibration) -> Selection:
        chosen = select_blocks(model, config, calibration)
        tensors = {f"{name}.blocks": torch.tensor([rows, cols], dtype=torch.long) for name, (rows, cols) in
                   chosen.items()}
        info = {"blocks": {name: len(rows) for name, (rows, _) in chosen.items()},
                "total_blocks_in_model": total_blocks(model, config.block_size),
                "warmup_mode": "updates" if config.warmup_updates else "gradient_only"}
        return Selection(tensors, info)

    def attach(self, model: nn.Module, config: SMTConfig, selection: Selection) -> None:
        for key, rc in selection.tensors.items():
            wrap_linear(model, key.removesuffix(".blocks"),
                        lambda base, rc=rc: BlockDeltaLinear(base, rc[0], rc[1], config.block_size))

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = super().state_dict(model)
        if model.subtune_state.config.warmup_updates:  # the warm-up changed the base: it travels with the adapter
            out.update({f"{WARMED_BASE}{k}": v for k, v in model.state_dict().items() if not k.endswith(".delta")})
        return out

    def load_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        base = {k[len(WARMED_BASE):]: v for k, v in tensors.items() if k.startswith(WARMED_BASE)}
        if base:
            result = model.load_state_dict(base, strict=False)
            if result.unexpected_keys:
                raise AdapterLoadError(f"smt warmed-up base does not fit: unexpected {result.unexpected_keys[:3]}")
        super().load_state_dict(model, {k: v for k, v in tensors.items() if not k.startswith(WARMED_BASE)})

    def export_lora(self, model: nn.Module, directory: Path, max_rank: int, fallback: str = "error") -> dict[str, Any]:
        state = model.subtune_state
        if state.config.warmup_updates:
            from subtune.core.errors import ExportError

            raise ExportError("this SMT adapter was selected with warmup_updates=True, which changed every base weight; "
                              "no LoRA is exact against the original base. Export a merged model instead.")
        factors = {name: lora_factors(layer) for name, layer in self.layers(model).items()}
        return write_lora_factors(directory, factors, base_name=state.base_name, max_rank=max_rank,
                                  fallback=fallback)


register_method(SMTMethod())
