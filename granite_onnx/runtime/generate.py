"""Generation over a GraniteSession: prefill (chunked), decode loop, sampling, streaming, saved state.

    prefill(ids per row, state=None)   → last logits [B, V], state         (left-padded, chunks of `chunk_size`)
    decode_step(next ids [B], state)   → logits [B, V], state               (one token per row)
    snapshot(state) / restore(snap)    → host copy of the full state / a device state again
    prefix(prompt)                     → a snapshot of a shared prefix, prefilled once
    generate(prompts, config, state=)  → one GenerationResult per prompt (after the prefix, if given)
    stream(prompt, config)             → text pieces as they are decoded

One loaded `Model` serves any number of threads: every call owns its state and its bindings, and ONNX
Runtime sessions are safe to run concurrently.

Imports: numpy, onnxruntime, tokenizers (through runtime.tokenizer) — never torch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from granite_onnx.runtime.config import GenerationConfig, GenerationConfigError
from granite_onnx.runtime.sampling import Sampler
from granite_onnx.runtime.session import GraniteSession, RuntimeError_, State
from granite_onnx.runtime.state import Snapshot, SnapshotError, stack
from granite_onnx.runtime.tokenizer import StopStringMatcher, Tokenizer, TokenizerNotFoundError

if TYPE_CHECKING:  # pragma: no cover
    from granite_onnx.runtime.chat import Chat

log = logging.getLogger(__name__)

ATTENTION_BUDGET = 64 * 2**20  # least bytes of attention scores + mask per prefill chunk when chunk_size is None
WEIGHTS_PER_BUDGET = 8  # ... and at least 1/8 of the weight bytes: see attention_budget_for
MIN_AUTO_CHUNK = 16  # below this, per-chunk overhead dominates: accept the (small) excess instead


def attention_budget_for(weight_bytes: int) -> int:
    """Default prefill workspace: max(64 MiB, weight_bytes / 8).

    Every prefill chunk reads every weight once, so the chunk must be long enough to amortise that read.
    At Granite-Tiny widths (tiny-4L, 2.9 GB of float32 weights) a 64 MiB budget cut a 4096-token prompt into
    9 chunks (1094 … 294 tokens) that re-read 2.9 GB each from memory; 1/8 of the weights (365 MB = 348 MiB)
    makes it 2 chunks and the prefill ~20 % faster (best 6.83 → 5.49 s, BENCHMARKS.md). The workspace stays bounded whatever the context
    (the flat-memory property), and in proportion to what the model already holds: small models keep 64 MiB."""
    return max(ATTENTION_BUDGET, weight_bytes // WEIGHTS_PER_BUDGET)

Prompt = str | Sequence[int]
Progress = Callable[[int, int], None]  # (tokens done, tokens total) after each prefill chunk


class RequestError(ValueError):
    """A request the model cannot serve (empty prompt, too long, ids out of range); says how to fix it."""


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "eos" | "length" | "stop"
    prompt_tokens: int
    logprobs: list[float] | None = None


class Model:
    """A loaded model folder: session + tokenizer. Thread-safe: each call keeps its own state."""

    def __init__(self, session: GraniteSession, tokenizer: Tokenizer | None) -> None:
        self.session = session
        self.cfg = session.cfg
        self.tokenizer = tokenizer
        # bytes; see chunk_length and attention_budget_for
        self.attention_budget = attention_budget_for(session.weight_bytes)

    @classmethod
    def load(cls, path: str | Path, provider: str = "cpu", threads: int | None = None,
             optimization: str = "all", spin: bool | None = None, kv_cache: str | None = None,
             recurrent_state: str | None = None) -> Model:
        """Load a model folder; `provider` "cpu" or "cuda", `threads` ONNX Runtime intra-op threads,
        `spin` whether idle ORT workers spin, `kv_cache` "shared"/"grow"/None and `recurrent_state`
        "inplace"/"pingpong"/None (see GraniteSession; None: the folder's own)."""
        sess = GraniteSession(path, provider=provider, threads=threads, optimization=optimization, spin=spin,
                              kv_cache=kv_cache, recurrent_state=recurrent_state)
        try:
            tok: Tokenizer | None = Tokenizer.from_folder(path)
        except TokenizerNotFoundError:
            tok = None
        return cls(sess, tok)

    # ------------------------------------------------------------------ input
    @property
    def context_length(self) -> int:
        return self.cfg.max_position_embeddings

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.tokenizer is not None and self.tokenizer.eos_token_ids:
            return tuple(self.tokenizer.eos_token_ids)
        return self.cfg.eos_token_ids

    def encode(self, prompt: Prompt, *, allow_empty: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if not prompt and not allow_empty:
                raise RequestError("the prompt is empty; give some text or token ids")
            if self.tokenizer is None:
                raise RequestError(f"{self.session.path} has no tokenizer.json, so text prompts cannot be encoded; "
                                   "pass token ids instead (--ids 1,2,3)")
            ids = self.tokenizer.encode(prompt) if prompt else []
        elif isinstance(prompt, (bytes, dict)) or not hasattr(prompt, "__iter__"):
            raise RequestError(f"a prompt is a string or a sequence of token ids, got {type(prompt).__name__}")
        else:
            try:
                ids = [_as_id(i) for i in prompt]
            except TypeError as e:
                raise RequestError(f"prompt token ids must be ints: {e}") from None
        if not ids and not allow_empty:
            raise RequestError("the prompt is empty; give some text or token ids")
        bad = [i for i in ids if not 0 <= i < self.cfg.vocab_size]
        if bad:
            raise RequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.cfg.vocab_size}); "
                               "check the ids or the tokenizer")
        return ids

    def decode(self, ids: Sequence[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(list(ids))

    def check_length(self, context: int, prompt: int, config: GenerationConfig) -> None:
        if context + prompt + config.max_new_tokens > self.context_length:
            where = f" after {context} tokens of state" if context else ""
            raise RequestError(f"the prompt has {prompt} tokens{where} and max_new_tokens={config.max_new_tokens}, "
                               f"more than the context length {self.context_length}; shorten the prompt or "
                               "lower max_new_tokens")

    # ------------------------------------------------------------------ state
    def new_state(self, batch: int = 1) -> State:
        return self.session.new_state(batch)

    def fingerprint(self) -> dict[str, Any]:
        """What a snapshot must match to be restored here: the state's names and shapes and the vocabulary."""
        c = self.cfg
        return {"vocab_size": c.vocab_size, "layer_types": list(c.layer_types), "hidden_size": c.hidden_size,
                "state": {s.past_name: [d for d in s.concrete_shape(1, 0)[1:]] for s in self.session.specs}}

    def snapshot(self, state: State, tokens: Sequence[Sequence[int]] | None = None,
                 logits: np.ndarray | None = None, extra: dict[str, Any] | None = None) -> Snapshot:
        """A host copy of `state` (every K/V and recurrent tensor, the padding, the length)."""
        arrays = self.session.state_to_numpy(state)
        toks = [list(map(int, t)) for t in tokens] if tokens is not None else [[] for _ in range(state.batch)]
        if len(toks) != state.batch:
            raise RequestError(f"{len(toks)} token lists for a state of {state.batch} rows")
        kv = tuple(s.past_name for s in self.session.kv_specs)
        return Snapshot(arrays, state.past_len, state.pads.copy(), toks, kv,
                        None if logits is None else np.array(logits, np.float32, copy=True),
                        self.fingerprint(), dict(extra or {}))

    def restore(self, snap: Snapshot, reserve: int = 0) -> State:
        """A new device state equal to `snap` (the snapshot stays usable: restore it as often as needed);
        `reserve`: tokens still to come, so that a shared K/V cache is allocated once, at its final size."""
        if snap.model and snap.model != self.fingerprint():
            mine, theirs = self.fingerprint(), snap.model
            diff = [k for k in mine if mine.get(k) != theirs.get(k)]
            raise SnapshotError(f"this state was saved from another model (differs in {', '.join(diff)}); "
                                f"restore it into the model it came from")
        try:
            return self.session.state_from_numpy(snap.arrays, snap.past_len, snap.pads,
                                                 capacity=snap.past_len + reserve)
        except RuntimeError_ as e:
            raise SnapshotError(str(e)) from None

    # ---------------------------------------------------------------- prefill
    def prefill(self, batch: Sequence[Sequence[int]], *, state: State | None = None, chunk_size: int | None = None,
                progress: Progress | None = None, reserve: int = 0) -> tuple[np.ndarray, State]:
        """Run the prompt ids of each row through the model, `chunk_size` tokens at a time (carrying state;
        None: chunks sized to the attention budget, see `chunk_length`).

        Fresh rows (state None) are left-padded to the longest. Continuing a state, every row must bring
        the same number of new tokens: padding between a row's past and its new tokens would not be
        neutral (use `generate(..., state=snapshot)`, which prefills such rows one by one).
        `reserve`: decode steps to make room for now, so that a shared K/V cache is allocated once, at
        its final size (see GraniteSession.reserve).
        Returns the last position's logits [B, V] (a copy) and the state.
        """
        rows = [list(r) for r in batch]
        b, length = len(rows), max((len(r) for r in rows), default=0)
        if b == 0 or length == 0:
            raise RequestError("nothing to prefill: every row is empty")
        if chunk_size is not None and chunk_size <= 0:
            raise RequestError(f"chunk_size must be ≥ 1, got {chunk_size}")
        ids = np.zeros((b, length), np.int64)
        pads = np.zeros(b, np.int64)
        for r, x in enumerate(rows):
            ids[r, length - len(x):] = x
            pads[r] = length - len(x)
        if state is None:
            st = self.session.new_state(b, pads, capacity=length + reserve)
        else:
            st = state
            if st.batch != b:
                raise RequestError(f"{b} rows of new tokens for a state of {st.batch} rows")
            if pads.any():
                raise RequestError("continuing a state, every row needs the same number of new tokens "
                                   f"(got {sorted({len(r) for r in rows})}); prefill rows one by one and stack them")
            self.session.reserve(st, st.past_len + length + reserve)
        done = 0
        while done < length:
            end = done + self.chunk_length(st.past_len, length - done, b, chunk_size)
            chunk = np.ascontiguousarray(ids[:, done:end])
            ov, host = self.session._run(st, chunk, st.mask(end - done))
            done = end
            if progress is not None:
                progress(done, length)
        logits = host if host is not None else ov.numpy()
        return np.array(logits[:, -1, :], copy=True), st

    def chunk_length(self, past: int, remaining: int, batch: int, chunk_size: int | None = None) -> int:
        """Tokens in the next prefill chunk: `chunk_size` if given, else as many as keep the attention
        workspace within `attention_budget` bytes (default: attention_budget_for the model's weights).

        A chunk of t tokens after `past` makes each attention layer hold t × (past + t) scores per head
        plus the additive mask (GroupQueryAttention's bias, expanded to t rows): float32
        [batch, heads + 2, t, past + t]. That grows with the context, so with a fixed chunk the peak
        memory of a long prefill grows faster than the K/V cache. Solving t·(past + t) ≤ budget / (4·
        batch·(heads + 2)) keeps it at the budget: whole short prompts in one chunk, a 32K-token prompt
        in shrinking chunks (~90 tokens at 32K on `small` with 64 MiB).
        """
        if chunk_size is not None:
            return min(chunk_size, remaining)
        if not self.session.kv_specs:
            return remaining  # no attention layer: nothing in a chunk grows with the context
        cells = self.attention_budget // (4 * batch * (self.cfg.num_attention_heads + 2))
        t = int((math.sqrt(past * past + 4 * cells) - past) / 2)
        return max(1, min(remaining, max(t, MIN_AUTO_CHUNK)))

    def decode_step(self, next_ids: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """Feed one token per row: next_ids [B] → logits [B, V] (a view, valid until this state's next step)."""
        return self.session.decode(next_ids, state), state

    def prefix(self, prompt: Prompt, *, chunk_size: int | None = None, progress: Progress | None = None) -> Snapshot:
        """Prefill a shared prefix (system prompt, document) once; pass the result as `state=` to
        `generate`/`stream`/`Batcher.submit` to reuse it for any number of requests."""
        ids = self.encode(prompt)
        if len(ids) >= self.context_length:
            raise RequestError(f"the prefix has {len(ids)} tokens, the context length is {self.context_length}")
        logits, st = self.prefill([ids], chunk_size=chunk_size, progress=progress)
        return self.snapshot(st, [ids], logits)

    def start(self, encoded: list[list[int]], snap: Snapshot | None = None, *, chunk_size: int | None = None,
              progress: Progress | None = None, reserve: int = 0) -> tuple[np.ndarray, State, list[list[int]]]:
        """Prefill the rows `encoded` (after `snap`, one row per prompt or one shared row) → logits [B, V],
        state, and each row's full token history; `reserve` = decode steps to size the K/V cache for."""
        if snap is None:
            logits, st = self.prefill(encoded, chunk_size=chunk_size, progress=progress, reserve=reserve)
            return logits, st, [list(x) for x in encoded]
        if snap.batch not in (1, len(encoded)):
            raise RequestError(f"a state of {snap.batch} rows for {len(encoded)} prompts; give one shared row "
                               "or one row per prompt")
        base = snap if snap.batch == len(encoded) else snap.repeat(len(encoded))
        history = [list(base.tokens[r]) + list(x) for r, x in enumerate(encoded)]
        if all(not x for x in encoded):
            if base.logits is None:
                raise RequestError("the state holds no logits to continue from; give a non-empty prompt")
            return np.array(base.logits, np.float32), self.restore(base, reserve), history
        if len({len(x) for x in encoded}) == 1:
            logits, st = self.prefill(encoded, state=self.restore(base, len(encoded[0]) + reserve),
                                      chunk_size=chunk_size, progress=progress, reserve=reserve)
            return logits, st, history
        parts = []  # rows of different lengths: each row alone, then side by side
        for r, x in enumerate(encoded):
            one = base.rows([r])
            if x:
                lo, st1 = self.prefill([x], state=self.restore(one, len(x)), chunk_size=chunk_size, progress=progress)
                one = self.snapshot(st1, [history[r]], lo)
            parts.append(one)
        merged = stack(parts)
        return np.array(merged.logits, np.float32), self.restore(merged, reserve), history

    # --------------------------------------------------------------- generate
    def _prepare(self, prompts: Sequence[Prompt], config: GenerationConfig | None, snap: Snapshot | None,
                 ) -> tuple[list[list[int]], GenerationConfig]:
        if isinstance(config, dict):
            config = GenerationConfig(**config)
        if config is not None and not isinstance(config, GenerationConfig):
            raise RequestError(f"config must be a GenerationConfig, got {type(config).__name__}")
        config = (config or GenerationConfig()).validate(self.cfg.vocab_size)
        if config.stop_strings and self.tokenizer is None:
            raise RequestError(f"stop strings need a tokenizer, and {self.session.path} has no tokenizer.json; "
                               "stop on token ids with stop_token_ids instead")
        if snap is not None and not isinstance(snap, Snapshot):
            raise RequestError(f"state= takes a Snapshot (model.prefix(...) or model.snapshot(...)), "
                               f"got {type(snap).__name__}")
        encoded = [self.encode(p, allow_empty=snap is not None) for p in prompts]
        for r, ids in enumerate(encoded):
            context = 0 if snap is None else int(snap.lengths[r if snap.batch > 1 else 0])
            self.check_length(context, len(ids), config)
        return encoded, config

    def iter_tokens(self, prompts: Sequence[Prompt], config: GenerationConfig | None = None, *,
                    chunk_size: int | None = None, state: Snapshot | None = None,
                    progress: Progress | None = None,
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """Yield (token ids [B], still-active [B] before this token, logprobs [B] | None) per decode step."""
        encoded, config = self._prepare(prompts, config, state)
        logits, st, history = self.start(encoded, state, chunk_size=chunk_size, progress=progress,
                                         reserve=config.max_new_tokens)
        yield from self.decode_loop(logits, st, history, config)

    def decode_loop(self, logits: np.ndarray, st: State, history: list[list[int]], config: GenerationConfig,
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """Sample, yield, feed back — until every row stopped or max_new_tokens. The state is left holding
        every yielded token but the last (which the caller may feed, e.g. a chat's end-of-text)."""
        pick = TokenPicker(config)
        b = st.batch
        active = np.ones(b, bool)
        stop_ids = frozenset(self.eos_token_ids) | frozenset(config.stop_token_ids)
        for step in range(config.max_new_tokens):
            nxt = pick(logits, history)
            lp = pick.logprobs(logits, nxt) if config.logprobs else None
            yield nxt, active.copy(), lp
            for r in range(b):
                if active[r]:
                    tok = int(nxt[r])
                    if pick.needs_history:
                        history[r].append(tok)
                    if tok in stop_ids:
                        active[r] = False
            if not active.any() or step == config.max_new_tokens - 1:
                break
            logits = self.session.decode(nxt, st)

    def generate(self, prompts: Prompt | Sequence[Prompt], config: GenerationConfig | None = None, *,
                 chunk_size: int | None = None, state: Snapshot | None = None,
                 progress: Progress | None = None) -> list[GenerationResult]:
        """Generate for one prompt or a batch (mixed lengths are left-padded into one batch).

        With `state` (a `prefix()` or `snapshot()`), each prompt continues that state: one shared row
        for all prompts, or one row per prompt; an empty prompt continues from the state's last logits.
        """
        batch = _as_batch(prompts)
        encoded, config = self._prepare(batch, config, state)
        stop_ids = set(self.eos_token_ids) | set(config.stop_token_ids)
        out: list[list[int]] = [[] for _ in batch]
        lps: list[list[float]] = [[] for _ in batch]
        reasons = ["length"] * len(batch)
        matchers = [StopStringMatcher(config.stop_strings) if config.stop_strings else None for _ in batch]
        decoders = [self.tokenizer.stream_decoder() if (self.tokenizer and config.stop_strings) else None
                    for _ in batch]
        live = np.ones(len(batch), bool)
        logits, st, history = self.start(encoded, state, chunk_size=chunk_size, progress=progress,
                                         reserve=config.max_new_tokens)
        for nxt, active, lp in self.decode_loop(logits, st, history, config):
            for r in np.nonzero(active & live)[0]:
                tok = int(nxt[r])
                if tok in stop_ids:
                    reasons[r] = "eos"
                    live[r] = False
                    continue
                out[r].append(tok)
                if lp is not None:
                    lps[r].append(float(lp[r]))
                m, d = matchers[r], decoders[r]
                if m is not None and d is not None:
                    m.push(d.push(tok))
                    if m.stopped:
                        reasons[r] = "stop"
                        live[r] = False
            if not live.any():
                break
        results = []
        for r in range(len(batch)):
            text = self.decode(out[r])
            if reasons[r] == "stop" and matchers[r] is not None:
                text = matchers[r].text  # type: ignore[union-attr]
            results.append(GenerationResult(out[r], text, reasons[r], len(encoded[r]),
                                            lps[r] if config.logprobs else None))
        return results

    def stream(self, prompt: Prompt, config: GenerationConfig | None = None, *, chunk_size: int | None = None,
               state: Snapshot | None = None, progress: Progress | None = None) -> Iterator[str]:
        """Yield text pieces as tokens are decoded; never a broken UTF-8 character; honours stop strings."""
        if self.tokenizer is None:
            raise RequestError(f"{self.session.path} has no tokenizer.json; streaming text needs one")
        encoded, config = self._prepare([prompt], config, state)  # errors now, not at the first next()
        return self._stream(encoded, config, chunk_size, state, progress)

    def _stream(self, encoded: list[list[int]], config: GenerationConfig, chunk_size: int | None,
                state: Snapshot | None, progress: Progress | None) -> Iterator[str]:
        assert self.tokenizer is not None
        stop_ids = set(self.eos_token_ids) | set(config.stop_token_ids)
        text = TextStream(self.tokenizer, config.stop_strings)
        logits, st, history = self.start(encoded, state, chunk_size=chunk_size, progress=progress,
                                         reserve=config.max_new_tokens)
        for nxt, _active, _lp in self.decode_loop(logits, st, history, config):
            tok = int(nxt[0])
            if tok in stop_ids:
                break
            piece = text.push(tok)
            if piece:
                yield piece
            if text.stopped:
                return
        tail = text.flush()
        if tail:
            yield tail

    def chat(self, system: str | None = None, **kwargs: Any) -> Chat:
        """A multi-turn conversation that keeps its state between turns (see runtime/chat.py)."""
        from granite_onnx.runtime.chat import Chat

        return Chat(self, system=system, **kwargs)


class TokenPicker:
    """The next token of each row from logits [B, V]: argmax for plain greedy decoding (no copy, no
    softmax), else the seeded `Sampler` (repetition penalty, temperature, top-k/p, min-p)."""

    def __init__(self, config: GenerationConfig, sampler: Sampler | None = None) -> None:
        self.config = config
        self.fast = config.greedy and config.repetition_penalty == 1.0
        self.needs_history = config.repetition_penalty != 1.0
        self.sampler = sampler or Sampler(config)

    def __call__(self, logits: np.ndarray, history: Sequence[Sequence[int]] | None = None) -> np.ndarray:
        if self.fast:
            ids = logits.argmax(axis=-1)
            if not np.isfinite(logits[np.arange(ids.shape[0]), ids]).all():  # argmax returns a NaN's index
                self.sampler(logits)  # raises the sampler's explanation (NaN/inf logits)
            return ids
        return np.asarray(self.sampler(logits, history if self.needs_history else None), np.int64)

    def logprobs(self, logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return self.sampler.logprobs(logits, ids)


class TextStream:
    """Token ids → text pieces that are whole characters, cut at the first stop string."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = ()) -> None:
        self.decoder = tokenizer.stream_decoder()
        self.matcher = StopStringMatcher(stop_strings) if stop_strings else None

    @property
    def stopped(self) -> bool:
        return self.matcher is not None and self.matcher.stopped

    def push(self, token: int) -> str:
        piece = self.decoder.push(token)
        return self.matcher.push(piece) if self.matcher is not None else piece

    def flush(self) -> str:
        tail = self.decoder.flush()
        if self.matcher is not None:
            return self.matcher.push(tail) + self.matcher.flush()
        return tail


def _as_id(x: Any) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{x!r} ({type(x).__name__}) is not a token id")
    return int(x)


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, np.ndarray):
        return [prompts] if prompts.ndim == 1 else list(prompts)
    prompts = list(prompts)
    if not prompts:
        raise RequestError("no prompts given")
    if isinstance(prompts[0], (int, np.integer)):
        return [prompts]  # type: ignore[list-item]
    return prompts


def greedy_ids(model: Model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation ids (stops at EOS) — the validator's and CLI's plain path."""
    if max_new_tokens <= 0:
        raise GenerationConfigError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    res = model.generate([prompt_ids], GenerationConfig(max_new_tokens=max_new_tokens))
    return res[0].token_ids


__all__ = ["Model", "GenerationResult", "RequestError", "RuntimeError_", "TokenPicker", "TextStream",
           "greedy_ids", "Prompt", "Progress"]
