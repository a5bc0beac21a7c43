"""OpenAI's `POST /v1/completions` request, checked field by field before any work is queued.

`parse_completion_request(body, ...)` turns the decoded JSON body into a `CompletionRequest` or raises a
`RequestError` whose message names the field and the fix, with the HTTP status and OpenAI's error fields (the server
answers it as OpenAI does). Types are strict (a string is not a number, a bool is not an integer), so a client bug
is reported instead of guessed around. Fields subtune does not implement (n > 1, logprobs, echo, penalties, ...) are
refused when they ask for something, never silently ignored; unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from subtune.serve.errors import RequestError

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default: a request that wants greedy answers says temperature=0
MAX_STOP_SEQUENCES = 16
SEED_RANGE = (-(2**63), 2**63 - 1)

# fields subtune does not implement: accepted only with the value that asks for nothing
_INERT = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None,), "suffix": (None, ""),
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
}


@dataclass(frozen=True)
class CompletionRequest:
    """A checked completion request: one token-id list per prompt, the adapter (None = base) and its limits."""

    model: str
    adapter: str | None
    prompts: tuple[tuple[int, ...], ...]
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool

    def seed_for(self, index: int) -> int | None:
        """The sampling seed of prompt `index`: seed + index (so a list of prompts does not repeat one draw),
        wrapped into the int64 range."""
        if self.seed is None:
            return None
        return (self.seed + index - SEED_RANGE[0]) % 2**64 + SEED_RANGE[0]


def _type_name(value: Any) -> str:
    return "null" if value is None else {bool: "a boolean", str: "a string", list: "an array", dict: "an object",
                                         int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(body: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not _is_number(value) or not math.isfinite(value):
        raise RequestError(f"'{key}' must be a finite number, got {_type_name(value)} ({value!r}); send e.g. "
                           f"{key}={default}", param=key)
    if value < low or value > high or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise RequestError(f"'{key}' must be in {bounds}, got {value}; send a value in that range", param=key)
    return float(value)


def _max_tokens(body: dict, limit: int) -> int:
    value = body.get("max_tokens")
    if value is None:
        return min(DEFAULT_MAX_TOKENS, limit)
    if not _is_int(value):
        raise RequestError(f"'max_tokens' must be an integer, got {_type_name(value)} ({value!r}); send e.g. "
                           "max_tokens=16", param="max_tokens")
    if value <= 0:
        raise RequestError(f"'max_tokens' must be at least 1, got {value}; ask for 1 to {limit} new tokens",
                           param="max_tokens")
    if value > limit:
        raise RequestError(f"'max_tokens' is {value}, over this server's limit of {limit}; ask for at most {limit} "
                           "new tokens (or start the server with a higher max_tokens_limit)", param="max_tokens")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError(f"'stop' must be a string or an array of strings, got {_type_name(value)} ({value!r})",
                           param="stop")
    if len(stops) > MAX_STOP_SEQUENCES or any(s == "" for s in stops):
        raise RequestError(f"'stop' takes 1 to {MAX_STOP_SEQUENCES} non-empty strings, got {stops!r}; drop the empty "
                           "ones", param="stop")
    return tuple(stops)


def _seed(body: dict) -> int | None:
    value = body.get("seed")
    if value is None:
        return None
    if not _is_int(value) or not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise RequestError(f"'seed' must be a 64-bit signed integer, got {_type_name(value)} ({value!r})",
                           param="seed")
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"'{key}' must be true or false, got {_type_name(value)} ({value!r})", param=key)
    return value


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise RequestError(f"'stream_options' must be an object such as {{\"include_usage\": true}}, got "
                           f"{_type_name(options)}", param="stream_options")
    return _flag(options, "include_usage")


def _check_inert(body: dict) -> None:
    for key, allowed in _INERT.items():
        value = body.get(key)
        if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            raise RequestError(f"'{key}'={value!r} is not supported by this server; leave it out (for several "
                               "completions send a list of prompts or separate requests)", param=key)
    bias = body.get("logit_bias")
    if bias not in (None, {}):
        raise RequestError("'logit_bias' is not supported by this server; leave it out", param="logit_bias")


def _resolve_model(body: dict, base_id: str, adapters: Sequence[str]) -> tuple[str, str | None]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(f"'model' must name the base ({base_id!r}) or an adapter, got {_type_name(model)} "
                           f"({model!r}); list them with GET /v1/models", param="model")
    if model == base_id:
        return model, None
    if model in adapters:
        return model, model
    raise RequestError(f"The model `{model}` does not exist on this server: it serves {[base_id, *adapters]} "
                       "(GET /v1/models); use one of those ids", param="model", status=404, code="model_not_found")


def _prompts(body: dict, encode: Callable[[str], list[int]], vocab_size: int) -> list[list[int]]:
    """OpenAI's four prompt forms: a string, an array of strings, an array of token ids, an array of those."""
    value = body.get("prompt")
    usage = ("'prompt' must be a non-empty string, an array of non-empty strings, an array of token ids or an array "
             "of token-id arrays")
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(_is_int(t) for t in value):
        value = [value]
    if not isinstance(value, list) or not value:
        got = "an empty array" if value == [] else f"{_type_name(value)}"
        raise RequestError(f"{usage}, got {got}", param="prompt")
    prompts = []
    for i, item in enumerate(value):
        where = "" if len(value) == 1 else f" (prompt {i})"
        if isinstance(item, str):
            if not item:
                raise RequestError(f"{usage}; got an empty string{where}: send some text to complete", param="prompt")
            ids = list(encode(item))
            if not ids:
                raise RequestError(f"the prompt{where} encodes to no tokens; send some text to complete",
                                   param="prompt")
        elif isinstance(item, list) and item and all(_is_int(t) for t in item):
            bad = [t for t in item if not 0 <= t < vocab_size]
            if bad:
                raise RequestError(f"token ids{where} must lie in [0, {vocab_size}) for this model, got {bad[:5]}",
                                   param="prompt")
            ids = list(item)
        else:
            raise RequestError(f"{usage}; item {i} is {_type_name(item) if item != [] else 'an empty array'}",
                               param="prompt")
        prompts.append(ids)
    return prompts


def parse_completion_request(body: Any, *, base_id: str, adapters: Sequence[str],
                             encode: Callable[[str], list[int]], vocab_size: int, max_tokens_limit: int,
                             context_length: int | None = None) -> CompletionRequest:
    """Check a decoded `/v1/completions` body; raise `RequestError` (4xx) naming the field and the fix."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object such as {{\"model\": ..., \"prompt\": ...}}, got "
                           f"{_type_name(body)}")
    model, adapter = _resolve_model(body, base_id, adapters)
    _check_inert(body)
    max_tokens = _max_tokens(body, max_tokens_limit)
    temperature = _number(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    stop, seed = _stop(body), _seed(body)
    stream = _flag(body, "stream")
    include_usage = _include_usage(body)
    prompts = _prompts(body, encode, vocab_size)
    if context_length is not None:
        for i, ids in enumerate(prompts):
            if len(ids) + max_tokens > context_length:
                raise RequestError(
                    f"this model's maximum context length is {context_length} tokens, but the prompt"
                    f"{'' if len(prompts) == 1 else f' {i}'} has {len(ids)} tokens and max_tokens asks for "
                    f"{max_tokens} more; shorten the prompt or lower max_tokens", param="prompt")
    return CompletionRequest(model=model, adapter=adapter, prompts=tuple(tuple(p) for p in prompts),
                             max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed,
                             stream=stream, include_usage=include_usage)
