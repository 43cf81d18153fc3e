"""Rung: continuous batching vs each request alone; threads on one model vs sequential runs."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from granite_onnx.runtime import Batcher, GenerationConfig, Model, RequestError
from granite_onnx.runtime.generate import GenerationResult


@pytest.fixture(scope="module", params=["portable", "fused"])
def model(request: pytest.FixtureRequest) -> Model:
    """Both K/V layouts: growing (portable graph) and one shared capacity buffer (fused graph)."""
    folder = request.getfixturevalue("test_model_last_dir" if request.param == "portable" else "test_model_fused_dir")
    m = Model.load(folder, threads=2)
    assert m.session.kv_shared == (request.param == "fused")
    return m


def _prompts(lens: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(3, vocab, size=n))) for n in lens]


def _same(got: GenerationResult, ref: GenerationResult) -> float:
    assert got.token_ids == ref.token_ids, (got.token_ids, ref.token_ids)
    assert got.finish_reason == ref.finish_reason
    assert got.logprobs is not None and ref.logprobs is not None
    return max((abs(a - b) for a, b in zip(got.logprobs, ref.logprobs)), default=0.0)


def test_requests_joining_at_different_steps_equal_alone(model: Model) -> None:
    prompts = _prompts([5, 19, 11, 30, 3], model.cfg.vocab_size, seed=5)
    # greedy and seeded sampling, and different lengths, so rows leave at different steps too
    configs = [GenerationConfig(max_new_tokens=n, logprobs=True, temperature=t, seed=s)
               for n, t, s in [(12, 0.0, None), (20, 0.8, 3), (6, 0.0, None), (15, 1.5, 9), (10, 0.0, None)]]
    alone = [model.generate([p], c)[0] for p, c in zip(prompts, configs)]

    b = Batcher(model, max_batch=3)  # the 4th and 5th requests wait for a free row
    reqs = [b.submit(prompts[0], configs[0])]
    b.step(), b.step()
    reqs.append(b.submit(prompts[1], configs[1]))
    b.step()
    reqs += [b.submit(prompts[2], configs[2]), b.submit(prompts[3], configs[3])]
    for _ in range(4):
        b.step()
    reqs.append(b.submit(prompts[4], configs[4]))
    b.run()
    assert b.idle and all(r.done for r in reqs)
    diffs = [_same(r.result(), a) for r, a in zip(reqs, alone)]
    print(f"batcher vs alone: {b.steps} steps, {b.rebuilds} batch rebuilds, worst logprob |Δ| {max(diffs):.1e}")
    assert max(diffs) < 1e-4


def test_bad_request_is_rejected_and_the_batch_goes_on(model: Model) -> None:
    vocab = model.cfg.vocab_size
    p = _prompts([9, 14], vocab, seed=8)
    cfg = GenerationConfig(max_new_tokens=8, logprobs=True)
    alone = [model.generate([x], cfg)[0] for x in p]
    b = Batcher(model, max_batch=4)
    a = b.submit(p[0], cfg)
    b.step()
    for bad, match in [([1, vocab + 3], "outside the vocabulary"), ([], "empty"),
                       ([1] * model.context_length, "context length")]:
        with pytest.raises(RequestError, match=match):
            b.submit(bad, cfg)
    with pytest.raises(ValueError, match="top_p"):
        b.submit(p[1], GenerationConfig(top_p=2.0))
    c = b.submit(p[1], cfg)
    b.step()
    # a request that fails inside its own prefill ends with "error"; the running rows are untouched
    boom = b.submit(p[1], cfg)
    real_start = model.start

    def failing_start(encoded, *args, **kwargs):  # type: ignore[no-untyped-def]
        if encoded == [boom.prompt_ids] and not boom.done:
            raise RuntimeError("injected prefill failure")
        return real_start(encoded, *args, **kwargs)

    model.start = failing_start  # type: ignore[method-assign]
    try:
        b.run()
    finally:
        del model.start
    assert boom.finish_reason == "error" and "injected" in str(boom.error)
    with pytest.raises(RequestError, match="failed"):
        boom.result()
    assert _same(a.result(), alone[0]) < 1e-4 and _same(c.result(), alone[1]) < 1e-4


def test_cancel_leaves_the_others(model: Model) -> None:
    p = _prompts([6, 8], model.cfg.vocab_size, seed=9)
    cfg = GenerationConfig(max_new_tokens=10, logprobs=True)
    b = Batcher(model)
    keep, drop = b.submit(p[0], cfg), b.submit(p[1], cfg)
    b.step(), b.step()
    b.cancel(drop)
    b.run()
    assert drop.finish_reason == "cancelled" and len(drop.token_ids) < 10
    assert _same(keep.result(), model.generate([p[0]], cfg)[0]) < 1e-4


def test_threads_on_one_model_equal_sequential(model: Model) -> None:
    prompts = _prompts([7, 23, 12, 31], model.cfg.vocab_size, seed=11)
    configs = [GenerationConfig(max_new_tokens=12, logprobs=True, temperature=t, seed=4)
               for t in (0.0, 1.0, 0.0, 1.2)]
    sequential = [model.generate([p], c)[0] for p, c in zip(prompts, configs)]
    results: list[list[GenerationResult]] = [[] for _ in prompts]
    errors: list[BaseException] = []
    start = threading.Barrier(len(prompts))

    def work(i: int) -> None:
        try:
            start.wait()
            for _ in range(3):  # several requests per thread, interleaved with the other threads'
                results[i].append(model.generate([prompts[i]], configs[i])[0])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    worst = max(_same(r, ref) for rs, ref in zip(results, sequential) for r in rs)
    print(f"4 threads × 3 requests vs sequential: worst logprob |Δ| {worst:.1e}")
    assert worst < 1e-4
