"""The exported folder runs unchanged in onnxruntime-genai and agrees with our runtime.

Token ids in, no tokenizer: `Generator.append_tokens(ids)`, greedy search. Besides the greedy ids, the
logits genai hands the search at every step are compared with our session's: with the tied random
embeddings of preset "test", greedy decoding repeats the last prompt token, so the ids alone would be a
weak check.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install "
                         "'granite-onnx[genai]'); the genai compatibility checks need it")

from granite_onnx.export import io  # noqa: E402
from granite_onnx.models.config import ATTENTION  # noqa: E402

PROMPT_LEN = 23
NEW_TOKENS = 12
ATOL = 1e-4


@pytest.fixture(params=["test_model_dir", "test_model_last_dir"], ids=["logits-all", "logits-last"])
def folder(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


def _prompt(vocab: int, eos: tuple[int, ...]) -> list[int]:
    rng = np.random.default_rng(3)
    ids = [int(i) for i in rng.integers(0, vocab, PROMPT_LEN)]
    return [i for i in ids if i not in eos] or [3]


def _genai(folder: Path, prompt: list[int], new_tokens: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy ids from onnxruntime-genai, and the last-position logits it saw before each pick."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    ids, logits = [], []
    while not gen.is_done():
        logits.append(np.asarray(gen.get_logits(), np.float32).reshape(-1)[-_vocab(folder):])
        gen.generate_next_token()
        ids.append(int(gen.get_next_tokens()[0]))
    return ids, logits


def _vocab(folder: Path) -> int:
    return int(json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"])


def test_genai_config_names_the_hybrid_state(test_model_dir: Path) -> None:
    from granite_onnx.runtime.session import read_folder_config

    cfg, _ = read_folder_config(test_model_dir)
    g = json.loads((test_model_dir / "genai_config.json").read_text())
    dec = g["model"]["decoder"]
    assert g["model"]["type"] == "granitemoehybrid"
    # genai 0.18 takes a layer for attention only when it is "full_attention"; anything else is recurrent.
    assert dec["layer_types"] == ["full_attention" if t == ATTENTION else "linear_attention"
                                  for t in cfg.layer_types]
    assert dec["inputs"] | dec["outputs"] == io.genai_io_names()["inputs"] | io.genai_io_names()["outputs"]


def test_genai_greedy_equals_our_runtime(folder: Path) -> None:
    from granite_onnx.runtime.config import GenerationConfig
    from granite_onnx.runtime.generate import Model

    ours = Model.load(folder)
    prompt = _prompt(ours.cfg.vocab_size, ours.eos_token_ids)
    res = ours.generate([prompt], GenerationConfig(max_new_tokens=NEW_TOKENS))[0]
    theirs, _ = _genai(folder, prompt, NEW_TOKENS)
    print("ours ", res.token_ids, res.finish_reason, "\ngenai", theirs)
    # genai keeps the EOS it stopped on; our runtime reports it as finish_reason="eos".
    expected = res.token_ids + ([theirs[len(res.token_ids)]] if res.finish_reason == "eos" else [])
    if res.finish_reason == "eos":
        assert theirs[-1] in ours.eos_token_ids
    assert theirs == expected


def test_genai_step_logits_equal_our_session(folder: Path) -> None:
    from granite_onnx.runtime.session import GraniteSession

    sess = GraniteSession(folder)
    prompt = _prompt(sess.cfg.vocab_size, sess.cfg.eos_token_ids)
    theirs_ids, theirs = _genai(folder, prompt, NEW_TOKENS)
    ids = np.asarray([prompt], np.int64)
    mask = np.ones_like(ids)
    lo, st = sess.step(ids, mask, sess.new_state(1))
    diffs = []
    for k, logits in enumerate(theirs):
        diffs.append(float(np.abs(lo[0, -1] - logits).max()))
        if k + 1 < len(theirs):
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
            lo, st = sess.step(np.asarray([[theirs_ids[k]]], np.int64), mask, st)
    print("max |Δlogits| per step, genai vs our session:", " ".join(f"{d:.1e}" for d in diffs))
    assert len(diffs) == len(theirs_ids) and max(diffs) <= ATOL
