"""Text in, text out, without transformers: tokenizer, chat template, streaming text and stop strings.

- `Tokenizer` wraps a Hugging Face fast tokenizer (`tokenizers.Tokenizer`) loaded from a model folder's
  `tokenizer.json`, with the chat template and special tokens of `tokenizer_config.json` when present.
- `StreamDecoder` turns token ids, fed one at a time, into text pieces that never end in half a UTF-8
  character (byte-level BPE splits multi-byte characters across tokens).
- `StopStringMatcher` cuts the generated text right before the first stop string, also when the stop
  string spans several tokens, and tells how much text is safe to show before the match is known.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

__all__ = [
    "GRANITE_GENERATION_PROMPT",
    "GRANITE_ROLES",
    "GRANITE_TURN",
    "ChatTemplateError",
    "StopStringMatcher",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerNotFoundError",
    "render_granite_chat",
    "validate_messages",
]

logger = logging.getLogger(__name__)

# The Granite 4.0 chat format (shared/data/granite-4.0-family.json, key `_chat_format`), used when a
# folder ships no chat template of its own.
GRANITE_TURN = "<|start_of_role|>{role}<|end_of_role|>{content}<|end_of_text|>\n"
GRANITE_GENERATION_PROMPT = "<|start_of_role|>assistant<|end_of_role|>"
GRANITE_ROLES = ("system", "user", "assistant")

_REPLACEMENT_CHAR = "\ufffd"  # what a decoder emits for an incomplete UTF-8 sequence


class TokenizerNotFoundError(FileNotFoundError):
    """The model folder has no `tokenizer.json`."""


class ChatTemplateError(ValueError):
    """Messages do not fit the chat format, or the template failed (e.g. its `raise_exception`)."""


def _token_content(value: object) -> str | None:
    """A special token from tokenizer_config.json: a plain string or a serialised AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); re-copy it from the original checkpoint") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _template_from_config(value: object, path: Path) -> str | None:
    """`chat_template` is a string, or (older transformers) a list of {name, template} entries."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(
            f"{path}: chat_template is a list without a 'default' entry (names: {sorted(map(str, named))}); "
            "pass the template to use explicitly"
        )
    raise ValueError(f"{path}: chat_template must be a string, got {type(value).__name__}")


def validate_messages(messages: object, roles: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Check a chat: a list of dicts, each with a string `role` and a string `content`.

    With `roles`, every role must be one of them. Returns the messages as a list of plain dicts.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
        raise ChatTemplateError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}; "
            "wrap a single prompt as [{'role': 'user', 'content': text}]"
        )
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        for key in ("role", "content"):
            if key not in message:
                raise ChatTemplateError(f"messages[{i}] has no '{key}' (keys: {sorted(message)})")
            if not isinstance(message[key], str):
                raise ChatTemplateError(
                    f"messages[{i}]['{key}'] must be a string, got {type(message[key]).__name__}"
                )
        if roles is not None and message["role"] not in roles:
            raise ChatTemplateError(
                f"messages[{i}] has role {message['role']!r}; the Granite chat format knows {list(roles)} "
                "(send tool results as a 'user' turn wrapping <tool_response>...</tool_response>)"
            )
        checked.append(dict(message))
    if not checked:
        raise ChatTemplateError("messages is empty; a chat needs at least one message")
    return checked


def render_granite_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """The Granite 4.0 chat format: one `<|start_of_role|>role<|end_of_role|>content<|end_of_text|>\\n`
    per turn, then `<|start_of_role|>assistant<|end_of_role|>` when a reply is wanted."""
    checked = validate_messages(messages, roles=GRANITE_ROLES)
    text = "".join(GRANITE_TURN.format(role=m["role"], content=m["content"]) for m in checked)
    return text + GRANITE_GENERATION_PROMPT if add_generation_prompt else text


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &), which would change tool schemas in the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _chat_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in: sandboxed (templates from the Hub are
    untrusted code), trim_blocks/lstrip_blocks, loop controls, and its helper globals."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class Tokenizer:
    """A fast tokenizer plus what a decode loop needs from `tokenizer_config.json`.

    Build it with `Tokenizer.from_folder(path)`; the constructor takes the parts directly (for tests and
    for apps that assemble a tokenizer in code).
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        eos_token_ids: Iterable[int] = (),
        source: str = "<in memory>",
    ) -> None:
        self.backend = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})  # e.g. {"bos_token": "<|end_of_text|>", ...}
        self.source = source
        ids = list(dict.fromkeys(int(i) for i in eos_token_ids))
        eos = self.special_tokens.get("eos_token")
        if eos is not None:
            eos_id = tokenizer.token_to_id(eos)
            if eos_id is None:
                logger.warning("%s: eos_token %r is not in the vocabulary; ignoring it", source, eos)
            elif eos_id not in ids:
                ids.insert(0, eos_id)
        self.eos_token_ids: tuple[int, ...] = tuple(ids)
        self._template: jinja2.Template | None = None

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> Tokenizer:
        """Load `tokenizer.json` and, when present, `tokenizer_config.json`, `chat_template.jinja` and the
        eos ids of `generation_config.json` from a model folder (an HF checkpoint or an exported model)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            where = "does not exist" if not folder.exists() else "has no tokenizer.json"
            raise TokenizerNotFoundError(
                f"model folder {folder} {where}: text prompts need the Hugging Face tokenizer file. "
                "Copy tokenizer.json (and tokenizer_config.json) from the original checkpoint into it, "
                "or pass token ids directly with --ids"
            )
        backend = tokenizers.Tokenizer.from_file(str(path))

        config: dict[str, Any] = {}
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            config = _read_json(config_path)
        special_tokens = {
            key: content
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (content := _token_content(config.get(key))) is not None
        }

        # transformers >= 4.43 saves the template as chat_template.jinja, and it wins over the JSON field.
        template_path = folder / "chat_template.jinja"
        if template_path.is_file():
            chat_template: str | None = template_path.read_text(encoding="utf-8")
        else:
            chat_template = _template_from_config(config.get("chat_template"), config_path)

        eos_ids: list[int] = []
        generation_path = folder / "generation_config.json"
        if generation_path.is_file():
            eos = _read_json(generation_path).get("eos_token_id")
            eos_ids = [eos] if isinstance(eos, int) else [i for i in eos or () if isinstance(i, int)]

        logger.debug(
            "tokenizer from %s: vocab %d, chat template %s, eos ids %s",
            folder,
            backend.get_vocab_size(),
            "from the folder" if chat_template else "Granite default",
            eos_ids,
        )
        return cls(
            backend,
            chat_template=chat_template,
            special_tokens=special_tokens,
            eos_token_ids=eos_ids,
            source=str(folder),
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Pass add_special_tokens=False for text that already holds them (a
        rendered chat template), or the BOS would be doubled."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a string, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (any iterable of ints, numpy arrays included)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        template: str | None = None,
        **template_vars: Any,
    ) -> str:
        """Render a chat to prompt text.

        Uses `template` if given, else the folder's chat template (rendered like transformers does:
        sandboxed jinja2 with `raise_exception`, `tojson`, `strftime_now`, and the special tokens such
        as `bos_token`/`eos_token` as variables), else the Granite 4.0 default format. Extra keyword
        arguments (e.g. `tools=[...]`) are passed to the template.
        """
        source = template if template is not None else self.chat_template
        if source is None:
            if template_vars:
                raise ChatTemplateError(
                    f"{sorted(template_vars)} need a chat template, but {self.source} has none; "
                    "pass template= or use the model's tokenizer_config.json"
                )
            return render_granite_chat(messages, add_generation_prompt)
        checked = validate_messages(messages)
        compiled = self._compiled(source) if template is None else _chat_environment().from_string(source)
        try:
            return compiled.render(
                messages=checked,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
                **template_vars,
            )
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"chat template of {self.source} rejected the messages: {exc}") from exc

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat (the template already placed any special tokens)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def _compiled(self, source: str) -> jinja2.Template:
        if self._template is None:
            try:
                self._template = _chat_environment().from_string(source)
            except jinja2.exceptions.TemplateSyntaxError as exc:
                raise ChatTemplateError(f"chat template of {self.source} does not parse: {exc}") from exc
        return self._template

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Incremental detokenizer: feed token ids one at a time, get text pieces as they become whole.

    A byte-level BPE token can hold part of a UTF-8 character; decoding it alone yields U+FFFD. Like
    HF's TextStreamer and vLLM's incremental detokenizer, this decodes a small window (the tokens of the
    last emitted piece plus the new ones) and emits the new suffix only once the window's text no longer
    ends in U+FFFD. Window starts stay on character boundaries, so the pieces concatenated equal
    `decode(all ids)`; call `flush()` at the end to get anything still held back.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0  # window start: the first token of the last emitted piece
        self._read_offset = 0  # tokens before this are emitted
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset])

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became complete ('' while a character is unfinished)."""
        self.ids.append(int(token_id))
        text = self._decode(self.ids[self._prefix_offset :])
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT_CHAR):
            return ""
        piece = text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        return piece

    def flush(self) -> str:
        """Text still held back (an unfinished character at the end of generation decodes as U+FFFD)."""
        text = self._decode(self.ids[self._prefix_offset :])
        piece = text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset = len(self.ids)
        self._prefix_text = ""
        return piece


