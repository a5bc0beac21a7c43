"""Exceptions with messages that name the problem and the fix."""


class SubtuneError(Exception):
    """Base class for subtune's own errors."""


class ModelLayoutError(SubtuneError, ValueError):
    """The model is not a LLaMA-layout causal LM, or targets match nothing."""


class AdapterLoadError(SubtuneError, ValueError):
    """An adapter directory is missing, corrupt, or made for another base model."""


class ExportError(SubtuneError, ValueError):
    """An export cannot be exact under the requested limits."""


class DataError(SubtuneError, ValueError):
    """A dataset is empty or a record is malformed."""


class UnknownMethodError(SubtuneError, KeyError):
    """A method id that is not registered (a KeyError too, for code that looks methods up like a mapping)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelNotFoundError(SubtuneError, FileNotFoundError):
    """A base model name or directory that cannot be found (subtune never downloads)."""


class AdapterExistsError(SubtuneError, FileExistsError):
    """A save would replace an adapter of another method, format or base model (pass overwrite=True to allow it)."""


class AdapterSaveError(SubtuneError, OSError):
    """An adapter directory cannot be written (not a directory, not writable)."""


class NonFiniteError(SubtuneError, ValueError):
    """An adapter holds NaN or infinite values (training diverged); refused unless allow_nonfinite=True."""


class TrainingDivergedError(SubtuneError, RuntimeError):
    """The loss or a trained value became NaN/inf; training stopped before anything of that step was saved."""


class CheckpointError(SubtuneError, ValueError):
    """No complete checkpoint to resume from, or the checkpoint belongs to another run (method, config, base)."""


class RunExistsError(SubtuneError, FileExistsError):
    """The output directory holds another run (its adapter or checkpoints); pass --overwrite or --resume."""


class SelectionError(SubtuneError, ValueError):
    """What a selection names does not fit the layer or model it is applied to (indices out of range, repeated or
    empty, factor shapes that do not match the weight)."""


class RegistrationError(SubtuneError, ValueError):
    """A method registered without an id, or under an id another method class already holds."""


class BenchError(SubtuneError, RuntimeError):
    """A benchmark run cannot measure what it was asked to (an unknown kind, no memory counter on this system)."""
