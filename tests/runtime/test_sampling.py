"""Sampling filters on constructed distributions: exact kept sets, HF semantics, seeded draws."""

from __future__ import annotations

import numpy as np
import pytest

from granite_onnx.runtime.config import GenerationConfig
from granite_onnx.runtime.sampling import (
    Sampler,
    apply_repetition_penalty,
    draw,
    filter_min_p,
    filter_top_k,
    filter_top_p,
    log_softmax,
    process_logits,
    sample,
    softmax,
    token_logprobs,
)

PROBS = np.array([0.5, 0.3, 0.15, 0.05])


def _logits_of(probs: np.ndarray | list[float], shift: float = 3.0) -> np.ndarray:
    """Float32 logits [1, vocab] whose softmax is `probs` (shifted, since softmax ignores a constant)."""
    return (np.log(np.asarray(probs, dtype=np.float64)) + shift).astype(np.float32)[None, :]


def _kept(masked: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.isfinite(masked[0])).tolist())


def _random_logits(batch: int = 3, vocab: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 2, size=(batch, vocab)).astype(np.float32)


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.3, {0}), (0.5, {0}), (0.51, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2}), (0.95, {0, 1, 2}), (0.96, {0, 1, 2, 3})],
)
def test_top_p_keeps_smallest_set_reaching_p(top_p: float, kept: set[int]) -> None:
    assert _kept(filter_top_p(_logits_of(PROBS), top_p)) == kept


def test_top_p_is_order_independent_and_keeps_values() -> None:
    perm = np.array([2, 0, 3, 1])
    logits = _logits_of(PROBS[perm])
    out = filter_top_p(logits, 0.8)
    assert _kept(out) == {1, 3}  # where 0.5 and 0.3 went
    np.testing.assert_array_equal(out[0, [1, 3]], logits[0, [1, 3]])
    assert _kept(filter_top_p(logits, 1e-9)) == {1}  # always at least the top token
    np.testing.assert_array_equal(filter_top_p(logits, 1.0), logits)


@pytest.mark.parametrize(
    ("min_p", "kept"),
    [(0.0, {0, 1, 2, 3}), (0.09, {0, 1, 2, 3}), (0.11, {0, 1, 2}), (0.25, {0, 1, 2}), (0.35, {0, 1}), (0.61, {0})],
)
def test_min_p_keeps_tokens_above_fraction_of_top(min_p: float, kept: set[int]) -> None:
    # thresholds: 0.05 / 0.5 = 0.1, 0.15 / 0.5 = 0.3, 0.3 / 0.5 = 0.6
    assert _kept(filter_min_p(_logits_of(PROBS), min_p)) == kept


def test_top_k_keeps_the_k_largest() -> None:
    logits = _logits_of(PROBS[[3, 1, 0, 2]])
    assert _kept(filter_top_k(logits, 1)) == {2}
    assert _kept(filter_top_k(logits, 2)) == {1, 2}
    assert _kept(filter_top_k(logits, 3)) == {1, 2, 3}
    np.testing.assert_array_equal(filter_top_k(logits, 0), logits)
    np.testing.assert_array_equal(filter_top_k(logits, 10), logits)
    batch = _random_logits()
    out = filter_top_k(batch, 5)
    for row in range(batch.shape[0]):
        assert set(np.flatnonzero(np.isfinite(out[row]))) == set(np.argsort(-batch[row])[:5])


def test_filters_do_not_modify_their_input() -> None:
    logits = _random_logits()
    before = logits.copy()
    filter_top_k(logits, 3), filter_top_p(logits, 0.5), filter_min_p(logits, 0.2)
    apply_repetition_penalty(logits, [[1, 2], [3], []], 1.3)
    np.testing.assert_array_equal(logits, before)


def test_repetition_penalty_matches_hand_computation() -> None:
    logits = np.array([[2.0, -1.0, 0.5, -3.0, 4.0], [1.0, 1.0, -2.0, 0.0, 3.0]], dtype=np.float32)
    # Row 0 saw tokens 0, 1 (twice) and 3; row 1 saw 2 and 4. Each token is penalised once.
    out = apply_repetition_penalty(logits, [[0, 1, 1, 3], np.array([4, 2])], 2.0)
    expected = np.array([[1.0, -2.0, 0.5, -6.0, 4.0], [1.0, 1.0, -4.0, 0.0, 1.5]], dtype=np.float32)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(apply_repetition_penalty(logits, [[0], [1]], 1.0), logits)
    with pytest.raises(ValueError, match="rows"):
        apply_repetition_penalty(logits, [[0]], 2.0)
    with pytest.raises(ValueError, match=r"0\.\.4"):
        apply_repetition_penalty(logits, [[5], []], 2.0)


def test_greedy_is_argmax() -> None:
    logits = _random_logits(batch=4, vocab=200)
    argmax = logits.argmax(axis=-1)
    np.testing.assert_array_equal(sample(logits, GenerationConfig()), argmax)
    np.testing.assert_array_equal(sample(logits, GenerationConfig(temperature=0.0, top_p=0.3)), argmax)
    rng = np.random.default_rng(0)
    for _ in range(5):
        np.testing.assert_array_equal(sample(logits, GenerationConfig(temperature=1.7, top_k=1), rng), argmax)
    ids = sample(logits, GenerationConfig())
    assert ids.dtype == np.int64 and ids.shape == (4,)


