"""The one way to build the calibration batches a method reads in `prepare` (recipes, CLI, benchmark all call it)."""

from __future__ import annotations

from subtune.core.config import MethodConfig
from subtune.core.errors import DataError
from subtune.core.method import get_method
from subtune.data.loaders import calibration_batches


def calibration_source(config: MethodConfig) -> str:
    """Where `config`'s calibration text comes from: its `calibration_source` ("corpus" for SensZOQ by default, as
    in the paper), else "train" (S²FT scores and SMT's warm-up read the first training batches)."""
    return get_method(config.method).calibration_source(config)


def calibration_for(config: MethodConfig, tokenizer=None, records: list[dict] | None = None, *, batch_size: int = 16,
                    max_length: int = 256, seq: int = 512, batch: dict | None = None) -> list[dict] | None:
    """The batches `subtune.prepare(model, config, calibration=...)` reads, or None when the method reads none.

    As many as `method.calibration_batches(config)` asks for, from `calibration_source(config)`:
    "train": the first `records` (cycled if too few), `batch_size` per batch, cut to `max_length` tokens;
    "corpus": windows of `seq` tokens of the embedded pretraining text, one per batch.
    `batch`: one fixed batch repeated instead (synthetic tokens, e.g. the benchmark's; no tokenizer needed).
    """
    count = get_method(config.method).calibration_batches(config)
    if not count:
        return None
    if batch is not None:
        return [batch] * count
    if tokenizer is None:
        raise DataError(f"{config.method}: building calibration batches needs the tokenizer; pass tokenizer=, or a "
                        "ready batch=")
    if calibration_source(config) == "corpus":
        from subtune.zoo import corpus_calibration

        return corpus_calibration(tokenizer, samples=count, seq=seq)
    if not records:
        raise DataError(f"{config.method}: calibration_source 'train' needs the training records; pass records=<the "
                        "training records>, or (SensZOQ) set calibration_source='corpus'")
    return calibration_batches(tokenizer, records, batch_size=batch_size, num_batches=count, max_length=max_length)
