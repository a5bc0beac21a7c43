"""The embedded default: a tiny LLaMA pretrained by `subtune.zoo.build` on a synthetic world (files in default/)."""

from __future__ import annotations

from pathlib import Path

import torch

from subtune.core.config import ConfigError
from subtune.core.errors import ModelNotFoundError

DEFAULT_DIR = Path(__file__).resolve().parent / "default"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_model_path(name_or_path: str) -> Path:
    if name_or_path in ("default", "", None):
        if not (DEFAULT_DIR / "config.json").is_file():
            raise ModelNotFoundError(f"the embedded default model is missing from {DEFAULT_DIR}; "
                                     "rebuild it with `python -m subtune.zoo.build`")
        return DEFAULT_DIR
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{name_or_path!r} is not 'default' or a local HF model directory with config.json "
                                 "(subtune never downloads at run time)")
    return path


def load_model(name_or_path: str = "default", dtype: str = "fp32"):
    """(model, tokenizer) from 'default' or a local HF directory; never downloads, never runs remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    path = resolve_model_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True,
                                                 trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config._name_or_path = str(name_or_path)
    return model, tokenizer


def corpus_calibration(tokenizer, samples: int = 100, seq: int = 512, seed: int = 0) -> list[dict]:
    """`samples` windows of `seq` tokens of the embedded pretraining text (SensZOQ's default calibration set)."""
    from subtune.zoo import world as W

    docs = W.corpus_documents(W.build_world(seed=seed), num_docs=max(8, samples * seq // 150), seed=seed + 1)
    stream = [i for doc in docs for i in tokenizer(doc + "\n", add_special_tokens=False).input_ids]
    out = []
    for i in range(samples):
        window = torch.tensor(stream[i * seq:(i + 1) * seq])
        if window.numel() < 2:
            break
        out.append({"input_ids": window[None], "labels": window[None].clone()})
    return out
