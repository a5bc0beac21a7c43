"""subtune: fine-tune LLaMA-family models by training a small, well-chosen part of them.

The public names load on first use (PEP 562 `__getattr__`), so `import subtune` — and `subtune --help` — import no
torch, transformers or peft. `subtune.prepare`, `from subtune import S2FTConfig`, `dir(subtune)` and `__all__` work
as with eager imports.
"""

import importlib
import importlib.util

from subtune.core import registry as _registry


def _register_builtin_methods() -> None:
    import subtune.methods  # noqa: F401  (each method package registers itself; the core never imports them)


# Built-in methods register before the registry is first read (get_method, available_methods, ...): Python runs
# this file before any subtune submodule, so a program that imports only subtune.core.* finds them too.
_registry.add_loader(_register_builtin_methods)

_PUBLIC = {
    "subtune.core.api": (
        "prepare", "save", "load", "merge", "unmerge", "unload", "export_lora", "export_merged", "trainable_summary",
        "read_adapter_config", "read_deltas", "merge_deltas"),
    "subtune.core.config": ("MethodConfig", "ConfigError"),
    "subtune.core.errors": (
        "SubtuneError", "AdapterLoadError", "DataError", "ExportError", "ModelLayoutError", "AdapterExistsError",
        "AdapterSaveError", "NonFiniteError", "ModelNotFoundError", "UnknownMethodError", "SelectionError",
        "RegistrationError", "BenchError", "TrainingDivergedError", "CheckpointError", "RunExistsError"),
    "subtune.core.method": ("Method", "Selection"),
    "subtune.core.registry": ("register_method", "get_method", "available_methods", "config_from_dict"),
    "subtune.methods.full": ("FullConfig",),
    "subtune.methods.lora": ("LoraConfig", "DoraConfig"),
    "subtune.methods.s2ft": ("S2FTConfig",),
    "subtune.methods.smt": ("SMTConfig",),
    "subtune.methods.lamda": ("LaMDAConfig", "LaMDAPlusConfig"),
    "subtune.methods.senszo": ("SensZOConfig", "MeZOConfig"),
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = ["__version__", *_HOME]


def __getattr__(name: str):
    if name == "__version__":  # the installed distribution's (importlib.metadata), as pyproject.toml sets it
        from subtune.core.adapter_format import installed_version

        value = installed_version()
    elif name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
    elif importlib.util.find_spec(f"subtune.{name}") is not None:  # a subpackage, e.g. `subtune.methods.senszo`
        value = importlib.import_module(f"subtune.{name}")
    else:
        raise AttributeError(f"module 'subtune' has no attribute {name!r}")
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
