"""Method configs: dataclasses that round-trip through JSON, YAML files and `--key value` CLI overrides."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """A config value is wrong; the message says which and how to fix it."""


@dataclass
class MethodConfig:
    """Fields every method shares. Subclasses set `method` (the registry id) and add their own fields."""

    method: ClassVar[str] = ""
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEARS))
    seed: int = 0

    def validate(self) -> None:
        """Raise ConfigError for values that cannot work. Subclasses extend this."""
        if not self.target_modules:
            raise ConfigError(f"{self.method}: target_modules is empty; name at least one of {list(LLAMA_LINEARS)}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ConfigError(f"config is for method {method!r}, not {cls.method!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.method}: unknown config key(s) {unknown}; valid keys are {sorted(names)}")
        hints = typing.get_type_hints(cls)
        config = cls(**{k: _coerce(k, v, hints[k]) for k, v in data.items()})
        config.validate()
        return config

    def with_overrides(self, overrides: dict[str, Any]) -> "MethodConfig":
        """A copy with overrides applied; string values (from the CLI) are parsed to the field's type."""
        return type(self).from_dict({**self.to_dict(), **overrides})


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Turn a JSON or CLI value into the annotated type, or say what was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        for candidate in inner:
            try:
                return _coerce(name, value, candidate)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: cannot read {value!r} as {hint}")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return [_coerce(name, v, args[0]) for v in value] if args else list(value)
    if origin is dict:
        if isinstance(value, str):
            value = json.loads(value)
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
        return bool(value)
    if hint in (int, float, str):
        try:
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}") from None
    return value
