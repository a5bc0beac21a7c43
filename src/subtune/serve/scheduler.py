"""Rows of concurrent requests collected into mixed-adapter batches and run through `AdapterStore.generate`.

One worker thread owns the model. It waits for a first row, keeps collecting for a short window (or until the batch
is full), left-pads the prompts and runs one `store.generate` for all of them: the base GEMMs once for the whole
batch, each adapter's term on its own rows. Rows differ in everything else, so per-row behaviour lives in two small
generate plug-ins instead of in generate's batch-wide settings:

- `_RowSampler` (a logits processor): greedy rows (temperature 0) keep their logits untouched, so generate's argmax
  picks exactly what the adapter alone would; a sampling row draws its token from softmax(logits / T) cut to the
  top-p nucleus with its *own* torch.Generator (seeded by the request's seed), then leaves only that token. So a
  seeded request draws the same tokens whatever else shares its batch.
- `_RowStopper` (a stopping criterion): after every step each row takes its new token, stops on EOS, its own
  max_tokens or one of its stop strings, and streams its new text. generate stops when every row is done.

A batch runs to the end of its longest row before the next one starts (no continuous batching): rows that arrive
meanwhile wait for the next batch.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from typing import Callable, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from subtune.serve.errors import ServeError, UnknownAdapterError

log = logging.getLogger("subtune.serve")

Emit = Callable[[str, object], None]  # (event kind, payload): "text" -> str, "done" -> Row, "error" -> exception


class Row:
    """One prompt's generation: its adapter, limits and sampler, the tokens so far, and where its events go.

    Events (sent from the worker thread through `emit`): ("text", new text) while streaming, then exactly one of
    ("done", row) or ("error", exception)."""

    def __init__(self, prompt: Sequence[int], adapter: str | None, *, max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (), stream: bool = False,
                 emit: Emit | None = None):
        self.prompt = list(prompt)
        self.adapter = adapter
        self.max_tokens = max_tokens
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.stop = tuple(stop)
        self.stream = stream
        self.emit = emit or (lambda kind, payload: None)
        self.tokens: list[int] = []  # generated, EOS excluded
        self.steps = 0  # tokens the model produced for this row (EOS included)
        self.text = ""
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
        self.cancelled = False  # set by the HTTP side when the client goes away
        self._sent = 0  # characters of text already streamed
        self._generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def sample(self, logits: torch.Tensor) -> int:
        """One token from softmax(logits / temperature) restricted to the top-p nucleus, with this row's RNG."""
        if self._generator is None:
            self._generator = torch.Generator(device=logits.device)
            if self.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.seed)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        ordered, order = probs.sort(descending=True, stable=True)  # one procedure for every top_p (1.0 too)
        keep = ordered.cumsum(-1) - ordered < self.top_p  # the smallest prefix reaching top_p
        return int(order[torch.multinomial(ordered * keep, 1, generator=self._generator)])


