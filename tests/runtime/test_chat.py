"""Rung: a multi-turn chat with carried state vs re-running the whole transcript; chat state on disk;
streaming text with multi-byte characters split across tokens; the `granite-onnx chat` terminal loop.

The model is the tiny 'test' preset with a byte-level BPE tokenizer trained in conftest.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from granite_onnx.runtime import Chat, GenerationConfig, Model, RequestError, SnapshotError
from granite_onnx.runtime import generate as generate_mod


@pytest.fixture(scope="module")
def model(chat_model_dir: Path) -> Model:
    return Model.load(chat_model_dir, threads=2)


def _prompt_of(chat: Chat) -> list[int]:
    """The tokens the last reply was generated after (its context)."""
    t = chat.last
    assert t is not None
    return chat.tokens[: t.context_tokens]


def test_multi_turn_equals_rerunning_the_transcript(model: Model) -> None:
    cfg = GenerationConfig(max_new_tokens=9, logprobs=True)
    sampled = GenerationConfig(max_new_tokens=9, temperature=5.0, seed=2)  # varied tokens, as a real reply
    chat = model.chat(system="You are terse.", config=cfg)
    for i, (msg, c) in enumerate([("hello there", cfg), ("日本語 🙂 please", sampled), ("the lazy dog", cfg)]):
        turn = chat.send(msg, c)
        ref = model.generate([_prompt_of(chat)], c)[0]
        print(f"turn {i + 1}: prefilled {turn.prompt_tokens} of {turn.context_tokens} tokens; "
              f"equal to the re-run transcript: {turn.token_ids == ref.token_ids}")
        assert turn.token_ids == ref.token_ids and turn.finish_reason == ref.finish_reason
        assert turn.full_prefill == (i == 0)  # later turns prefill only their new tokens
        assert turn.prompt_tokens < turn.context_tokens or i == 0
    # the state holds exactly the transcript: rendering the messages gives the decoded tokens
    rendered = model.tokenizer.apply_chat_template(chat.messages, add_generation_prompt=False)  # type: ignore[union-attr]
    assert rendered.startswith(model.decode(chat.tokens))  # type: ignore[arg-type]


def test_save_load_reset(model: Model, tmp_path: Path) -> None:
    cfg = GenerationConfig(max_new_tokens=6)
    a = model.chat(config=cfg)
    a.send("hello")
    a.save(tmp_path / "conv.npz")
    first = a.send("world")
    b = model.chat(config=cfg)
    b.load(tmp_path / "conv.npz")  # continues where `a` was when saved
    assert b.send("world").token_ids == first.token_ids and b.messages == a.messages
    b.reset()
    assert b.messages == [] and b.tokens == []
    with pytest.raises(RequestError, match="nothing to snapshot"):
        b.snapshot()
    with pytest.raises(SnapshotError, match="not a chat"):
        b.restore(model.prefix("hello"))


def test_primed_system_prompt_is_shared(model: Model) -> None:
    cfg = GenerationConfig(max_new_tokens=5)
    base = model.chat(system="the quick brown fox " * 4, config=cfg)
    base.prime()
    snap = base.snapshot()
    replies = []
    for msg in ("hello", "stop here"):
        c = model.chat(config=cfg)
        c.restore(snap)
        turn = c.send(msg)
        assert not turn.full_prefill and turn.prompt_tokens < turn.context_tokens
        fresh = model.chat(system="the quick brown fox " * 4, config=cfg).send(msg)
        assert turn.token_ids == fresh.token_ids
        replies.append(turn.token_ids)


SCRIPT = "✓ straße 日本語 🙂 END"


class _Scripted:
    """Stands in for TokenPicker: returns the ids of SCRIPT one by one (the model still runs every step)."""

    ids: list[int] = []

    def __init__(self, config: GenerationConfig) -> None:
        self.i = 0
        self.needs_history = False

    def __call__(self, logits: np.ndarray, history: object = None) -> np.ndarray:
        tok = self.ids[min(self.i, len(self.ids) - 1)]
        self.i += 1
        return np.full(logits.shape[0], tok, np.int64)


@pytest.fixture()
def scripted(model: Model, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    assert model.tokenizer is not None
    ids = model.tokenizer.encode(SCRIPT)
    split = [i for i in ids if "\ufffd" in model.tokenizer.decode([i])]
    assert len(split) >= 4, "the script must put multi-byte characters across token boundaries"
    _Scripted.ids = ids
    monkeypatch.setattr(generate_mod, "TokenPicker", _Scripted)
    yield ids


def test_stream_concatenates_to_the_text_with_split_characters(model: Model, scripted: list[int]) -> None:
    cfg = GenerationConfig(max_new_tokens=len(scripted))
    pieces = list(model.stream("hello", cfg))
    print("pieces", pieces)
    assert "".join(pieces) == SCRIPT == model.generate("hello", cfg)[0].text
    assert all("\ufffd" not in p for p in pieces)
    cut = list(model.stream("hello", cfg.replace(stop_strings=("語 🙂",))))
    assert "".join(cut) == "✓ straße 日本" == model.generate("hello", cfg.replace(stop_strings=("語 🙂",)))[0].text
    chat = model.chat(config=cfg)
    assert "".join(chat.stream("hi")) == SCRIPT == chat.last.text  # type: ignore[union-attr]


def test_stream_of_a_real_model_concatenates_to_generate(model: Model) -> None:
    cfg = GenerationConfig(max_new_tokens=40, temperature=5.0, seed=3)  # random bytes, many U+FFFD
    assert "".join(model.stream("hello 日本", cfg)) == model.generate("hello 日本", cfg)[0].text


def test_chat_bad_input(model: Model, test_model_last_dir: Path) -> None:
    with pytest.raises(RequestError, match="no tokenizer"):
        Chat(Model.load(test_model_last_dir))
    chat = model.chat(config=GenerationConfig(max_new_tokens=4))
    with pytest.raises(RequestError, match="a message is a string"):
        chat.stream(42)  # type: ignore[arg-type]
    with pytest.raises(RequestError, match="context length"):
        chat.send("✓" * 2000)  # 3 byte-tokens each: 6000 tokens
    assert chat.send("hello").token_ids  # the refused turn left the chat usable


def test_cli_chat_loop(chat_model_dir: Path, tmp_path: Path) -> None:
    state = tmp_path / "conv.npz"
    lines = ["hello there", f"/save {state}", "/reset", f"/load {state}", "another one", "/load nowhere.npz",
             "/bogus", "/exit", "never read"]
    r = subprocess.run([sys.executable, "-m", "granite_onnx.cli", "chat", str(chat_model_dir), "--max-new-tokens", "5",
                        "--system", "Be brief."], input="\n".join(lines) + "\n", capture_output=True, text=True,
                       timeout=300)
    print(r.stderr)
    assert r.returncode == 0, r.stderr
    assert state.exists()
    stats = [s for s in r.stderr.splitlines() if "tok/s" in s and "first token" in s]
    assert len(stats) == 2  # two messages answered; "never read" came after /exit
    assert "[conversation reset]" in r.stderr and "loaded 3 messages" in r.stderr
    assert "error: no state file" in r.stderr and "unknown command /bogus" in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stdout.splitlines()) == 2  # one line of reply per message
