"""The serving room's errors: each names the problem and the fix, and is raised before the store or the base changes."""

from __future__ import annotations

from subtune.core.errors import AdapterLoadError, SubtuneError


class ServeError(SubtuneError, ValueError):
    """A request the adapter store cannot honour."""


class AdapterNameError(ServeError):
    """An adapter name that is not a non-empty string."""


class DuplicateAdapterError(AdapterNameError):
    """The name is already taken by an adapter in the store."""


class UnknownAdapterError(ServeError, KeyError):
    """No adapter of that name in the store (a KeyError too, for code that treats the store as a mapping)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WrongBaseError(ServeError, AdapterLoadError):
    """The adapter was made for another base model (its fingerprint differs from the store's base)."""


class AdapterMismatchError(ServeError):
    """The deltas do not fit the base: a module path it lacks, a shape that differs, something that is not a Delta."""


class AdapterActiveError(ServeError, RuntimeError):
    """The call needs the plain base, but an adapter is merged into it (activate(name))."""


class RoutingError(ServeError):
    """A batch cannot be routed row by row (names that do not fit the batch, a module that is not a Linear)."""


class RequestError(ServeError):
    """An HTTP request the server refuses (bad JSON, wrong types, out-of-range values, unknown model); carries the
    HTTP status and OpenAI's error fields so the server can answer it as OpenAI does."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.code, self.kind = param, status, code, kind

    def to_json(self) -> dict:
        """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class MissingDependencyError(ServeError, ImportError):
    """The HTTP server's web stack (fastapi, uvicorn) is not installed."""
