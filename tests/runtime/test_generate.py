"""Runtime rungs: decode loop vs one full forward; batched vs alone; chunked prefill vs one-shot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from granite_onnx.runtime import GenerationConfig, Model
from granite_onnx.runtime.generate import RequestError


@pytest.fixture(scope="module")
def model(test_model_dir: Path) -> Model:
    return Model.load(test_model_dir, threads=2)


def _prompts(n: int, lens: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(3, vocab, size=L))) for L in lens][:n]


def test_teacher_forced_decode_equals_full_forward(model: Model) -> None:
    ids = _prompts(1, [40], model.cfg.vocab_size)[0]
    st = model.session.new_state(1)
    full, _ = model.session.step(np.array([ids]), np.ones((1, 40), np.int64), st)
    logits, st = model.prefill([ids[:24]])
    got = [logits]
    for t in ids[24:-1]:
        logits, st = model.decode_step(np.array([t]), st)
        got.append(logits.copy())  # decode_step returns a view of the reused logits buffer
    got_a = np.stack(got, axis=1)[0]
    ref = full[0, 23:-1]
    diff = float(np.abs(got_a - ref).max())
    print(f"teacher-forced logits vs full forward: max |Δ| {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("chunk", [1, 7, 16, None])
def test_chunked_prefill_equals_one_shot(model: Model, chunk: int | None) -> None:
    ids = _prompts(1, [37], model.cfg.vocab_size, seed=1)[0]
    ref, st_ref = model.prefill([ids])
    got, st = model.prefill([ids], chunk_size=chunk)
    diff = float(np.abs(ref - got).max())
    sd = {k: float(np.abs(v - model.session.state_to_numpy(st)[k]).max())
          for k, v in model.session.state_to_numpy(st_ref).items()}
    print(f"chunk {chunk}: logits max |Δ| {diff:.2e}; worst state {max(sd.values()):.2e}")
    assert diff < 1e-4 and max(sd.values()) < 1e-4
    cfg = GenerationConfig(max_new_tokens=12)
    assert model.generate([ids], cfg, chunk_size=chunk)[0].token_ids == model.generate([ids], cfg)[0].token_ids


def test_batched_mixed_lengths_equal_alone(model: Model) -> None:
    prompts = _prompts(3, [5, 19, 11], model.cfg.vocab_size, seed=2)
    cfg = GenerationConfig(max_new_tokens=16)
    batched = [r.token_ids for r in model.generate(prompts, cfg)]
    alone = [model.generate([p], cfg)[0].token_ids for p in prompts]
    print("batched", batched, "alone", alone)
    assert batched == alone


def test_sampling_seeded_reproducible(model: Model) -> None:
    p = _prompts(1, [9], model.cfg.vocab_size, seed=3)[0]
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    a = model.generate(p, cfg)[0].token_ids
    b = model.generate(p, cfg)[0].token_ids
    assert a == b
    greedy = model.generate(p, GenerationConfig(max_new_tokens=10))[0].token_ids
    assert model.generate(p, GenerationConfig(max_new_tokens=10, top_k=1, temperature=0.7, seed=1))[0].token_ids == greedy


def test_logprobs(model: Model) -> None:
    p = _prompts(1, [6], model.cfg.vocab_size, seed=4)[0]
    r = model.generate(p, GenerationConfig(max_new_tokens=5, logprobs=True))[0]
    assert r.logprobs is not None and len(r.logprobs) == len(r.token_ids)
    assert all(lp <= 0 for lp in r.logprobs)


def test_bad_requests(model: Model) -> None:
    with pytest.raises(RequestError, match="empty"):
        model.generate([[]], GenerationConfig(max_new_tokens=2))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        model.generate([[1, model.cfg.vocab_size]], GenerationConfig(max_new_tokens=2))
    with pytest.raises(RequestError, match="context length"):
        model.generate([[1, 2]], GenerationConfig(max_new_tokens=model.context_length))
