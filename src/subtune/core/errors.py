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
