"""A conversation that keeps the model state between turns: turn N prefills only its new tokens.

A hybrid model's whole history is a fixed-size recurrent state plus a small K/V cache, so the chat keeps
that state (on the device) and, for each new user message, renders the transcript with the chat template,
checks that it extends what the state has already consumed, and prefills only the difference:

    state holds   [system + user₁ + assistant prompt][reply₁ tokens][end-of-text] ...
    turn 2 feeds  [end-of-text (sampled, not yet fed)] + tokens of "\\n<|start_of_role|>user…assistant<|end_of_role|>"

The reply's own tokens are never re-tokenized: the state holds exactly the ids the model produced, so a
turn's greedy reply equals a fresh run over `chat.tokens` (the test of this module). When the template
does not extend the consumed text (a template that trims replies, a stop string that cut one), the chat
prefills the whole transcript again — slower, never wrong.

    chat = model.chat(system="You are terse.")
    for piece in chat.stream("hi"): print(piece, end="")
    chat.save("conv.npz"); chat.load("conv.npz"); chat.reset()
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from granite_onnx.runtime.config import GenerationConfig
from granite_onnx.runtime.generate import Progress, RequestError, TextStream
from granite_onnx.runtime.state import Snapshot, SnapshotError

if TYPE_CHECKING:  # pragma: no cover
    from granite_onnx.runtime.generate import Model
    from granite_onnx.runtime.session import State

log = logging.getLogger(__name__)

CHAT_FORMAT = "granite-onnx-chat/1"


@dataclass
class ChatTurn:
    """One assistant reply and what it cost."""

    text: str
    token_ids: list[int]  # generated ids, end-of-text excluded
    finish_reason: str  # "eos" | "length" | "stop"
    prompt_tokens: int  # tokens prefilled for this turn (only the new ones)
    context_tokens: int  # tokens in the state when the reply started (history + this prompt)
    ttft_s: float  # from the call to the first token (template, encode, prefill, first sample)
    seconds: float  # the whole turn
    full_prefill: bool  # True if the transcript had to be prefilled anew

    @property
    def tokens_per_s(self) -> float:
        """Decode rate after the first token."""
        n = len(self.token_ids) + (self.finish_reason == "eos")
        return (n - 1) / (self.seconds - self.ttft_s) if n > 1 and self.seconds > self.ttft_s else 0.0


class Chat:
    def __init__(self, model: Model, *, system: str | None = None, config: GenerationConfig | None = None,
                 chunk_size: int | None = None, progress: Progress | None = None) -> None:
        if model.tokenizer is None:
            raise RequestError(f"{model.session.path} has no tokenizer.json; a chat needs one to render messages")
        if system is not None and not isinstance(system, str):
            raise RequestError(f"system must be a string, got {type(system).__name__}")
        self.model = model
        self.tokenizer = model.tokenizer
        self.system = system
        self.config = config or GenerationConfig(max_new_tokens=256)
        self.chunk_size = chunk_size
        self.progress = progress
        self.last: ChatTurn | None = None
        self.reset()

    # ----------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self._state: State | None = None
        self._logits: np.ndarray | None = None  # the last prefill's logits: the reply's first token
        self._fed: list[int] = []  # ids the state has consumed
        self._pending: list[int] = []  # ids sampled but not yet fed (a reply's last token)
        self._text = ""  # the text of fed + pending, as rendered / generated (never re-decoded)

    @property
    def tokens(self) -> list[int]:
        """Every token of the conversation so far: what the state consumed plus the last reply's last id."""
        return self._fed + self._pending

    def prime(self) -> None:
        """Prefill the messages so far (e.g. a long system prompt) now, so that a `snapshot` holds them."""
        if not self.messages:
            raise RequestError("nothing to prime: the chat has no messages")
        text = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=False)
        self._advance(text, full=self._state is None or not text.startswith(self._text))

    def snapshot(self) -> Snapshot:
        if self._state is None:
            raise RequestError("nothing to snapshot yet: send a message or prime() the chat first")
        extra = {"format": CHAT_FORMAT, "messages": self.messages, "pending": self._pending, "text": self._text,
                 "system": self.system}
        return self.model.snapshot(self._state, [self._fed], extra=extra)

    def restore(self, snap: Snapshot) -> None:
        """Continue the conversation held by `snap` (its messages, tokens and state)."""
        if snap.extra.get("format") != CHAT_FORMAT:
            raise SnapshotError("this state is not a chat's (no messages in it); use Model.generate(state=...)")
        if snap.batch != 1:
            raise SnapshotError(f"a chat state has one row, this one has {snap.batch}")
        state = self.model.restore(snap)
        self.system = snap.extra.get("system")
        self.messages = [dict(m) for m in snap.extra["messages"]]
        self._state, self._logits, self._fed = state, None, list(snap.tokens[0])
        self._pending = [int(t) for t in snap.extra.get("pending", [])]
        self._text = str(snap.extra.get("text", ""))

    def save(self, path: str | Path) -> Path:
        return self.snapshot().save(path)

    def load(self, path: str | Path) -> None:
        self.restore(Snapshot.load(path))

    # ----------------------------------------------------------------- turns
    def send(self, content: str, config: GenerationConfig | None = None) -> ChatTurn:
        """Add a user message and generate the whole reply."""
        for _ in self.stream(content, config):
            pass
        assert self.last is not None
        return self.last

    def stream(self, content: str, config: GenerationConfig | None = None) -> Iterator[str]:
        """Add a user message; yield the reply's text as it is decoded. `self.last` holds the turn after."""
        if not isinstance(content, str):
            raise RequestError(f"a message is a string, got {type(content).__name__}")
        config = (config or self.config).validate(self.model.cfg.vocab_size)
        return self._turn(content, config)

    def _advance(self, text: str, *, full: bool, reserve: int = 0) -> list[int]:
        """Make the state hold `text` (the rendered transcript so far); prefill only what it lacks.
        `reserve` tokens must still fit in the context after it (the reply)."""
        if full:
            base, new = 0, self.tokenizer.encode(text, add_special_tokens=False)
        else:
            base = len(self._fed)
            new = self._pending + self.tokenizer.encode(text[len(self._text):], add_special_tokens=False)
        if base + len(new) + reserve > self.model.context_length:
            raise RequestError(f"the conversation would have {base + len(new)} tokens plus {reserve} for the reply, "
                               f"more than the context length {self.model.context_length}; /reset it, start a "
                               "new chat or lower max_new_tokens")
        if full:
            if self._state is not None:
                log.info("the transcript no longer extends the chat's state; prefilling it anew")
            self.reset_state()
        if not new:
            return new
        try:
            logits, state = self.model.prefill([new], state=self._state, chunk_size=self.chunk_size,
                                               progress=self.progress, reserve=reserve)
        except Exception:
            self.reset_state()  # a half-prefilled state is unusable; the next turn prefills it all
            raise
        self._state, self._logits = state, logits
        self._fed += new
        self._pending = []
        self._text = text
        return new

    def reset_state(self) -> None:
        """Drop the device state (the messages stay): the next turn prefills the whole transcript."""
        self._state = None
        self._logits = None
        self._fed, self._pending, self._text = [], [], ""

    def _turn(self, content: str, config: GenerationConfig) -> Iterator[str]:
        t0 = time.perf_counter()
        messages = self.messages + [{"role": "user", "content": content}]
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        full = self._state is None or not rendered.startswith(self._text)
        new = self._advance(rendered, full=full, reserve=config.max_new_tokens)
        self.messages = messages
        assert self._state is not None and self._logits is not None
        stop_ids = frozenset(self.model.eos_token_ids) | frozenset(config.stop_token_ids)
        text = TextStream(self.tokenizer, config.stop_strings)
        generated: list[int] = []
        reply: list[str] = []
        reason, ttft = "length", None
        context = len(self._fed)
        history = [list(self._fed)]
        for nxt, _active, _lp in self.model.decode_loop(self._logits, self._state, history, config):
            tok = int(nxt[0])
            if ttft is None:
                ttft = time.perf_counter() - t0
            generated.append(tok)
            if tok in stop_ids:
                reason = "eos"
                break
            piece = text.push(tok)
            if piece:
                reply.append(piece)
                yield piece
            if text.stopped:
                reason = "stop"
                break
        if reason != "stop":
            tail = text.flush()
            if tail:
                reply.append(tail)
                yield tail
        # the state holds every generated id but the last (decode_loop feeds a token only to go on)
        self._fed += generated[:-1]
        self._pending = generated[-1:]
        produced = self.tokenizer.decode(generated)
        self._text += produced
        content_ids = generated[:-1] if reason == "eos" else generated
        self.messages.append({"role": "assistant", "content": self.tokenizer.decode(content_ids)})
        total = time.perf_counter() - t0
        self.last = ChatTurn("".join(reply), content_ids, reason, len(new), context, ttft or total, total, full)

    def __repr__(self) -> str:
        return f"Chat({len(self.messages)} messages, {len(self.tokens)} tokens)"

