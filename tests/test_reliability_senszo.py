"""SensZOQ's bad inputs (issue 10, part C): mask files made for another model or damaged, densities that select
nothing, ZO settings that cannot work, empty calibration, edited adapters. Each row fails in one line naming the fix
and leaves the files on disk as they were; the rows feed docs/RELIABILITY.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from reliability import Case, cases_param, check_case
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import subtune
from subtune.core import io
from subtune.core.config import ConfigError
from subtune.core.errors import AdapterLoadError, DataError, SubtuneError
from subtune.core.surgery import find_targets
from subtune.methods.senszo import save_mask
from subtune.methods.senszo.mask import MASK_FORMAT, MaskError, compute_mask

MASK = "mask.safetensors"
GEN = torch.Generator().manual_seed(5)
IDS = torch.randint(0, 64, (2, 9), generator=GEN)


def _shapes(model, targets=None) -> dict[str, tuple[int, int]]:
    config = subtune.SensZOConfig(**({"target_modules": targets} if targets else {}))
    return {n: tuple(m.weight.shape) for n, m in find_targets(model, config.target_modules).items()}


def _write_mask(model_kwargs: dict | None = None, targets: list[str] | None = None):
    """setup: a real mask (magnitude, 2%) of make_tiny(0, **model_kwargs), written by save_mask."""
    def setup(tmp: Path) -> None:
        model = make_tiny(0, **(model_kwargs or {}))
        config = subtune.SensZOConfig(density=0.02, mask_source="magnitude",
                                      **({"target_modules": targets} if targets else {}))
        targets_ = find_targets(model, config.target_modules)
        save_mask(compute_mask(model, targets_, config, None), tmp / MASK, _shapes(model, targets))
    return setup


def _raw_mask(edit, metadata: dict | None = "default"):
    """setup: a mask file for make_tiny(0) with valid metadata whose tensors `edit` damages (bypassing save_mask)."""
    def setup(tmp: Path) -> None:
        model = make_tiny(0)
        shapes = _shapes(model)
        tensors = {n: torch.arange(0, 40, 4, dtype=torch.int64) for n in shapes}
        edit(tensors)
        meta = ({"format": MASK_FORMAT, "shapes": ";".join(f"{n}={a}x{b}" for n, (a, b) in shapes.items())}
                if metadata == "default" else metadata)
        save_file(tensors, str(tmp / MASK), metadata=meta)
    return setup


def _first(tensors: dict) -> str:
    return sorted(tensors)[0]


def _prepare_with_mask(**model_kwargs):
    return lambda tmp: subtune.prepare(make_tiny(0, **model_kwargs),
                                       subtune.SensZOConfig(mask_path=str(tmp / MASK), quantize="none"))


def _edited_adapter(edit):
    """setup: a saved SensZOQ adapter whose selection tensors `edit` changes, with the checksum in
    adapter_config.json updated (an edited file, not a truncated one)."""
    def setup(tmp: Path) -> None:
        model = subtune.prepare(make_tiny(0), subtune.SensZOConfig(density=0.02, mask_source="magnitude",
                                                                   quantize="none"))
        subtune.save(model, tmp / "a")
        weights, config_file = tmp / "a" / "adapter.safetensors", tmp / "a" / "adapter_config.json"
        tensors = load_file(str(weights))
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata()  # keeps the delta table (docs/FORMAT.md)
        edit(tensors)
        save_file(tensors, str(weights), metadata=metadata)
        cfg = json.loads(config_file.read_text())
        cfg["adapter_sha256"] = io.sha256_file(weights)
        config_file.write_text(json.dumps(cfg))
    return setup


def _selection_key(tensors: dict) -> str:
    return sorted(k for k in tensors if k.startswith("selection."))[0]


def _set(key_of, make):
    def edit(tensors):
        key = key_of(tensors)
        tensors[key] = make(tensors[key])
    return edit


def _compute_mask_after_change(tmp: Path):
    config = subtune.SensZOConfig(mask_source="magnitude")
    config.density = 0.0  # changed after it was built (validation at construction cannot see this)
    model = make_tiny(0)
    return compute_mask(model, find_targets(model, config.target_modules), config, None)


def _save_mask(mask_of):
    def run(tmp: Path):
        model = make_tiny(0)
        shapes = _shapes(model)
        return save_mask(mask_of(shapes), tmp / MASK, shapes)
    return run


CASES = [
    # config fields (the CLI's `--key value` overrides go through the same checks)
    Case("senszo-density-zero", lambda tmp: subtune.SensZOConfig(density=0.0), ConfigError,
         ("density", "(0, 1]", "0.001"),
         tries="`SensZOConfig(density=0)`", before="clear: refused only at prepare, no fix named"),
    Case("senszo-density-above-one", lambda tmp: subtune.SensZOConfig(density=1.5), ConfigError,
         ("density", "(0, 1]"),
         tries="`SensZOConfig(density=1.5)`", before="clear: refused only at prepare, no fix named"),
    Case("senszo-density-override-zero", lambda tmp: subtune.SensZOConfig().with_overrides({"density": "0"}),
         ConfigError, ("density", "(0, 1]"), tries="`--density 0` as a config override", before="clear"),
    Case("senszo-compute-mask-density-zero", _compute_mask_after_change, ConfigError, ("density", "(0, 1]"),
         tries="`compute_mask` with a density set to 0 after construction", before="silent: an empty mask"),
    Case("senszo-eps-zero", lambda tmp: subtune.SensZOConfig(eps=0.0), ConfigError, ("eps", "> 0", "1e-3"),
         tries="`SensZOConfig(eps=0)`", before="clear: refused only at prepare, no fix named"),
    Case("mezo-eps-negative", lambda tmp: subtune.MeZOConfig(eps=-1e-3), ConfigError, ("eps", "> 0", "1e-3"),
         tries="`MeZOConfig(eps=-1e-3)`", before="clear: refused only at prepare, no fix named"),
    Case("senszo-directions-zero", lambda tmp: subtune.SensZOConfig(directions=0), ConfigError,
         ("directions", ">= 1"),
         tries="`SensZOConfig(directions=0)`", before="clear: refused only at prepare, no fix named"),
    Case("senszo-calibration-samples-zero", lambda tmp: subtune.SensZOConfig(calibration_samples=0), ConfigError,
         ("calibration_samples", ">= 1"),
         tries="`SensZOConfig(calibration_samples=0)`", before="clear: refused only at prepare, no fix named"),
    Case("senszo-mask-path-empty", lambda tmp: subtune.SensZOConfig(mask_path=" "), ConfigError,
         ("mask_path", "senszo-mask"), tries="`mask_path=' '`", before="silent: a new mask was computed instead"),
    # a mask made for another model or other targets
    Case("senszo-mask-other-model-widths", _prepare_with_mask(hidden=64, intermediate=96), MaskError,
         ("another model", "32x32 in the mask but 64x64 here", "senszo-mask"), setup=_write_mask(),
         tries="a mask made for a wider model", before="silent: trained 126 values instead of 3,028"),
    Case("senszo-mask-other-model-depth", _prepare_with_mask(layers=3), MaskError,
         ("another model", "no entry for model.layers.2", "senszo-mask"), setup=_write_mask(),
         tries="a mask made for a shallower model (the model has a layer the mask lacks)", before="silent"),
    Case("senszo-mask-fewer-layers-model", _prepare_with_mask(layers=1), MaskError,
         ("another model", "model.layers.1", "lacks", "senszo-mask"), setup=_write_mask(),
         tries="a mask made for a deeper model", before="clear"),
    Case("senszo-mask-other-targets", _prepare_with_mask(), MaskError,
         ("target_modules [down_proj, q_proj]", "set target_modules"),
         setup=_write_mask(targets=["q_proj", "down_proj"]),
         tries="a mask over other `target_modules`", before="silent"),
    # a damaged or foreign mask file
    Case("senszo-mask-missing-file", _prepare_with_mask(), MaskError, ("does not exist", "senszo-mask --out"),
         tries="`mask_path` names no file", before="clear: the fix named was `subtune.save()`"),
    Case("senszo-mask-garbage-file", _prepare_with_mask(), MaskError, ("not a readable safetensors", "senszo-mask"),
         setup=lambda tmp: (tmp / MASK).write_bytes(b"\x00\xffnot a mask"),
         tries="a mask file that is not safetensors", before="clear"),
    Case("senszo-mask-no-metadata", _prepare_with_mask(), MaskError, ("not a SensZOQ mask", "senszo-mask"),
         setup=_raw_mask(lambda t: None, metadata=None),
         tries="a safetensors file without the mask metadata", before="silent"),
    Case("senszo-mask-bad-shapes-metadata", _prepare_with_mask(), MaskError, ("unreadable target shapes",),
         setup=_raw_mask(lambda t: None, metadata={"format": MASK_FORMAT, "shapes": "q=axb"}),
         tries="unreadable target shapes in the mask metadata", before="silent"),
    Case("senszo-mask-index-out-of-range", _prepare_with_mask(), MaskError, ("outside [0, 1536)", "senszo-mask"),
         setup=_raw_mask(_set(_first, lambda v: v + 10**6)), tries="a mask position past the weight", before="clear"),
    Case("senszo-mask-negative-index", _prepare_with_mask(), MaskError, ("position -3 outside", "senszo-mask"),
         setup=_raw_mask(_set(_first, lambda v: v - 3)), tries="a negative mask position", before="raw"),
    Case("senszo-mask-duplicate-index", _prepare_with_mask(), MaskError, ("repeats a position", "senszo-mask"),
         setup=_raw_mask(_set(_first, lambda v: torch.cat([v, v[:1]]))),
         tries="a mask position listed twice", before="silent: the position was trained twice"),
    Case("senszo-mask-float-indices", _prepare_with_mask(), MaskError, ("float32 values, not integer",),
         setup=_raw_mask(_set(_first, lambda v: v.float())),
         tries="float mask positions", before="silent: positions truncated"),
    Case("senszo-mask-2d-indices", _prepare_with_mask(), MaskError, ("not a 1-d list",),
         setup=_raw_mask(_set(_first, lambda v: v.reshape(2, -1))), tries="2-d mask positions", before="raw"),
    Case("senszo-mask-no-positions", _prepare_with_mask(), MaskError, ("empty", "density in (0, 1]"),
         setup=_raw_mask(lambda t: t.clear()), tries="a mask file with no tensors", before="silent: nothing trained"),
    Case("senszo-mask-empty-entry", _prepare_with_mask(), MaskError, ("holds no positions",),
         setup=_raw_mask(_set(_first, lambda v: v[:0])), tries="a mask entry with no positions", before="raw"),
    Case("senszo-mask-unlisted-module", _prepare_with_mask(), MaskError, ("do not list", "damaged"),
         setup=_raw_mask(lambda t: t.__setitem__("model.layers.7.mlp.down_proj", torch.arange(3))),
         tries="a mask entry for a module the metadata does not list", before="clear"),
    # writing a mask
    Case("senszo-save-mask-empty", _save_mask(lambda shapes: {}), MaskError, ("empty", "density in (0, 1]"),
         tries="`save_mask({})`", before="silent: wrote a bad file"),
    Case("senszo-save-mask-out-of-range", _save_mask(lambda shapes: {n: torch.tensor([10**6]) for n in shapes}),
         MaskError, ("outside",),
         tries="`save_mask` with a position past the weight", before="silent: wrote a bad file"),
    Case("senszo-save-mask-without-shape", _save_mask(lambda shapes: {"model.layers.9.q_proj": torch.tensor([1])}),
         MaskError, ("no shape", "pass the shape"),
         tries="`save_mask` for a module with no shape given", before="silent: wrote a bad file"),
    # calibration
    Case("senszo-calibration-empty",
         lambda tmp: subtune.prepare(make_tiny(0), subtune.SensZOConfig(quantize="none"), calibration=[]),
         DataError, ("no sample", "input_ids"), tries="SensZOQ `prepare(calibration=[])`", before="raw"),
    Case("senszo-calibration-missing", lambda tmp: subtune.prepare(make_tiny(0), subtune.SensZOConfig()),
         SubtuneError, ("calibration=",), tries="SensZOQ `prepare` without calibration", before="clear"),
    # an adapter whose selection was edited (checksum kept valid)
    Case("senszo-adapter-duplicate-index", lambda tmp: subtune.load(make_tiny(0), tmp / "a"), AdapterLoadError,
         ("repeats a position", "re-save"),
         setup=_edited_adapter(_set(_selection_key, lambda v: torch.cat([v[:-1], v[:1]]))),
         tries="a SensZOQ adapter edited to repeat a position (checksum kept valid)", before="silent"),
    Case("senszo-adapter-float-index", lambda tmp: subtune.load(make_tiny(0), tmp / "a"), AdapterLoadError,
         ("not integer positions", "re-save"), setup=_edited_adapter(_set(_selection_key, lambda v: v.double())),
         tries="a SensZOQ adapter with float positions (checksum kept valid)", before="silent"),
    Case("senszo-adapter-unknown-module", lambda tmp: subtune.load(make_tiny(0), tmp / "a"), AdapterLoadError,
         ("model.layers.5.mlp.up_proj", "lacks", "base model it was trained on"),
         setup=_edited_adapter(lambda t: t.__setitem__("selection.model.layers.5.mlp.up_proj.index",
                                                       torch.arange(3))),
         tries="a SensZOQ adapter naming a module the base lacks", before="raw"),
]


@cases_param(CASES)
def test_catalogue_senszo(case, tmp_path):
    check_case(case, tmp_path)


def test_a_refused_mask_leaves_the_model_as_it_was(tmp_path):
    _write_mask()(tmp_path)
    model, reference = make_tiny(0, hidden=64, intermediate=96), make_tiny(0, hidden=64, intermediate=96)
    with pytest.raises(MaskError):
        subtune.prepare(model, subtune.SensZOConfig(mask_path=str(tmp_path / MASK)))
    assert getattr(model, "subtune_state", None) is None
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, reference(input_ids=IDS).logits)


def test_the_other_model_mask_of_issue_10_is_refused_not_trained_on_a_fraction(tmp_path):
    """Issue 10: a mask of a smaller model trained 126 values instead of 3,028 on the bigger one. The same mask on
    its own model trains exactly its positions (a real mask, not a rigged one)."""
    _write_mask()(tmp_path)
    own = subtune.prepare(make_tiny(0), subtune.SensZOConfig(mask_path=str(tmp_path / MASK), quantize="none"))
    stored = load_file(str(tmp_path / MASK))
    assert subtune.trainable_summary(own).trainable == sum(v.numel() for v in stored.values())
    with pytest.raises(MaskError, match="made for another model"):
        subtune.prepare(make_tiny(0, hidden=64, intermediate=96),
                        subtune.SensZOConfig(mask_path=str(tmp_path / MASK), quantize="none"))
