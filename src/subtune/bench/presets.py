"""Model presets for the benchmark: random-init configs of real architectures (weights do not matter for cost)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, LlamaConfig

from subtune.core.errors import ModelNotFoundError

PRESETS = {
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4),
    "134m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, rope_theta=500000.0),
}


def preset_config(name_or_path: str) -> LlamaConfig:
    if name_or_path in PRESETS:
        return LlamaConfig(**PRESETS[name_or_path], max_position_embeddings=4096, tie_word_embeddings=False)
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"preset {name_or_path!r} is not one of {sorted(PRESETS)} or a local HF model "
                                 "directory with config.json")
    return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
