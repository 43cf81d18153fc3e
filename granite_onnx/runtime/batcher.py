"""Continuous batching: requests join and leave a running batch between decode steps.

    batcher = Batcher(model, max_batch=16)
    a = batcher.submit("def f(x):", GenerationConfig(max_new_tokens=32))   # checked now, queued
    while not batcher.idle:
        for done in batcher.step():                                        # admit, one decode step, retire
            print(done.id, done.result().text)

One `step()`:
  1. admit waiting requests (up to `max_batch` running): each is prefilled **alone** into its own state
     row (after its shared prefix, if it has one) and samples its first token from that prefill;
  2. if rows joined or left, rebuild the batch state: the rows' state goes to the host, running rows
     and new rows are stacked (K/V right-aligned, left-padded with masked zeros; columns no row needs
     are dropped) and the result goes back to the device (`state.stack`);
  3. one decode step for every running row; each request samples with its own sampler and stop rules,
     and a request that stopped leaves at the next step.

A row's numbers are the ones it would have alone: its prefill *is* alone, decode rows are independent
(left padding is masked in attention; Mamba and the MoE are per row), and every request keeps its own
seeded sampler — so greedy and seeded results equal `Model.generate` on that prompt alone (tested).

A request is validated when submitted (prompt ids, length, config, prefix state): a bad one raises there
and never reaches the batch; one that fails in its own prefill ends with finish_reason "error" and the
running rows go on untouched.

Moving rows costs one host round trip of the batch's state when membership changes (not per token).
`submit`/`cancel` may be called from any thread; `step` from one thread at a time.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from granite_onnx.runtime.config import GenerationConfig
from granite_onnx.runtime.generate import GenerationResult, Model, Prompt, RequestError, TextStream, TokenPicker
from granite_onnx.runtime.session import State
from granite_onnx.runtime.state import Snapshot, SnapshotError, stack

log = logging.getLogger(__name__)

_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    config: GenerationConfig
    prefix: Snapshot | None = None
    on_token: Callable[[Request, int, str], None] | None = None  # (request, id, new text) per token
    id: int = field(default_factory=lambda: next(_ids))
    token_ids: list[int] = field(default_factory=list)  # generated, stop token excluded
    logprobs: list[float] | None = None
    finish_reason: str | None = None  # "eos" | "length" | "stop" | "error" | "cancelled"
    error: BaseException | None = None
    text: str | None = None
    submitted_s: float = field(default_factory=time.perf_counter)
    ttft_s: float | None = None
    # decode bookkeeping
    _picker: TokenPicker | None = None
    _history: list[int] = field(default_factory=list)
    _stream: TextStream | None = None
    _pieces: list[str] = field(default_factory=list)
    _sampled: int = 0
    _pending: int = -1  # the last sampled id, fed at the next decode step

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def result(self) -> GenerationResult:
        if self.finish_reason is None:
            raise RequestError(f"request {self.id} is still running")
        if self.finish_reason == "error":
            raise RequestError(f"request {self.id} failed: {self.error}") from self.error
        return GenerationResult(list(self.token_ids), self.text, self.finish_reason, len(self.prompt_ids),
                                self.logprobs)


class Batcher:
    def __init__(self, model: Model, *, max_batch: int = 16, chunk_size: int | None = None) -> None:
        if max_batch < 1:
            raise RequestError(f"max_batch must be ≥ 1, got {max_batch}")
        self.model = model
        self.max_batch = max_batch
        self.chunk_size = chunk_size
        self._waiting: deque[Request] = deque()
        self._lock = threading.Lock()
        self.running: list[Request] = []
        self._state: State | None = None
        self._stop_ids = frozenset(model.eos_token_ids)
        self.steps = 0
        self.rebuilds = 0

    # ------------------------------------------------------------- requests
    def submit(self, prompt: Prompt, config: GenerationConfig | None = None, *, state: Snapshot | None = None,
               on_token: Callable[[Request, int, str], None] | None = None) -> Request:
        """Check a request and queue it; it joins the batch at the next `step()`. Raises on bad input."""
        if state is not None:
            if not isinstance(state, Snapshot):
                raise RequestError(f"state= takes a Snapshot, got {type(state).__name__}")
            if state.batch != 1:
                raise RequestError(f"a request continues a one-row state, this one has {state.batch} rows")
            if state.model and state.model != self.model.fingerprint():
                raise SnapshotError("this state was saved from another model; restore it into the model it came from")
        encoded, config = self.model._prepare([prompt], config, state)
        req = Request(encoded[0], config, state, on_token)
        req.logprobs = [] if config.logprobs else None
        with self._lock:
            self._waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request; it leaves the batch at the next step."""
        with self._lock:
            if req in self._waiting:
                self._waiting.remove(req)
        if not req.done:
            self._finish(req, "cancelled")

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        return not self._waiting and not any(not r.done for r in self.running)

    # ----------------------------------------------------------------- steps
    def step(self) -> list[Request]:
        """Admit, rebuild the batch if it changed, decode one token per running row; return the requests
        that finished during this step."""
        finished: list[Request] = []
        joined: list[tuple[Request, Snapshot]] = []
        while len(self.running) + len(joined) < self.max_batch:
            with self._lock:
                if not self._waiting:
                    break
                req = self._waiting.popleft()
            part = self._admit(req)
            if part is None:
                finished.append(req)
            else:
                joined.append((req, part))
        staying = [r for r in self.running if not r.done]
        if joined or len(staying) != len(self.running):
            self._rebuild(staying, joined)
        if self.running:
            self._decode(finished)
        self.steps += 1
        return finished

    def run(self, max_steps: int | None = None) -> list[Request]:
        """Step until every submitted request is done (or `max_steps`); return them in finishing order."""
        done: list[Request] = []
        for n in itertools.count():
            if self.idle or (max_steps is not None and n >= max_steps):
                break
            done += self.step()
        return done

    # ------------------------------------------------------------- internals
    def _admit(self, req: Request) -> Snapshot | None:
        """Prefill `req` alone and sample its first token; its one-row state, or None if it is already done."""
        m = self.model
        try:
            logits, st, history = m.start([req.prompt_ids], req.prefix, chunk_size=self.chunk_size)
        except Exception as e:  # this request's own failure: the batch never saw it
            log.warning("request %d failed in prefill: %s", req.id, e)
            self._finish(req, "error", e)
            return None
        req._picker = TokenPicker(req.config)
        req._history = history[0]
        req._stream = TextStream(m.tokenizer, req.config.stop_strings) if m.tokenizer is not None else None
        self._pick_and_take(req, logits, None)
        if req.done:
            return None
        return m.snapshot(st, [req._history], None)

    def _rebuild(self, staying: list[Request], joined: list[tuple[Request, Snapshot]]) -> None:
        parts: list[Snapshot] = []
        if staying:
            assert self._state is not None
            current = self.model.snapshot(self._state, [r._history for r in self.running])
            keep = [i for i, r in enumerate(self.running) if not r.done]
            parts.append(current.rows(keep) if len(keep) != len(self.running) else current)
        parts += [p for _, p in joined]
        self.running = staying + [r for r, _ in joined]
        # room for the longest remaining reply: no K/V regrowth mid-batch
        left = max((r.config.max_new_tokens - len(r.token_ids) for r in self.running), default=0)
        self._state = self.model.restore(stack(parts), max(left, 0)) if parts else None
        self.rebuilds += 1

    def _decode(self, finished: list[Request]) -> None:
        assert self._state is not None
        nxt = np.fromiter((r._pending for r in self.running), np.int64, len(self.running))
        logits = self.model.session.decode(nxt, self._state)
        greedy = logits.argmax(axis=-1)
        for i, req in enumerate(self.running):
            if req.done:  # cancelled meanwhile: leaves at the next step
                continue
            self._pick_and_take(req, logits[i:i + 1], int(greedy[i]))
            if req.done:
                finished.append(req)

    def _pick_and_take(self, req: Request, row: np.ndarray, argmax: int | None) -> None:
        """Sample `req`'s next token from its logits row [1, V]; a failure ends this request only."""
        p = req._picker
        assert p is not None
        try:
            if p.fast and argmax is not None and np.isfinite(row[0, argmax]):
                tok = argmax
            else:
                tok = int(p(row, [req._history])[0])
            self._take(req, tok, row)
        except Exception as e:
            log.warning("request %d failed while sampling: %s", req.id, e)
            self._finish(req, "error", e)

    def _take(self, req: Request, tok: int, logits: np.ndarray) -> None:
        """Record one sampled token of `req` (logits [1, V] it came from) and decide whether it stops."""
        if req.ttft_s is None:
            req.ttft_s = time.perf_counter() - req.submitted_s
        req._sampled += 1
        req._pending = tok
        cfg = req.config
        if cfg.repetition_penalty != 1.0:
            req._history.append(tok)
        if tok in self._stop_ids or tok in cfg.stop_token_ids:
            self._finish(req, "eos")
            return
        req.token_ids.append(tok)
        if req.logprobs is not None:
            assert req._picker is not None
            req.logprobs.append(float(req._picker.logprobs(logits, np.array([tok]))[0]))
        piece = ""
        if req._stream is not None:
            piece = req._stream.push(tok)
            if piece:
                req._pieces.append(piece)
        if req.on_token is not None:
            req.on_token(req, tok, piece)
        if req._stream is not None and req._stream.stopped:
            self._finish(req, "stop")
        elif req._sampled >= cfg.max_new_tokens:
            self._finish(req, "length")

    def _finish(self, req: Request, reason: str, error: BaseException | None = None) -> None:
        req.finish_reason, req.error = reason, error
        if req._stream is not None:
            if reason != "stop":
                tail = req._stream.flush()
                if tail:
                    req._pieces.append(tail)
            req.text = "".join(req._pieces)
        elif self.model.tokenizer is not None:
            req.text = self.model.decode(req.token_ids)
