"""Shared K/V: past and present are one capacity buffer that GroupQueryAttention appends to in place.

Every result must equal the growing layout (fresh past+T buffers each step) on the same fused folder —
exactly, since both run the same kernels on the same values — across chunked prefill with left padding,
decoding past the capacity (the buffers are regrown), snapshots and batches; and a decode step must
allocate no K/V-sized buffer.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from granite_onnx.runtime import GenerationConfig, Model
from granite_onnx.runtime.session import KV_ALIGN, RuntimeError_


@pytest.fixture(scope="module")
def shared(test_model_fused_dir: Path) -> Model:
    m = Model.load(test_model_fused_dir, threads=2)
    assert m.session.kv_shared, "the fused folder should declare kv_cache 'shared'"
    return m


@pytest.fixture(scope="module")
def grow(test_model_fused_dir: Path) -> Model:
    m = Model.load(test_model_fused_dir, threads=2, kv_cache="grow")
    assert not m.session.kv_shared
    return m


def _prompts(m: Model, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(3, m.cfg.vocab_size, n))) for n in lengths]


def _decode(m: Model, prompts: list[list[int]], steps: int, chunk: int | None, reserve: int) -> tuple[list, list]:
    logits, st = m.prefill(prompts, chunk_size=chunk, reserve=reserve)
    out_logits, ids = [logits], []
    nxt = logits.argmax(-1)
    for _ in range(steps):
        ids.append(nxt.copy())
        lg, st = m.decode_step(nxt, st)
        out_logits.append(np.array(lg, copy=True))
        nxt = lg.argmax(-1)
    return out_logits, ids


def test_folder_declares_its_kv_layout(test_model_fused_dir: Path, test_model_last_dir: Path) -> None:
    assert json.loads((test_model_fused_dir / "granite_config.json").read_text())["kv_cache"] == "shared"
    assert json.loads((test_model_last_dir / "granite_config.json").read_text())["kv_cache"] == "grow"
    with pytest.raises(RuntimeError_, match="cannot share past and present K/V"):
        Model.load(test_model_last_dir, kv_cache="shared")
    with pytest.raises(RuntimeError_, match="unknown kv_cache"):
        Model.load(test_model_fused_dir, kv_cache="ring")


@pytest.mark.parametrize("chunk,reserve", [(None, 40), (5, 0), (1, 3)])
def test_shared_equals_growing(shared: Model, grow: Model, chunk: int | None, reserve: int) -> None:
    """Mixed lengths (left padding), chunked prefill, and decoding past the first capacity (reserve 0:
    the buffers are regrown on the way)."""
    prompts = _prompts(shared, [23, 9, 17])
    steps = 2 * KV_ALIGN  # crosses at least one capacity boundary when nothing was reserved
    a_logits, a_ids = _decode(shared, prompts, steps, chunk, reserve)
    b_logits, b_ids = _decode(grow, prompts, steps, chunk, reserve)
    diff = max(float(np.abs(x - y).max()) for x, y in zip(a_logits, b_logits))
    print(f"chunk {chunk}, reserve {reserve}: max |Δlogits| shared vs grow over {steps} steps = {diff:.2e}")
    assert all((x == y).all() for x, y in zip(a_ids, b_ids))
    assert diff <= 1e-5


def test_capacity_grows_and_snapshots_hold_only_used_columns(shared: Model) -> None:
    prompt = _prompts(shared, [30])[0]
    logits, st = shared.prefill([prompt])
    assert st.kv_cap == KV_ALIGN and st.past_len == 30
    nxt = logits.argmax(-1)
    for _ in range(KV_ALIGN):  # 30 + 64 columns > 64: regrown once (×1.5, rounded)
        lg, st = shared.decode_step(nxt, st)
        nxt = lg.argmax(-1)
    assert st.kv_cap == 2 * KV_ALIGN and st.past_len == 30 + KV_ALIGN
    assert shared.session.kv_nbytes(st) == sum(
        int(np.prod(s.concrete_shape(1, st.kv_cap))) * 4 for s in shared.session.kv_specs)
    snap = shared.snapshot(st, logits=lg)
    for name in snap.kv_names:
        assert snap.arrays[name].shape[2] == st.past_len
    # restore + continue == continue without the round trip
    twin = shared.restore(snap)
    assert twin.kv_cap is not None and twin.kv_cap >= twin.past_len
    a, _ = shared.decode_step(nxt, st)
    a = np.array(a, copy=True)
    b, _ = shared.decode_step(nxt, twin)
    assert np.array_equal(a, b)


def test_generate_reserves_once_and_matches_growing(shared: Model, grow: Model) -> None:
    prompts = _prompts(shared, [12, 5], seed=3)
    cfg = GenerationConfig(max_new_tokens=80)
    a, b = shared.generate(prompts, cfg), grow.generate(prompts, cfg)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_decode_steps_allocate_no_kv_buffer(shared: Model, grow: Model) -> None:
    """numpy owns the CPU K/V buffers, so tracemalloc sees every K/V allocation: a shared-cache step makes
    none; a growing-cache step makes a new past+1 buffer per K/V tensor."""
    prompt = _prompts(shared, [400])[0]
    peaks = {}
    for name, m in (("shared", shared), ("grow", grow)):
        logits, st = m.prefill([prompt], reserve=16)
        nxt = logits.argmax(-1)
        lg, st = m.decode_step(nxt, st)  # first step: binding caches, logits buffer
        kv = m.session.kv_nbytes(st)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(8):
            lg, st = m.decode_step(lg.argmax(-1), st)
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        peaks[name] = (peak, kv)
        print(f"{name}: K/V {kv / 1024:.0f} KiB, peak allocation during 8 decode steps {peak / 1024:.1f} KiB")
    assert peaks["shared"][0] < 0.05 * peaks["shared"][1]
    assert peaks["grow"][0] >= 0.9 * peaks["grow"][1]  # the other layout really allocates: the check can fail


def test_continuing_a_state_past_its_capacity_equals_growing(shared: Model, grow: Model) -> None:
    """A chat's turns: each turn prefills new tokens onto the carried state (and reserves its reply), so the
    buffers are regrown between turns with the used columns moved over."""
    turns = _prompts(shared, [40, 50, 90, 7], seed=11)
    out = {}
    for name, m in (("shared", shared), ("grow", grow)):
        st, rows = None, []
        for t in turns:
            logits, st = m.prefill([t], state=st, reserve=5)
            rows.append(np.array(logits, copy=True))
        out[name] = (rows, st)
    st = out["shared"][1]
    assert st.past_len == sum(map(len, turns)) and st.kv_cap >= st.past_len + 5
    diff = max(float(np.abs(a - b).max()) for a, b in zip(out["shared"][0], out["grow"][0]))
    print(f"4 turns carried (capacity now {st.kv_cap}): max |Δlogits| shared vs grow {diff:.2e}")
    assert diff <= 1e-5


def test_optimize_declares_shared_kv(test_model_last_dir: Path, shared: Model, tmp_path: Path) -> None:
    """`granite-onnx optimize` (portable → fused) writes the layout too, and the result decodes like the
    folder exported fused."""
    from granite_onnx.export.optimize import optimize_folder

    out = tmp_path / "optimized"
    optimize_folder(test_model_last_dir, out)
    meta = json.loads((out / "granite_config.json").read_text())
    assert meta["graph"] == "fused" and meta["kv_cache"] == "shared" and meta["recurrent_state"] == "inplace"
    m = Model.load(out, threads=2)
    assert m.session.kv_shared and m.session.rec_inplace
    prompts = _prompts(m, [14, 6], seed=21)
    cfg = GenerationConfig(max_new_tokens=70)
    assert [r.token_ids for r in m.generate(prompts, cfg)] == [r.token_ids for r in shared.generate(prompts, cfg)]
