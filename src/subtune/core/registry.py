"""The method registry: method id -> Method. Imports no torch, so the package root can wire it up cheaply.

Built-in methods are registered by code the package root names, never by the core: `subtune/__init__.py` hands
the registry a loader (`add_loader`) that imports `subtune.methods`, and the registry runs it before the first
lookup. Python runs `subtune/__init__.py` before any `subtune.*` submodule, so a program that imports only
`subtune.core.*` still finds every built-in method, while `import subtune` (and `subtune --help`) stays free of
torch, transformers and peft until a method is asked for. A new method registers itself with `register_method` when
it is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from subtune.core.config import MethodConfig
    from subtune.core.method import Method

_REGISTRY: dict[str, Method] = {}
_LOADERS: list[Callable[[], None]] = []


def add_loader(loader: Callable[[], None]) -> None:
    """Run `loader` (which imports modules that call `register_method`) before the registry is next read."""
    _LOADERS.append(loader)


def _load_pending() -> None:
    # popped before running: a loader that reads the registry while it imports sees what is registered so far
    while _LOADERS:
        _LOADERS.pop(0)()


def register_method(method: Method) -> Method:
    from subtune.core.errors import RegistrationError

    _load_pending()  # the built-ins first, as with eager registration (their order is the demo's)
    if not method.id or not isinstance(method.id, str):
        raise RegistrationError(f"{type(method).__name__} has no id; set `id` to a non-empty string")
    if method.id in _REGISTRY and type(_REGISTRY[method.id]) is not type(method):
        raise RegistrationError(f"method id {method.id!r} is already registered by "
                                f"{type(_REGISTRY[method.id]).__name__}; give {type(method).__name__} another id")
    _REGISTRY[method.id] = method
    return method


def get_method(method_id: str) -> Method:
    from subtune.core.errors import UnknownMethodError

    _load_pending()
    try:
        return _REGISTRY[method_id]
    except (KeyError, TypeError):  # TypeError: an unhashable id such as a list
        raise UnknownMethodError(f"unknown method {method_id!r}; available methods: {sorted(_REGISTRY)} "
                                 "(see `subtune methods`)") from None


def available_methods() -> list[str]:
    _load_pending()
    return sorted(_REGISTRY)


def registered_methods() -> list[Method]:
    """Every registered method in registration order (the built-ins in the order of `subtune/methods/__init__.py`,
    which is the demo's row order)."""
    _load_pending()
    return list(_REGISTRY.values())


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    from subtune.core.config import ConfigError

    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"a config needs a 'method' key; add one of {available_methods()}")
    return get_method(data["method"]).config_class.from_dict(data)
