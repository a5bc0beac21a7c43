"""Method configs: dataclasses that round-trip through JSON, YAML files and `--key value` CLI overrides.

Every config is checked when it is built (and again by `prepare`): each field must hold its annotated type, every
float must be finite, and each method range-checks its own numbers, so a bad value fails in one line naming the field
and the fix before any model is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from subtune.core.errors import SubtuneError

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# LoRA's default targets (the LLM-Adapters / DoRA setup): also LaMDA's at equal budget and the benchmark's budget
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
MAX_SEED = 2**32 - 1  # numpy's limit, and transformers.set_seed seeds numpy


class ConfigError(SubtuneError, ValueError):
    """A config value or an option is wrong; the message says which and how to fix it."""


@dataclass
class MethodConfig:
    """Fields every method shares. Subclasses set `method` (the registry id) and add their own fields."""

    method: ClassVar[str] = ""
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEARS))
    seed: int = 0

    def __post_init__(self) -> None:
        # Validate on construction too, so `LoraConfig(r="8")` fails here rather than deep inside a library.
        _normalise(self)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for values that cannot work. Subclasses extend this (calling super() first)."""
        for f in dataclasses.fields(self):
            _check_value(self.method or type(self).__name__, f.name, getattr(self, f.name), _hints(type(self))[f.name])
        if not self.target_modules:
            raise ConfigError(f"{self.method}: target_modules is empty; name at least one of {list(LLAMA_LINEARS)}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"{self.method}: seed must be in [0, {MAX_SEED}], got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.method}: a config must be a mapping of field names to values, "
                              f"got {type(data).__name__}")
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ConfigError(f"config is for method {method!r}, not {cls.method!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(data) - names)
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{cls.method}: unknown config key(s) {unknown}{hint}; valid keys are {sorted(names)}")
        hints = _hints(cls)
        return cls(**{k: _coerce(f"{cls.method}: {k}", v, hints[k]) for k, v in data.items()})  # validates

    def with_overrides(self, overrides: dict[str, Any]) -> "MethodConfig":
        """A copy with overrides applied; string values (from the CLI) are parsed to the field's type."""
        return type(self).from_dict({**self.to_dict(), **overrides})


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(origin: Any) -> bool:
    return origin in (typing.Union, types.UnionType)


def _describe(hint: Any, article: bool = True) -> str:
    """A readable name for a type hint: 'an int', 'a float or None', 'a list of str', 'one of ['a', 'b']'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_union(origin):
        return " or ".join("None" if a is type(None) else _describe(a, article) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0], False)}" if args else "a list"
    if origin is dict:
        return f"a mapping of str to {_describe(args[1], False)}" if args else "a mapping"
    if origin is typing.Literal:
        return f"one of {list(args)}"
    name = getattr(hint, "__name__", str(hint))
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}" if article else name


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` already has the annotated type (no coercion; bool is not a number here)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_union(origin):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and (not args or _matches(v, args[1]))
                                               for k, v in value.items())
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this checker does not know: accept


def _floats_in(value: Any):
    if isinstance(value, float):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _floats_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _floats_in(v)


def _check_value(method: str, name: str, value: Any, hint: Any) -> None:
    if not _matches(value, hint):
        raise ConfigError(f"{method}: {name} must be {_describe(hint)}, got {type(value).__name__} {value!r}; "
                          f"pass {_describe(hint)} (from_dict/with_overrides parse strings, the constructor does not)")
    bad = next((v for v in _floats_in(value) if not math.isfinite(v)), None)
    if bad is not None:
        raise ConfigError(f"{method}: {name} must be a finite number, got {bad}; give a finite value")


def _normalise(config: MethodConfig) -> None:
    """Plain Python values, so configs compare and serialise alike: tuples become lists, numpy numbers and ints in
    float fields become float/int, paths in str fields become str."""
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), _hints(type(config))[f.name]
        allowed = typing.get_args(hint) if _is_union(typing.get_origin(hint)) else (hint,)
        if isinstance(value, tuple) and typing.get_origin(hint) is list:
            value = list(value)
        elif isinstance(value, bool):
            pass
        elif float in allowed and isinstance(value, numbers.Real) and type(value) is not float:
            value = float(value)
        elif int in allowed and isinstance(value, numbers.Integral) and type(value) is not int:
            value = int(value)
        elif str in allowed and isinstance(value, os.PathLike):
            value = os.fspath(value)
        setattr(config, f.name, value)


def check_rank_fits(method: str, rank: int, shapes: dict[str, tuple[int, int]], field_name: str = "r") -> None:
    """Refuse a rank above min(out, in) of a targeted layer (it only adds values, and can ask for billions)."""
    if not shapes:
        return
    name, (out_f, in_f) = min(shapes.items(), key=lambda kv: min(kv[1]))
    largest = min(out_f, in_f)
    if rank > largest:
        raise ConfigError(f"{method}: {field_name}={rank} exceeds min(out, in) of the targeted layer {name} "
                          f"({out_f}x{in_f}); the largest valid rank for these targets is {largest}, so set "
                          f"{field_name} <= {largest}")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Turn a JSON or CLI value into the annotated type, or say what was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_union(origin):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        for candidate in inner:
            try:
                return _coerce(name, value, candidate)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: cannot read {value!r} as {_describe(hint)}")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected {_describe(hint)}, got {value!r}")
        return [_coerce(name, v, args[0]) for v in value] if args else list(value)
    if origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(f"{name}: expected a JSON object, got {value!r}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected {_describe(hint)}, got {value!r}")
        return {str(k): _coerce(name, v, args[1]) if args else v for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{name}: {value!r} is not one of {list(args)}")
        return value
    if hint is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}")
        try:
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return hint(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected str, got {value!r}")
        return value
    return value
