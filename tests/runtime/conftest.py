"""Runtime fixtures: the tiny exported model with a trained byte-level BPE tokenizer beside it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

SPECIAL_TOKENS = ["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|pad|>"]
# Multi-byte characters that stay split across byte tokens: ✓ and ß never occur in the corpus.
CORPUS = [
    "héllo wörld 日本語 emoji 🙂 " * 3,
    "the quick brown fox jumps over the lazy dog. " * 3,
    "hello world, hello there! stop here END of story. user assistant system",
] * 20


def train_tokenizer(vocab_size: int = 400) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    return backend


def add_tokenizer(folder: Path) -> Path:
    """Put tokenizer.json + tokenizer_config.json (eos <|end_of_text|>, no chat template: the Granite
    default applies) into an exported model folder whose vocabulary is at least as large."""
    backend = train_tokenizer()
    backend.save(str(folder / "tokenizer.json"))  # type: ignore[attr-defined]
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>",
                                                              "bos_token": "<|end_of_text|>"}))
    return folder


@pytest.fixture(scope="session")
def chat_model_dir(test_model_last_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "test-chat"
    shutil.copytree(test_model_last_dir, out)
    return add_tokenizer(out)
