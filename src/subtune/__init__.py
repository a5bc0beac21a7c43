"""subtune: fine-tune LLaMA-family models by training a small, well-chosen part of them."""

__version__ = "0.1.0"

from subtune.core.api import (  # noqa: E402
    export_lora, load, merge, prepare, read_adapter_config, save, trainable_summary, unload, unmerge,
)
from subtune.core.config import ConfigError, MethodConfig  # noqa: E402
from subtune.core.errors import (  # noqa: E402
    AdapterExistsError, AdapterLoadError, AdapterSaveError, DataError, ExportError, ModelLayoutError, NonFiniteError,
    SubtuneError,
)
from subtune.core.errors import ModelNotFoundError, UnknownMethodError  # noqa: E402
from subtune.core.method import Method, Selection, available_methods, config_from_dict, get_method, register_method  # noqa: E402
from subtune.methods.full import FullConfig  # noqa: E402
from subtune.methods.lora import DoraConfig, LoraConfig  # noqa: E402
from subtune.methods.s2ft import S2FTConfig  # noqa: E402
from subtune.methods.smt import SMTConfig  # noqa: E402
from subtune.methods.lamda import LaMDAConfig, LaMDAPlusConfig  # noqa: E402
from subtune.methods.senszo import MeZOConfig, SensZOConfig  # noqa: E402

__all__ = [
    "__version__", "prepare", "save", "load", "merge", "unmerge", "unload", "export_lora", "trainable_summary",
    "read_adapter_config", "MethodConfig", "FullConfig", "LoraConfig", "DoraConfig", "S2FTConfig", "SMTConfig", "LaMDAConfig", "LaMDAPlusConfig", "SensZOConfig", "MeZOConfig", "Method", "Selection",
    "register_method", "get_method", "available_methods", "config_from_dict", "ConfigError", "SubtuneError",
    "AdapterLoadError", "DataError", "ExportError", "ModelLayoutError", "AdapterExistsError", "AdapterSaveError",
    "NonFiniteError", "ModelNotFoundError", "UnknownMethodError",
]
