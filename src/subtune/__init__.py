"""subtune: fine-tune LLaMA-family models by training a small, well-chosen part of them."""

from subtune.core.adapter_format import installed_version as _installed_version

__version__ = _installed_version()  # the installed distribution's (importlib.metadata), as pyproject.toml sets it

from subtune.core.api import (  # noqa: E402
    export_lora, export_merged, load, merge, merge_deltas, prepare, read_adapter_config, read_deltas, save,
    trainable_summary, unload, unmerge,
)
from subtune.core.config import ConfigError, MethodConfig  # noqa: E402
from subtune.core.errors import (  # noqa: E402
    AdapterExistsError, AdapterLoadError, AdapterSaveError, CheckpointError, DataError, ExportError, ModelLayoutError,
    NonFiniteError, RunExistsError, SubtuneError, TrainingDivergedError,
)
from subtune.core.errors import (  # noqa: E402
    BenchError, ModelNotFoundError, RegistrationError, SelectionError, UnknownMethodError,
)
from subtune.core.method import Method, Selection, available_methods, config_from_dict, get_method, register_method  # noqa: E402
import subtune.methods  # noqa: E402,F401  (registers the built-in methods; the core never imports them)
from subtune.methods.full import FullConfig  # noqa: E402
from subtune.methods.lora import DoraConfig, LoraConfig  # noqa: E402
from subtune.methods.s2ft import S2FTConfig  # noqa: E402
from subtune.methods.smt import SMTConfig  # noqa: E402
from subtune.methods.lamda import LaMDAConfig, LaMDAPlusConfig  # noqa: E402
from subtune.methods.senszo import MeZOConfig, SensZOConfig  # noqa: E402

__all__ = [
    "__version__", "prepare", "save", "load", "merge", "unmerge", "unload", "export_lora", "export_merged",
    "trainable_summary",
    "read_adapter_config", "read_deltas", "merge_deltas", "MethodConfig", "FullConfig", "LoraConfig", "DoraConfig", "S2FTConfig", "SMTConfig", "LaMDAConfig", "LaMDAPlusConfig", "SensZOConfig", "MeZOConfig", "Method", "Selection",
    "register_method", "get_method", "available_methods", "config_from_dict", "ConfigError", "SubtuneError",
    "AdapterLoadError", "DataError", "ExportError", "ModelLayoutError", "AdapterExistsError", "AdapterSaveError",
    "NonFiniteError", "ModelNotFoundError", "UnknownMethodError", "SelectionError", "RegistrationError", "BenchError",
    "TrainingDivergedError", "CheckpointError",
    "RunExistsError",
]
