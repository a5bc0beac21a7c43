"""An OpenAI-compatible HTTP server over an AdapterStore: point existing OpenAI clients at many fine-tuned variants.

    app = create_app(store, tokenizer)            # FastAPI app; serve(store, tokenizer, port=8000) runs it (uvicorn)

- `GET /v1/models`: the base and every adapter, OpenAI's list format (an adapter's `parent` is the base, as vLLM).
- `POST /v1/completions`: prompt (string, strings, token ids), max_tokens, temperature, top_p, stop, seed, stream;
  the request's `model` picks the adapter by name, or the base by its id (the --model value, as vLLM).
- `GET /health`: 200 once the batching worker runs.

Concurrent requests are collected into mixed-adapter batches (`serve/scheduler.py`): a short window after the first
waiting row, at most `max_batch_size` rows, one `store.generate` per batch on one worker thread, so the base GEMMs
run once for everyone. Greedy answers (temperature 0) are the adapter's own greedy output; a seeded sampling request
draws the same tokens whatever shares its batch. Bad requests get a 4xx answer in OpenAI's error shape
({"error": {"message", "type", "param", "code"}}) before anything is queued, and the server keeps serving.
No authentication: the default host is loopback (127.0.0.1).
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
import uuid
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, AsyncIterator

from subtune.serve.completions import CompletionRequest, parse_completion_request
from subtune.serve.errors import MissingDependencyError, RequestError, ServeError, UnknownAdapterError
from subtune.serve.scheduler import Batcher, Row
from subtune.serve.store import AdapterStore

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - the dev install has them
    raise MissingDependencyError(f"the HTTP server needs fastapi and uvicorn ({e.name} is missing); install them with "
                                 "pip install 'subtune[serve]'") from None

DEFAULT_MAX_TOKENS_LIMIT = 1024


def create_app(store: AdapterStore, tokenizer, *, base_name: str | None = None, max_batch_size: int = 8,
               batch_window_ms: float = 5.0, max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT) -> FastAPI:
    """The FastAPI app serving `store` (its base and adapters) with `tokenizer`; see the module docstring.

    `base_name` is the base's model id (default: the model's `config._name_or_path`, which `load_model` sets to the
    --model value). The batching worker starts and stops with the app (ASGI lifespan); its counters are
    `app.state.batcher.stats()`."""
    base_id = _check_app_options(store, tokenizer, base_name, max_batch_size, batch_window_ms, max_tokens_limit)
    batcher = Batcher(store, tokenizer, max_batch_size=max_batch_size, batch_window_s=batch_window_ms / 1000)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.close)

    app = FastAPI(title="subtune", summary="OpenAI-compatible completions over one base and its adapters",
                  lifespan=lifespan)
    app.state.store, app.state.batcher, app.state.base_id = store, batcher, base_id
    created = int(time.time())
    context_length = getattr(store.model.config, "max_position_embeddings", None)
    vocab_size = store.model.get_input_embeddings().num_embeddings

    def encode(text: str) -> list[int]:
        return tokenizer(text)["input_ids"]

    def model_card(model_id: str, parent: str | None) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "subtune", "root": base_id,
                "parent": parent}

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.to_json(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{exc.detail}: {request.method} {request.url.path}"
        if exc.status_code in (404, 405):
            message += "; this server answers GET /v1/models, POST /v1/completions and GET /health"
        return JSONResponse(RequestError(message, status=exc.status_code, kind=kind).to_json(),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(_server_error(exc, 500), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not batcher.running:
            return JSONResponse(_server_error(ServeError("the batching worker is not running"), 503), 503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list",
                "data": [model_card(base_id, None)] + [model_card(n, base_id) for n in store.names()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        if model_id == base_id or model_id in store.names():
            return model_card(model_id, None if model_id == base_id else base_id)
        raise RequestError(f"The model `{model_id}` does not exist on this server (GET /v1/models lists them)",
                           param="model", status=404, code="model_not_found")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request)
        req = parse_completion_request(body, base_id=base_id, adapters=store.names(), encode=encode,
                                       vocab_size=vocab_size, max_tokens_limit=max_tokens_limit,
                                       context_length=context_length)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        rows = [Row(prompt, req.adapter, max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                    seed=req.seed_for(i), stop=req.stop, stream=req.stream, emit=partial(_post, loop, events, i))
                for i, prompt in enumerate(req.prompts)]
        try:
            batcher.submit(rows)
        except ServeError as exc:
            return JSONResponse(_server_error(exc, 503), status_code=503)
        header = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                  "model": req.model}
        if req.stream:
            return StreamingResponse(_stream(req, rows, events, header), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _collect(rows, events, header)

    return app


def serve(store: AdapterStore, tokenizer, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          **app_options: Any) -> None:
    """Run `create_app(store, tokenizer, **app_options)` with uvicorn until interrupted (Ctrl-C).

    The socket is bound first, so a port in use is a one-line ServeError naming the fix, not a log line."""
    app = create_app(store, tokenizer, **app_options)
    sock = bind(host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port); port 0 picks a free one (see `sock.getsockname()`)."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        if sock is not None:
            sock.close()
        raise ServeError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port (or --host)"
                         ) from None
    return sock


# ------------------------------------------------------------------------------------------------ helpers
def _check_app_options(store, tokenizer, base_name, max_batch_size, batch_window_ms, max_tokens_limit) -> str:
    if not isinstance(store, AdapterStore):
        raise ServeError(f"create_app needs a subtune AdapterStore, got {type(store).__name__}; build one with "
                         "AdapterStore(base_model) and add adapters to it")
    if not callable(tokenizer) or not callable(getattr(tokenizer, "decode", None)):
        raise ServeError(f"create_app needs the base model's tokenizer (a transformers tokenizer that encodes and "
                         f"decodes), got {type(tokenizer).__name__}")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ServeError(f"max_batch_size must be an integer of at least 1, got {max_batch_size!r}")
    if (isinstance(batch_window_ms, bool) or not isinstance(batch_window_ms, (int, float))
            or not math.isfinite(batch_window_ms) or batch_window_ms < 0):
        raise ServeError(f"batch_window_ms must be a finite number of milliseconds >= 0, got {batch_window_ms!r}")
    if isinstance(max_tokens_limit, bool) or not isinstance(max_tokens_limit, int) or max_tokens_limit < 1:
        raise ServeError(f"max_tokens_limit must be an integer of at least 1, got {max_tokens_limit!r}")
    base_id = base_name if base_name is not None else getattr(store.model.config, "_name_or_path", None) or "base"
    if not isinstance(base_id, str) or not base_id:
        raise ServeError(f"base_name must be a non-empty string, got {base_name!r}")
    if base_id in store.names():
        raise ServeError(f"adapter {base_id!r} has the base model's id, so requests could not reach one of them; "
                         "rename the adapter or pass another base_name")
    return base_id


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as e:  # JSONDecodeError and undecodable bytes
        raise RequestError(f"the request body is not valid JSON ({e}); send a JSON object such as "
                           '{"model": "...", "prompt": "..."}') from None


def _post(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int, kind: str, payload: object) -> None:
    """From the worker thread into the request's event queue (dropped if the server's loop is gone)."""
    try:
        loop.call_soon_threadsafe(events.put_nowait, (index, kind, payload))
    except RuntimeError:
        pass


def _server_error(exc: BaseException, status: int) -> dict:
    """OpenAI's error body for a failure that is not the request's fault (a subtune error says its fix itself;
    anything else is named by its type)."""
    message = str(exc) if isinstance(exc, ServeError) else f"{type(exc).__name__}: {exc}"
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _row_error(exc: BaseException) -> tuple[dict, int]:
    """A failure inside a batch as (OpenAI error body, status)."""
    if isinstance(exc, UnknownAdapterError):
        status = 404
    elif isinstance(exc, ServeError):  # the store's state (an adapter merged in, shutting down): retry later
        status = 503
    else:
        status = 500
    return _server_error(exc, status), status


def _usage(rows: list[Row]) -> dict:
    prompt, completion = sum(len(r.prompt) for r in rows), sum(r.steps for r in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _cancel(rows: list[Row]) -> None:
    for row in rows:
        row.cancelled = True


async def _collect(rows: list[Row], events: asyncio.Queue, header: dict) -> JSONResponse:
    """Wait for every row of a non-streamed request, then answer once."""
    pending = len(rows)
    try:
        while pending:
            index, kind, payload = await events.get()
            if kind == "error":
                body, status = _row_error(payload)
                return JSONResponse(body, status_code=status)
            if kind == "done":
                pending -= 1
    finally:
        _cancel([r for r in rows if not r.done])  # the client left, or another row failed
    choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
               for i, r in enumerate(rows)]
    return JSONResponse({**header, "choices": choices, "usage": _usage(rows)})


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _stream(req: CompletionRequest, rows: list[Row], events: asyncio.Queue, header: dict
                  ) -> AsyncIterator[str]:
    """OpenAI's completion stream: text chunks as they are generated, each choice's last chunk with its
    finish_reason, an optional usage chunk, then `data: [DONE]`."""
    pending = len(rows)
    try:
        while pending:
            index, kind, payload = await events.get()
            if kind == "error":
                yield _sse(_row_error(payload)[0])
                break
            choice = {"index": index, "text": payload if kind == "text" else "", "logprobs": None,
                      "finish_reason": rows[index].finish_reason if kind == "done" else None}
            yield _sse({**header, "choices": [choice]})
            if kind == "done":
                pending -= 1
        else:
            if req.include_usage:
                yield _sse({**header, "choices": [], "usage": _usage(rows)})
        yield _sse("[DONE]")
    finally:
        _cancel([r for r in rows if not r.done])