class StopStringMatcher:
    """Finds the earliest stop string in streamed text and says what is safe to show now.

    `push(piece)` returns the text that can be emitted: everything except a tail that could still grow
    into a stop string. Once a stop string is complete, `stopped` is True, the text before it is
    returned, and nothing after it ever is. `flush()` returns the held tail when generation ends for
    another reason. `text` is everything emitted so far (the final text, once stopped or flushed).
    """

    def __init__(self, stop_strings: Iterable[str]) -> None:
        if isinstance(stop_strings, str):
            raise TypeError(f"stop_strings must be a list of strings, got the bare string {stop_strings!r}")
        self.stop_strings = tuple(stop_strings)
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop_strings!r}")
        self._max_hold = max((len(s) for s in self.stop_strings), default=1) - 1
        self._pending = ""
        self._emitted: list[str] = []
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    @property
    def text(self) -> str:
        return "".join(self._emitted)

    def _emit(self, piece: str) -> str:
        if piece:
            self._emitted.append(piece)
        return piece

    def push(self, piece: str) -> str:
        """Add generated text; return the part that is safe to show now."""
        if self.stopped:
            return ""
        pending = self._pending + piece
        # Earliest start wins; a match can only start inside `pending`, since everything emitted before
        # was checked not to be the beginning of a stop string.
        best: tuple[int, str] | None = None
        for stop in self.stop_strings:
            at = pending.find(stop)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        if best is not None:
            self.stopped, self.matched, self._pending = True, best[1], ""
            return self._emit(pending[: best[0]])
        hold = self._held_tail(pending)
        self._pending = pending[len(pending) - hold :]
        return self._emit(pending[: len(pending) - hold])

    def _held_tail(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        for size in range(min(len(text), self._max_hold), 0, -1):
            tail = text[-size:]
            if any(stop.startswith(tail) for stop in self.stop_strings):
                return size
        return 0

    def flush(self) -> str:
        """End of generation without a stop string: release the held tail."""
        piece, self._pending = self._pending, ""
        return "" if self.stopped else self._emit(piece)