def test_greedy_with_repetition_penalty_avoids_the_repeat() -> None:
    logits = np.array([[3.0, 2.0, -1.0]], dtype=np.float32)
    config = GenerationConfig(repetition_penalty=2.0)
    assert sample(logits, config, previous_ids_per_row=[[0]])[0] == 1  # 3/2 = 1.5 < 2
    with pytest.raises(ValueError, match="previous_ids_per_row"):
        sample(logits, config)


def test_seeded_sampling_is_reproducible() -> None:
    logits = _random_logits(batch=2, vocab=100)
    config = GenerationConfig(temperature=1.0, top_p=0.95, seed=1234)
    a, b = Sampler(config), Sampler(config)
    draws_a = np.stack([a(logits) for _ in range(50)])
    draws_b = np.stack([b(logits) for _ in range(50)])
    np.testing.assert_array_equal(draws_a, draws_b)
    other = Sampler(config.replace(seed=4321))
    assert not np.array_equal(draws_a, np.stack([other(logits) for _ in range(50)]))
    with pytest.raises(ValueError, match="Generator"):
        sample(logits, config)


def _chi_square(counts: np.ndarray, expected_probs: np.ndarray) -> float:
    expected = expected_probs * counts.sum()
    return float((((counts - expected) ** 2) / expected).sum())


@pytest.mark.parametrize(
    ("config", "support"),
    [
        (GenerationConfig(temperature=1.0), [0, 1, 2, 3, 4, 5]),
        (GenerationConfig(temperature=1.0, top_p=0.8), [0, 1, 2]),  # 0.4 + 0.25 + 0.15 = 0.8
        (GenerationConfig(temperature=1.0, top_k=4), [0, 1, 2, 3]),
        (GenerationConfig(temperature=1.0, min_p=0.3), [0, 1, 2]),  # 0.3 * 0.4 = 0.12
        (GenerationConfig(temperature=0.5, top_k=3), [0, 1, 2]),
    ],
)
def test_sampled_frequencies_follow_the_filtered_distribution(config: GenerationConfig, support: list[int]) -> None:
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    draws = 20_000
    logits = np.repeat(_logits_of(probs), draws, axis=0)  # one draw per row, all rows alike
    ids = sample(logits, config, np.random.default_rng(7))
    counts = np.bincount(ids, minlength=probs.size)
    assert set(np.flatnonzero(counts)) == set(support)

    target = probs[support] ** (1.0 / config.temperature)
    target /= target.sum()
    # 5 degrees of freedom at most; P(chi2_5 > 25) ~ 1e-4, so this only fails on a real bias.
    assert _chi_square(counts[support].astype(np.float64), target) < 25.0


@pytest.mark.parametrize(
    "config",
    [
        GenerationConfig(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.3),  # top-k path
        GenerationConfig(temperature=0.6, top_p=0.7),  # few kept: drawn over the compacted candidates
        GenerationConfig(temperature=0.9, min_p=0.01),  # few kept, min-p
        GenerationConfig(temperature=1.3),  # all kept: drawn over the whole vocabulary
    ],
)
def test_sample_equals_draw_from_processed_logits(config: GenerationConfig) -> None:
    # sample() works on the kept candidates only; it must pick what a full-width draw picks.
    logits = _random_logits(batch=3, vocab=1000, seed=5) * 3
    previous = [[1, 2, 3], [int(logits[1].argmax())], []]
    for seed in range(40):
        fast = sample(logits, config, np.random.default_rng(seed), previous)
        full = draw(process_logits(logits, config, previous), np.random.default_rng(seed))
        np.testing.assert_array_equal(fast, full)


def test_sample_never_draws_masked_tokens() -> None:
    logits = np.full((1, 1000), -np.inf, dtype=np.float32)
    logits[0, [17, 999]] = [0.0, -50.0]  # the last token is kept but very unlikely
    ids = sample(np.repeat(logits, 5000, axis=0), GenerationConfig(temperature=1.0), np.random.default_rng(0))
    assert set(ids.tolist()) <= {17, 999}


def test_process_logits_applies_temperature_before_filters() -> None:
    # At temperature 2 the distribution flattens, so top_p 0.8 needs more tokens than at temperature 1.
    logits = _logits_of(PROBS)
    assert _kept(process_logits(logits, GenerationConfig(temperature=1.0, top_p=0.8))) == {0, 1}
    assert _kept(process_logits(logits, GenerationConfig(temperature=2.0, top_p=0.8))) == {0, 1, 2}


def test_log_softmax_and_token_logprobs() -> None:
    logits = _random_logits(batch=2, vocab=30)
    logp = log_softmax(logits)
    np.testing.assert_allclose(np.exp(logp), softmax(logits), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.exp(logp).sum(axis=-1), 1.0, rtol=1e-5)
    ids = np.array([3, 29])
    np.testing.assert_allclose(token_logprobs(logits, ids), logp[[0, 1], ids], rtol=1e-5, atol=1e-6)
    big = np.array([[1000.0, 0.0, -1000.0]], dtype=np.float32)  # no overflow
    assert np.isfinite(log_softmax(big)[0, :2]).all() and log_softmax(big)[0, 0] == 0.0
    masked = filter_top_k(logits, 2)
    assert np.isclose(np.exp(log_softmax(masked)).sum(axis=-1), 1.0).all()
    assert Sampler(GenerationConfig(logprobs=True)).logprobs(logits, ids).shape == (2,)


def test_bad_logits_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"logits\[:, -1, :\]"):
        sample(np.zeros((1, 2, 5), np.float32), GenerationConfig())
    with pytest.raises(ValueError, match="NaN"):
        sample(np.full((1, 5), np.nan, np.float32), GenerationConfig())
