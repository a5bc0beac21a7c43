from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from subtune.core.deltas import Delta
from subtune.core.method import LayerMethod, Selection, per_layer_summary, register_method
from subtune.core.surgery import decoder_layers, wrap_linear
from subtune.methods.smt.config import SMTConfig
from subtune.methods.smt.select import select_blocks, total_blocks
from subtune.ops.block_sparse import BlockDeltaLinear


def _plain_names(model: nn.Module, layers: Mapping[str, nn.Module]) -> dict[str, str]:
    """{plain base name: attached name} of every base tensor: a block layer's `P.base_layer.X` is the base's `P.X`."""
    wrapped = {f"{path}.base_layer.": f"{path}." for path in layers}
    out = {}
    for name in model.state_dict():
        if name.endswith(".delta") and name.rsplit(".", 1)[0] in layers:
            continue  # the trained blocks: the deltas carry them
        head = next((w for w in wrapped if name.startswith(w)), None)
        out[wrapped[head] + name[len(head):] if head else name] = name
    return out


class SMTMethod(LayerMethod):
    id = "smt"
    config_class = SMTConfig
    layer_class = BlockDeltaLinear
    paper = "SMT (He et al., ICLR 2025, arXiv 2405.15525)"
    demo = {"lr": 1e-2, "config": {"block_size": 32, "ratio": 0.05, "warmup_steps": 8}}
    default_lr = 1e-2  # docs/DEFAULTS.md sweep on the embedded model (1e-1 diverges); the official repository's
    # PEFT script uses 1e-4 on LLaMA-7B (its code comment's 9.65e-6 reproduces the paper runs)

    def trainable_values(self, model: nn.Module, state) -> int:
        """The real entries of the selected blocks: an edge block of a matrix whose sides are not multiples of b
        stores b×b values but only its in-matrix part reaches the output (e.g. 64×256 of a 256×256 block)."""
        padded = sum(layer.delta.numel() - layer.trainable_values() for layer in self.layers(model).values()
                     if layer.delta.requires_grad)
        return super().trainable_values(model, state) - padded

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

    def selection_summary(self, model, state) -> str:
        """Blocks per matrix, one list per projection over the decoder layers."""
        blocks = state.selection.info["blocks"]
        b = state.config.block_size
        return (f"smt selected {sum(blocks.values())} of {state.selection.info['total_blocks_in_model']} {b}x{b} "
                f"blocks in {sum(1 for n in blocks.values() if n)} matrices; per layer: "
                f"{per_layer_summary(blocks, len(decoder_layers(model)))}")

    def attach(self, model: nn.Module, config: SMTConfig, selection: Selection) -> None:
        for key, rc in selection.tensors.items():
            wrap_linear(model, key.removesuffix(".blocks"),
                        lambda base, rc=rc: BlockDeltaLinear(base, rc[0], rc[1], config.block_size))

    def base_changed(self, state) -> bool:
        return state.config.warmup_updates  # the blocks are an update of the warmed base, not of the original

    def training_state(self, model: nn.Module, state) -> dict[str, torch.Tensor]:
        """With warmup_updates the warm-up trained every base weight: the warmed base travels with the adapter,
        under the plain base's names (so a reader can subtract the original base from it)."""
        if not state.config.warmup_updates:
            return {}
        attached = model.state_dict()
        return {plain: attached[name] for plain, name in _plain_names(model, self.layers(model)).items()}

    @torch.no_grad()
    def restore(self, model: nn.Module, state, deltas: Mapping[str, Delta],
                training_state: Mapping[str, torch.Tensor]) -> None:
        if training_state:  # the warmed base first, then the blocks on top of it
            names = _plain_names(model, self.layers(model))
            model.load_state_dict({names[k]: v for k, v in training_state.items()}, strict=False)
        super().restore(model, state, deltas, training_state)


register_method(SMTMethod())
