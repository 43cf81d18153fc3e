"""Tokenizer, streaming detokenizer, stop strings and chat templates on a real (small, trained) tokenizer.

The tokenizer is a byte-level BPE trained here with the `tokenizers` library, like Granite's: multi-byte
characters end up split across tokens, which is exactly what the streaming code must survive.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from granite_onnx.runtime.tokenizer import (
    ChatTemplateError,
    StopStringMatcher,
    StreamDecoder,
    Tokenizer,
    TokenizerNotFoundError,
)

SPECIAL_TOKENS = ["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|pad|>"]
# ✓ and ß never occur in the training text, so they stay raw bytes: one token per byte.
SAMPLE = "héllo wörld 日本語 emoji 🙂 ✓ straße, the lazy dog said STOP here. END"


def _train_backend() -> BackendTokenizer:
    corpus = [
        "héllo wörld 日本語 emoji 🙂 " * 3,
        "the quick brown fox jumps over the lazy dog. " * 3,
        "hello world, hello there! stop here END of story.",
    ] * 20
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    return backend


@pytest.fixture(scope="module")
def backend() -> BackendTokenizer:
    return _train_backend()


def _folder(root: Path, backend: BackendTokenizer, tokenizer_config: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    backend.save(str(root / "tokenizer.json"))
    if tokenizer_config is not None:
        (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tok(backend: BackendTokenizer, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_folder(_folder(tmp_path_factory.mktemp("plain"), backend))


def test_encode_decode_round_trip(tok: Tokenizer) -> None:
    ids = tok.encode(SAMPLE)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == SAMPLE
    assert tok.decode(tok.encode("<|start_of_role|>user")) == "<|start_of_role|>user"
    assert tok.encode("<|end_of_text|>") == [tok.token_to_id("<|end_of_text|>")]


def test_sample_really_splits_characters_across_tokens(tok: Tokenizer) -> None:
    # Guard for the streaming tests: if no token held a partial UTF-8 sequence they would prove nothing.
    partial = [i for i in tok.encode(SAMPLE) if "\ufffd" in tok.decode([i])]
    assert len(partial) >= 6, partial


def test_stream_decoder_pieces_are_whole_characters(tok: Tokenizer) -> None:
    ids = tok.encode(SAMPLE)
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == tok.decode(ids) == SAMPLE
    assert not any("\ufffd" in p for p in pieces), pieces
    # A split character is held back: some pushes return nothing, later ones return the whole char.
    assert "" in pieces[:-1]
    assert any(ch in p for p in pieces for ch in "日本語🙂✓")


def test_stream_decoder_skips_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<|start_of_role|>assistant<|end_of_role|>日本 ✓<|end_of_text|>")
    stream = tok.stream_decoder(skip_special_tokens=True)
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    assert text == tok.decode(ids, skip_special_tokens=True) == "assistant日本 ✓"


def test_stream_decoder_flushes_an_unfinished_character(tok: Tokenizer) -> None:
    ids = tok.encode("ok ✓")[:-1]  # drop the last byte of the 3-byte ✓
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == "ok "
    assert stream.flush() == tok.decode(ids)[len("ok ") :]


def _run_matcher(pieces: list[str], stops: list[str]) -> tuple[StopStringMatcher, list[str]]:
    matcher = StopStringMatcher(stops)
    shown = []
    for piece in pieces:
        shown.append(matcher.push(piece))
        if matcher.stopped:
            break
    shown.append(matcher.flush())
    return matcher, shown


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
def test_stop_string_cut_for_any_chunking(chunk: int) -> None:
    text = "abc STOP def STOP"
    pieces = [text[i : i + chunk] for i in range(0, len(text), chunk)]
    matcher, shown = _run_matcher(pieces, ["STOP"])
    assert matcher.stopped and matcher.matched == "STOP"
    assert "".join(shown) == matcher.text == "abc "


def test_stop_string_earliest_match_wins_and_prefixes_are_held() -> None:
    matcher = StopStringMatcher(["</end>", "ST"])
    assert matcher.push("hello </e") == "hello "  # "</e" could become "</end>"
    assert matcher.push("nx S") == "</enx "  # "</enx" cannot; "S" still could become "ST"
    assert matcher.push("T and </end>") == ""
    assert matcher.stopped and matcher.matched == "ST"
    assert matcher.text == "hello </enx "
    assert matcher.push("more") == ""


def test_stop_string_not_found_releases_held_tail_on_flush() -> None:
    matcher, shown = _run_matcher(["no stop here, only S", "TO"], ["STOP"])
    assert not matcher.stopped
    assert shown[-1] == "STO"  # held until the end: it might have become "STOP"
    assert "".join(shown) == matcher.text == "no stop here, only STO"


def test_stop_strings_without_any_pass_text_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.push("abc") == "abc" and matcher.flush() == ""
    with pytest.raises(TypeError, match="bare string"):
        StopStringMatcher("STOP")


def test_stop_string_spanning_tokens_end_to_end(tok: Tokenizer) -> None:
    ids = tok.encode(SAMPLE)
    stop = "dog said"
    assert not any(stop in tok.decode([i]) for i in ids)  # the stop string spans several tokens
    stream, matcher = StreamDecoder(tok), StopStringMatcher([stop, "never"])
    shown = []
    for i in ids:
        shown.append(matcher.push(stream.push(i)))
        if matcher.stopped:
            break
    assert matcher.stopped
    assert "".join(shown) == SAMPLE[: SAMPLE.index(stop)]
    assert not any("\ufffd" in p for p in shown)


def test_default_granite_chat_format(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 🙂"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    expected = (
        "<|start_of_role|>system<|end_of_role|>Be brief.<|end_of_text|>\n"
        "<|start_of_role|>user<|end_of_role|>Hi 🙂<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|>Hello.<|end_of_text|>\n"
        "<|start_of_role|>user<|end_of_role|>Bye<|end_of_text|>\n"
    )
    assert tok.chat_template is None
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected
    prompt = tok.apply_chat_template(messages)
    assert prompt == expected + "<|start_of_role|>assistant<|end_of_role|>"
    ids = tok.encode_chat(messages)
    assert tok.decode(ids) == prompt
    assert ids[0] == tok.token_to_id("<|start_of_role|>")


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "list of"),
        ([], "empty"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"content": "x"}], r"messages\[0\] has no 'role'"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\['content'\] must be a string"),
        ([{"role": "tool", "content": "x"}], "role 'tool'"),
    ],
)
def test_bad_messages_are_clear_errors(tok: Tokenizer, messages: object, match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        tok.apply_chat_template(messages)  # type: ignore[arg-type]


CUSTOM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' and not loop.first %}{{ raise_exception('system must come first') }}{% endif %}"
    "[{{ m['role'] | upper }}] {{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)


def test_custom_template_from_tokenizer_config(backend: BackendTokenizer, tmp_path: Path) -> None:
    config = {
        "chat_template": CUSTOM_TEMPLATE,
        "bos_token": "<|pad|>",
        "eos_token": {"content": "<|end_of_text|>", "special": True},  # serialised AddedToken form
    }
    tok = Tokenizer.from_folder(_folder(tmp_path, backend, config))
    assert tok.chat_template == CUSTOM_TEMPLATE
    assert tok.eos_token_ids == (tok.token_to_id("<|end_of_text|>"),)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == (
        "<|pad|>[SYSTEM] S<|end_of_text|>\n[USER] hi<|end_of_text|>\n[ASSISTANT] "
    )
    with pytest.raises(ChatTemplateError, match="system must come first"):
        tok.apply_chat_template(messages[::-1])
    # An explicit template wins over the folder's.
    assert tok.apply_chat_template(messages, template="{{ messages | length }}") == "2"


def test_chat_template_jinja_file_and_generation_config(backend: BackendTokenizer, tmp_path: Path) -> None:
    folder = _folder(tmp_path, backend, {"chat_template": "from json"})
    (folder / "chat_template.jinja").write_text("from file {{ messages[0]['content'] }}", encoding="utf-8")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}), encoding="utf-8")
    tok = Tokenizer.from_folder(folder)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "from file x"
    assert tok.eos_token_ids == (5, 7)


def test_template_cannot_escape_the_sandbox(tok: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="unsafe"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], template="{{ messages.__class__.__mro__ }}")


def test_missing_tokenizer_json_names_folder_and_ids_option(tmp_path: Path) -> None:
    with pytest.raises(TokenizerNotFoundError, match="--ids") as info:
        Tokenizer.from_folder(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_folder(tmp_path / "missing")
