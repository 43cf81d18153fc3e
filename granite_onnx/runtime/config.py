"""Generation settings for the torch-free decode loop.

`GenerationConfig` is resolved and checked once, when it is built: the decode loop and the sampler read
plain, already-normalised fields (ints, floats, tuples) and never re-validate per token.

Field semantics follow Hugging Face `generate()` so that a setting means the same thing in both worlds:
temperature 0 is greedy decoding, `top_k` 0 and `top_p` 1.0 and `min_p` 0.0 switch the filters off,
`repetition_penalty` 1.0 leaves the logits unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable
from typing import Any

__all__ = ["GenerationConfig", "GenerationConfigError", "GenerationConfigTypeError"]


class GenerationConfigError(ValueError):
    """A generation setting is out of range or malformed; the message names the field and the fix."""


class GenerationConfigTypeError(GenerationConfigError, TypeError):
    """A generation setting has the wrong type (also a `TypeError`, so either can be caught)."""


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _as_int(name: str, value: object) -> int:
    # bool is an int subclass; `max_new_tokens=True` is a bug, not a request for one token.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise GenerationConfigTypeError(f"{name} must be an int, got {_describe(value)}")
    return int(value)


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise GenerationConfigTypeError(f"{name} must be a number, got {_describe(value)}")
    result = float(value)
    if not math.isfinite(result):
        raise GenerationConfigError(f"{name} must be a finite number, got {result}")
    return result


def _as_int_tuple(name: str, value: object) -> tuple[int, ...]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        # A single id is unambiguous (unlike a single stop string): accept it as a one-element tuple.
        value = (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise GenerationConfigTypeError(
            f"{name} must be a tuple or list of token ids (ints), got {_describe(value)}"
        )
    ids = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise GenerationConfigTypeError(
                f"{name} must contain only ints (token ids), got the element {_describe(item)}"
            )
        if item < 0:
            raise GenerationConfigError(f"{name} must contain non-negative token ids, got {int(item)}")
        ids.append(int(item))
    return tuple(ids)


def _as_str_tuple(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        # A bare string is iterable and would silently become one stop string per character.
        raise GenerationConfigTypeError(
            f"{name} must be a tuple or list of strings, got the bare string {value!r}; "
            f"write {name}=({value!r},) to stop on that one string"
        )
    if isinstance(value, bytes) or not isinstance(value, Iterable):
        raise GenerationConfigTypeError(f"{name} must be a tuple or list of strings, got {_describe(value)}")
    strings = []
    for item in value:
        if not isinstance(item, str):
            raise GenerationConfigTypeError(
                f"{name} must contain only strings, got the element {_describe(item)}; "
                "stop on token ids with stop_token_ids instead"
            )
        if not item:
            raise GenerationConfigError(f"{name} must not contain the empty string (it would match at once)")
        strings.append(item)
    return tuple(strings)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How to pick tokens and when to stop.

    Built once per request; every field is validated and normalised in `__post_init__` (lists become
    tuples, ints given for floats become floats), so a `GenerationConfig` that exists is a valid one.
    `validate(vocab_size)` adds the checks that need the model's vocabulary size.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # in (0, 1]; 1.0 = off
    min_p: float = 0.0  # in [0, 1); 0.0 = off
    repetition_penalty: float = 1.0  # > 0; 1.0 = off
    seed: int | None = None  # None = a fresh, non-reproducible random stream
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    logprobs: bool = False

    def __post_init__(self) -> None:
        # frozen dataclass: normalised values are written with object.__setattr__.
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("max_new_tokens", _as_int("max_new_tokens", self.max_new_tokens))
        if self.max_new_tokens <= 0:
            raise GenerationConfigError(
                f"max_new_tokens must be > 0, got {self.max_new_tokens}; ask for at least one new token"
            )

        put("temperature", _as_float("temperature", self.temperature))
        if self.temperature < 0:
            raise GenerationConfigError(
                f"temperature must be >= 0, got {self.temperature}; use 0 for greedy decoding"
            )

        put("top_k", _as_int("top_k", self.top_k))
        if self.top_k < 0:
            raise GenerationConfigError(f"top_k must be >= 0, got {self.top_k}; use 0 to switch top-k off")

        put("top_p", _as_float("top_p", self.top_p))
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationConfigError(
                f"top_p must be in (0, 1], got {self.top_p}; use 1.0 to switch nucleus sampling off"
            )

        put("min_p", _as_float("min_p", self.min_p))
        if not 0.0 <= self.min_p < 1.0:
            raise GenerationConfigError(
                f"min_p must be in [0, 1), got {self.min_p}; use 0.0 to switch min-p filtering off"
            )

        put("repetition_penalty", _as_float("repetition_penalty", self.repetition_penalty))
        if self.repetition_penalty <= 0:
            raise GenerationConfigError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}; "
                "use 1.0 for no penalty, > 1.0 to discourage repeats"
            )

        if self.seed is not None:
            put("seed", _as_int("seed", self.seed))
            if self.seed < 0:
                # numpy.random.default_rng rejects negative seeds; say so here rather than mid-generation.
                raise GenerationConfigError(f"seed must be >= 0 or None, got {self.seed}")

        put("stop_token_ids", _as_int_tuple("stop_token_ids", self.stop_token_ids))
        put("stop_strings", _as_str_tuple("stop_strings", self.stop_strings))

        if not isinstance(self.logprobs, (bool, numbers.Integral)):
            raise GenerationConfigTypeError(f"logprobs must be a bool, got {_describe(self.logprobs)}")
        put("logprobs", bool(self.logprobs))

    @property
    def greedy(self) -> bool:
        """True when every step takes the argmax (temperature 0, or top_k 1 which keeps one candidate)."""
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self, vocab_size: int | None = None) -> GenerationConfig:
        """Check the settings that depend on the model; return `self` so calls can be chained.

        With `vocab_size`, every stop token id must be a valid id of that vocabulary.
        """
        if vocab_size is not None:
            vocab_size = _as_int("vocab_size", vocab_size)
            if vocab_size <= 0:
                raise GenerationConfigError(f"vocab_size must be > 0, got {vocab_size}")
            bad = [i for i in self.stop_token_ids if i >= vocab_size]
            if bad:
                raise GenerationConfigError(
                    f"stop_token_ids {bad} are outside the model's vocabulary of {vocab_size} tokens "
                    f"(valid ids are 0..{vocab_size - 1}); check that they come from this model's tokenizer"
                )
        return self

    def replace(self, **changes: Any) -> GenerationConfig:
        """A copy with some fields changed; the copy is validated like a new config."""
        return dataclasses.replace(self, **changes)
