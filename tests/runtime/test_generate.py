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


# ------------------------------------------------------------------ saved state and shared prefixes
def _logprobs_close(a: list[float] | None, b: list[float] | None) -> float:
    assert a is not None and b is not None and len(a) == len(b)
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def test_restore_snapshot_plus_suffix_equals_full_prompt(model: Model, tmp_path: Path) -> None:
    ids = _prompts(1, [30], model.cfg.vocab_size, seed=5)[0]
    cfg = GenerationConfig(max_new_tokens=10, logprobs=True)
    full = model.generate([ids], cfg)[0]
    snap = model.prefix(ids[:21])
    for s in (snap, type(snap).load(snap.save(tmp_path / "prefix.npz"))):
        got = model.generate([ids[21:]], cfg, state=s)[0]
        diff = _logprobs_close(got.logprobs, full.logprobs)
        print(f"restore + suffix vs full prompt: tokens equal {got.token_ids == full.token_ids}, logprob |Δ| {diff:.1e}")
        assert got.token_ids == full.token_ids and diff < 1e-4
    # the empty suffix continues from the snapshot's own logits
    assert model.generate([[]], cfg, state=model.prefix(ids))[0].token_ids == full.token_ids
    # the snapshot is unchanged by use: a second request from it gives the same answer
    assert model.generate([ids[21:]], cfg, state=snap)[0].token_ids == full.token_ids


def test_shared_prefix_for_a_batch_of_different_suffixes(model: Model) -> None:
    vocab = model.cfg.vocab_size
    prefix = _prompts(1, [17], vocab, seed=6)[0]
    suffixes = _prompts(3, [4, 9, 1], vocab, seed=7)
    cfg = GenerationConfig(max_new_tokens=8, logprobs=True)
    got = model.generate(suffixes, cfg, state=model.prefix(prefix))
    for s, g in zip(suffixes, got):
        ref = model.generate([prefix + s], cfg)[0]
        assert g.token_ids == ref.token_ids and _logprobs_close(g.logprobs, ref.logprobs) < 1e-4
    same = model.generate([suffixes[1]] * 2, cfg, state=model.prefix(prefix))  # one batched prefill
    assert same[0].token_ids == same[1].token_ids == got[1].token_ids


def test_continuing_a_state_with_uneven_rows_is_refused(model: Model) -> None:
    _, st = model.prefill([[5, 6, 7], [8, 9, 10]])
    with pytest.raises(RequestError, match="same number of new tokens"):
        model.prefill([[1], [2, 3]], state=st)


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.01}, r"top_p must be in \(0, 1\]"),
    ({"stop_strings": "END"}, "bare string"),
    ({"stop_strings": [3]}, "only strings"),
])
def test_bad_config_is_a_clear_error(kwargs: dict, match: str) -> None:
    from granite_onnx.runtime import GenerationConfigError

    with pytest.raises(GenerationConfigError, match=match):
        GenerationConfig(**kwargs)


def test_bad_requests_more(model: Model) -> None:
    with pytest.raises(RequestError, match="no tokenizer"):
        model.generate("text needs a tokenizer", GenerationConfig(max_new_tokens=2))
    with pytest.raises(RequestError, match="stop strings need a tokenizer"):
        model.generate([[1, 2]], GenerationConfig(max_new_tokens=2, stop_strings=("x",)))
    with pytest.raises(RequestError, match="must be ints"):
        model.generate([[1, "2"]], GenerationConfig(max_new_tokens=2))  # type: ignore[list-item]
    with pytest.raises(RequestError, match="GenerationConfig"):
        model.generate([[1, 2]], "greedy")  # type: ignore[arg-type]
    with pytest.raises(RequestError, match="Snapshot"):
        model.generate([[1, 2]], state={"not": "a snapshot"})  # type: ignore[arg-type]
    with pytest.raises(RequestError, match="context length"):
        model.generate([[1] * (model.context_length - 1)], GenerationConfig(max_new_tokens=2))


def test_unknown_provider_and_cuda_without_gpu(test_model_dir: Path) -> None:
    import onnxruntime as ort

    from granite_onnx.runtime import ModelLoadError

    with pytest.raises(ModelLoadError, match="unknown provider 'tpu'"):
        Model.load(test_model_dir, provider="tpu")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has CUDA: the no-GPU error cannot be provoked")
    with pytest.raises(ModelLoadError, match="no CUDA execution provider.*onnxruntime-gpu"):
        Model.load(test_model_dir, provider="cuda")


def test_snapshot_from_another_model_is_refused(model: Model, test_model_last_dir: Path) -> None:
    from granite_onnx.runtime import SnapshotError

    snap = model.prefix([5, 6, 7])
    snap.model = {**snap.model, "hidden_size": snap.model["hidden_size"] + 1}
    with pytest.raises(SnapshotError, match="another model"):
        model.restore(snap)
