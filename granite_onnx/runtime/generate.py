"""Generation over a GraniteSession: prefill (chunked), decode loop, sampling, streaming.

    prefill(ids [B, L] left-padded, mask [B, L])  → last logits [B, V], state   (chunks of `chunk_size`)
    decode_step(next ids [B], state)             → logits [B, V], state
    generate(prompts, config)                     → one GenerationResult per prompt
    stream(prompt, config)                        → text pieces as they are decoded

Imports: numpy, onnxruntime, tokenizers (through runtime.tokenizer) — never torch.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from granite_onnx.runtime.config import GenerationConfig, GenerationConfigError
from granite_onnx.runtime.sampling import Sampler
from granite_onnx.runtime.session import GraniteSession, RuntimeError_, State
from granite_onnx.runtime.tokenizer import StopStringMatcher, Tokenizer, TokenizerNotFoundError

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]


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
        self._lock = threading.Lock()  # only guards lazy init; runs are concurrent (ORT sessions are thread-safe)

    @classmethod
    def load(cls, path: str | Path, provider: str = "cpu", threads: int | None = None,
             optimization: str = "all") -> "Model":
        sess = GraniteSession(path, provider=provider, threads=threads, optimization=optimization)
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

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("the prompt is empty; give some text or token ids")
            if self.tokenizer is None:
                raise RequestError(f"{self.session.path} has no tokenizer.json, so text prompts cannot be encoded; "
                                   "pass token ids instead (--ids 1,2,3)")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise RequestError("the prompt is empty; give some text or token ids")
        bad = [i for i in ids if not 0 <= i < self.cfg.vocab_size]
        if bad:
            raise RequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.cfg.vocab_size}); "
                               "check the ids or the tokenizer")
        return ids

    def decode(self, ids: Sequence[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(list(ids))

    # ---------------------------------------------------------------- prefill
    def prefill(self, batch: list[list[int]], *, state: State | None = None, mask: np.ndarray | None = None,
                chunk_size: int | None = None, progress: Callable[[int, int], None] | None = None,
                ) -> tuple[np.ndarray, State, np.ndarray]:
        """Left-pad `batch`, run it in chunks (carrying state); return last logits [B, V], state, full mask."""
        b = len(batch)
        length = max(len(x) for x in batch)
        ids = np.zeros((b, length), np.int64)
        new_mask = np.zeros((b, length), np.int64)
        for r, x in enumerate(batch):
            ids[r, length - len(x):] = x
            new_mask[r, length - len(x):] = 1
        st = state if state is not None else self.session.new_state(b)
        full_mask = new_mask if mask is None else np.concatenate([mask, new_mask], axis=1)
        step = chunk_size or length
        if step <= 0:
            raise RequestError(f"chunk_size must be ≥ 1, got {chunk_size}")
        done = 0
        logits = None
        base = full_mask.shape[1] - length
        while done < length:
            end = min(length, done + step)
            logits, st = self.session.step(ids[:, done:end], full_mask[:, : base + end], st)
            done = end
            if progress is not None:
                progress(done, length)
        assert logits is not None
        return logits[:, -1, :], st, full_mask

    def decode_step(self, next_ids: np.ndarray, state: State, mask: np.ndarray) -> tuple[np.ndarray, State, np.ndarray]:
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
        logits, state = self.session.step(next_ids.reshape(-1, 1), mask, state)
        return logits[:, -1, :], state, mask

    # --------------------------------------------------------------- generate
    def _check(self, ids: list[int], config: GenerationConfig) -> None:
        if len(ids) + config.max_new_tokens > self.context_length:
            raise RequestError(f"the prompt has {len(ids)} tokens and max_new_tokens={config.max_new_tokens}, "
                               f"more than the context length {self.context_length}; shorten the prompt or "
                               "lower max_new_tokens")

    def iter_tokens(self, prompts: Sequence[Prompt], config: GenerationConfig | None = None, *,
                    chunk_size: int | None = None, state: State | None = None, mask: np.ndarray | None = None,
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """Yield (token ids [B], still-active [B] before this token, logprobs [B] | None) per decode step."""
        config = (config or GenerationConfig()).validate(self.cfg.vocab_size)
        encoded = [self.encode(p) for p in prompts]
        for ids in encoded:
            self._check(ids, config)
        sampler = Sampler(config)
        logits, st, mask = self.prefill(encoded, state=state, mask=mask, chunk_size=chunk_size)
        history = [list(x) for x in encoded]
        active = np.ones(len(encoded), bool)
        stop_ids = set(self.eos_token_ids) | set(config.stop_token_ids)
        for step in range(config.max_new_tokens):
            nxt = np.asarray(sampler(logits, history if config.repetition_penalty != 1.0 else None), np.int64)
            lp = sampler.logprobs(logits, nxt) if config.logprobs else None
            yield nxt, active.copy(), lp
            for r in range(len(history)):
                if active[r]:
                    history[r].append(int(nxt[r]))
            active &= ~np.isin(nxt, list(stop_ids)) if stop_ids else active
            if not active.any() or step == config.max_new_tokens - 1:
                break
            logits, st, mask = self.decode_step(nxt, st, mask)

    def generate(self, prompts: Prompt | Sequence[Prompt], config: GenerationConfig | None = None, *,
                 chunk_size: int | None = None) -> list[GenerationResult]:
        """Generate for one prompt or a batch (mixed lengths are left-padded into one batch)."""
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))
        batch: list[Prompt] = [prompts] if single else list(prompts)  # type: ignore[list-item]
        if not batch:
            raise RequestError("no prompts given")
        config = (config or GenerationConfig()).validate(self.cfg.vocab_size)
        stop_ids = set(self.eos_token_ids) | set(config.stop_token_ids)
        prompt_lens = [len(self.encode(p)) for p in batch]
        out: list[list[int]] = [[] for _ in batch]
        lps: list[list[float]] = [[] for _ in batch]
        reasons = ["length"] * len(batch)
        matchers = [StopStringMatcher(config.stop_strings) if config.stop_strings else None for _ in batch]
        decoders = [self.tokenizer.stream_decoder() if (self.tokenizer and config.stop_strings) else None
                    for _ in batch]
        live = np.ones(len(batch), bool)
        for nxt, active, lp in self.iter_tokens(batch, config, chunk_size=chunk_size):
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
            results.append(GenerationResult(out[r], text, reasons[r], prompt_lens[r],
                                            lps[r] if config.logprobs else None))
        return results

    def stream(self, prompt: Prompt, config: GenerationConfig | None = None, *,
               chunk_size: int | None = None) -> Iterator[str]:
        """Yield text pieces as tokens are decoded; never a broken UTF-8 character; honours stop strings."""
        if self.tokenizer is None:
            raise RequestError(f"{self.session.path} has no tokenizer.json; streaming text needs one")
        config = (config or GenerationConfig()).validate(self.cfg.vocab_size)
        stop_ids = set(self.eos_token_ids) | set(config.stop_token_ids)
        dec = self.tokenizer.stream_decoder()
        matcher = StopStringMatcher(config.stop_strings) if config.stop_strings else None
        for nxt, _active, _lp in self.iter_tokens([prompt], config, chunk_size=chunk_size):
            tok = int(nxt[0])
            if tok in stop_ids:
                break
            piece = dec.push(tok)
            if matcher is not None:
                piece = matcher.push(piece)
                if piece:
                    yield piece
                if matcher.stopped:
                    return
            elif piece:
                yield piece
        tail = dec.flush()
        if matcher is not None:
            tail = matcher.push(tail) + matcher.flush()
        if tail:
            yield tail


def greedy_ids(model: Model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation ids (stops at EOS) — the validator's and CLI's plain path."""
    if max_new_tokens <= 0:
        raise GenerationConfigError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    res = model.generate([prompt_ids], GenerationConfig(max_new_tokens=max_new_tokens))
    return res[0].token_ids


__all__ = ["Model", "GenerationResult", "RequestError", "RuntimeError_", "greedy_ids"]
