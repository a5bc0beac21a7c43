"""The embedded default: a tiny LLaMA pretrained by `subtune.zoo.build` on a synthetic world (files in default/)."""

from __future__ import annotations

from pathlib import Path

import torch

from subtune.core.bases import canonical_name, register_named_base
from subtune.core.config import ConfigError
from subtune.core.errors import ModelNotFoundError

DEFAULT_DIR = Path(__file__).resolve().parent / "default"
# adapters of the embedded model record its id next to its path, so any install finds its own copy (core/bases.py)
register_named_base("default", DEFAULT_DIR)
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
    # "default" stays the id; a directory becomes its absolute path, so adapters find it from anywhere
    model.config._name_or_path = canonical_name(str(name_or_path or "default"))
    return model, tokenizer


def adapter_base(adapter_dir: str | Path) -> str:
    """The base `load_model` opens for a saved adapter: its shipped base's id ("default": this install's copy) or
    its recorded absolute directory, from any working directory (core/bases.py)."""
    from subtune.core.api import read_adapter_config
    from subtune.core.bases import base_of_adapter

    return base_of_adapter(read_adapter_config(adapter_dir), adapter_dir)


def write_base_copy(name_or_path: str, directory: str | Path) -> Path:
    """Copy the files of a base model directory (weights, config, tokenizer) to `directory`, atomically, so an
    export can carry its base (`subtune export --with-base`): PEFT then opens it with no other path."""
    import shutil

    from subtune.core import io

    source = resolve_model_path(name_or_path)
    with io.atomic_directory(directory, replaces=[p.name for p in source.iterdir()]) as tmp:
        for file in sorted(source.iterdir()):
            if file.is_file():
                shutil.copy2(file, tmp / file.name)
    return Path(directory)


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