class _RowSampler(LogitsProcessor):
    """Per-row sampling inside a greedy generate: a sampling row's logits keep only the token it drew."""

    def __init__(self, rows: Sequence[Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for i, row in enumerate(self.rows):
            if row.temperature > 0 and not row.done:
                token = row.sample(scores[i])
                scores[i].fill_(-math.inf)
                scores[i, token] = 0.0
        return scores


class _RowStopper(StoppingCriteria):
    """Feeds each row its new token after every step; a row is done on EOS, max_tokens, a stop string or cancel."""

    def __init__(self, rows: Sequence[Row], advance: Callable[[Row, int], None]):
        self.rows, self.advance = rows, advance

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist()):
            if not row.done:
                self.advance(row, token)
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


class Batcher:
    """The worker thread that turns queued rows into mixed-adapter `store.generate` batches; see the module doc."""

    RECENT = 256  # batches remembered in stats()["recent"]

    def __init__(self, store, tokenizer, *, max_batch_size: int = 8, batch_window_s: float = 0.005):
        self.store, self.tokenizer = store, tokenizer
        self.max_batch_size, self.batch_window_s = max_batch_size, batch_window_s
        self.eos_ids = _eos_ids(store.model, tokenizer)
        self.pad_id = _pad_id(store.model, tokenizer, self.eos_ids)
        self._queue: queue.Queue[Row | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._stats_lock = threading.Lock()
        self._stats = {"batches": 0, "rows": 0, "tokens": 0, "max_batch_size": 0, "max_adapters_in_batch": 0}
        self._recent: collections.deque = collections.deque(maxlen=self.RECENT)
        self._running = 0  # rows of the batch in flight

    # ------------------------------------------------------------------------------------------- lifecycle
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing.is_set()

    def start(self) -> None:
        if self.running:
            return
        self._closing.clear()
        self._thread = threading.Thread(target=self._loop, name="subtune-serve-batcher", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop after the batch in flight; rows still queued get a 'shutting down' error."""
        self._closing.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None
        while True:
            try:
                row = self._queue.get_nowait()
            except queue.Empty:
                break
            if row is not None and not row.done:
                _fail(row, ServeError("the server is shutting down; send the request again once it is back"))

    def submit(self, rows: Sequence[Row]) -> None:
        if not self.running:
            raise ServeError("the batching worker is not running (the server is starting or shutting down); retry "
                             "in a moment")
        for row in rows:
            self._queue.put(row)

    def stats(self) -> dict:
        """batches run, rows and tokens generated, the largest batch and the most adapters (base counted as one)
        seen in one batch, the recent batches as {"size", "adapters"}, and the rows queued and running now. A batch
        is counted when it ends, which can be just after its rows' answers went out."""
        with self._stats_lock:
            return {**self._stats, "recent": list(self._recent), "queued": self._queue.qsize(),
                    "running": self._running}

    # ---------------------------------------------------------------------------------------------- worker
    def _loop(self) -> None:
        while not self._closing.is_set():
            batch = self._collect()
            try:
                self._run(batch)
            except Exception as exc:  # noqa: BLE001 - a bug here must not leave requests waiting forever
                log.exception("batch bookkeeping failed")
                for row in batch:
                    if not row.done:
                        _fail(row, exc)

    def _collect(self) -> list[Row]:
        """The first queued row, then whatever arrives within the window (or is already queued), up to the max."""
        first = self._queue.get()
        if first is None:
            return []
        batch, deadline = [first], time.monotonic() + self.batch_window_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                row = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if row is None:  # closing: run what was collected, then the loop ends
                self._closing.set()
                break
            batch.append(row)
        return batch

    def _run(self, batch: list[Row]) -> None:
        known = set(self.store.names())
        runnable = []
        for row in batch:
            if row.cancelled:
                row.finish_reason = "cancelled"
            elif row.adapter is not None and row.adapter not in known:  # removed after the request was checked
                _fail(row, UnknownAdapterError(f"adapter {row.adapter!r} was removed from the server before the "
                                               "request ran; list the served models with GET /v1/models"))
            else:
                runnable.append(row)
        if not runnable:
            return
        with self._stats_lock:
            self._running = len(runnable)
        try:
            self._generate(runnable)
        except Exception as exc:  # noqa: BLE001 - every row must hear about it; the worker keeps serving
            log.warning("a batch of %d rows failed: %s: %s", len(runnable), type(exc).__name__, exc)
            for row in runnable:
                if not row.done:
                    _fail(row, exc)
        else:
            for row in runnable:
                if not row.done:  # generate ended first (it should not): what the row has is its answer
                    self._finish(row, "length")
        self._record(runnable)

    def _generate(self, rows: list[Row]) -> None:
        device = next(self.store.model.parameters()).device
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row's next token is at the same position
            ids[i, width - len(row.prompt):] = torch.tensor(row.prompt)
            mask[i, width - len(row.prompt):] = 1
        config = GenerationConfig(max_new_tokens=max(r.max_tokens for r in rows), do_sample=False, num_beams=1,
                                  pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids) or None, use_cache=True)
        self.store.generate(ids.to(device), [r.adapter for r in rows], attention_mask=mask.to(device),
                            generation_config=config, logits_processor=LogitsProcessorList([_RowSampler(rows)]),
                            stopping_criteria=StoppingCriteriaList([_RowStopper(rows, self._advance)]))

    # ------------------------------------------------------------------------------------------ row state
    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _advance(self, row: Row, token: int) -> None:
        if row.cancelled:
            row.finish_reason = "cancelled"
            return
        row.steps += 1
        if token in self.eos_ids:
            self._finish(row, "stop")
            return
        row.tokens.append(token)
        if row.stop or row.stream:
            text = self._decode(row.tokens)
            cut = min((i for i in (text.find(s) for s in row.stop) if i >= 0), default=-1)
            if cut >= 0:
                self._finish(row, "stop", text[:cut])
                return
            if row.stream:
                self._stream(row, text)
        if len(row.tokens) >= row.max_tokens:
            self._finish(row, "length")

    def _stream(self, row: Row, text: str) -> None:
        """Send the new text that is final: not a possible start of a stop string, not a half-decoded character."""
        safe = len(text) - (max(map(len, row.stop)) - 1 if row.stop else 0)
        while safe > 0 and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe > row._sent and text.startswith(row.text):
            row.emit("text", text[row._sent:safe])
            row.text, row._sent = text[:safe], safe

    def _finish(self, row: Row, reason: str, text: str | None = None) -> None:
        final = self._decode(row.tokens) if text is None else text
        if row.stream and final[row._sent:] and final.startswith(row.text):
            row.emit("text", final[row._sent:])
        row.text, row._sent, row.finish_reason = final, len(final), reason
        row.emit("done", row)

    def _record(self, rows: list[Row]) -> None:
        adapters = len({r.adapter for r in rows})
        with self._stats_lock:
            s = self._stats
            s["batches"] += 1
            s["rows"] += len(rows)
            s["tokens"] += sum(r.steps for r in rows)
            s["max_batch_size"] = max(s["max_batch_size"], len(rows))
            s["max_adapters_in_batch"] = max(s["max_adapters_in_batch"], adapters)
            self._recent.append({"size": len(rows), "adapters": adapters})
            self._running = 0


def _fail(row: Row, exc: BaseException) -> None:
    row.finish_reason = "error"
    row.emit("error", exc)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(model.config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def _pad_id(model, tokenizer, eos_ids: set[int]) -> int:
    for value in (getattr(tokenizer, "pad_token_id", None),
                  getattr(getattr(model, "generation_config", None), "pad_token_id", None)):
        if isinstance(value, int):
            return value
    return min(eos_ids) if eos_ids else 0
