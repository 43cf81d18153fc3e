"""Host state: stacking rows of different lengths, selecting rows, save/load, the mask buffer (numpy only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from granite_onnx.runtime.state import MaskBuffer, Snapshot, SnapshotError, mask_of, stack

KV, REC = "past_key_values.1.key", "past_key_values.0.recurrent_state"


def _snap(lengths: list[int], past: int, seed: int) -> Snapshot:
    """Rows with K/V whose real columns hold row-specific values and whose padding holds junk."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    kv = rng.normal(size=(b, 2, past, 3)).astype(np.float32)
    rec = rng.normal(size=(b, 4, 5, 6)).astype(np.float32)
    pads = np.asarray([past - n for n in lengths], np.int64)
    tokens = [list(range(n)) for n in lengths]
    return Snapshot({KV: kv, REC: rec}, past, pads, tokens, (KV,), rng.normal(size=(b, 7)).astype(np.float32),
                    {"vocab_size": 7})


def _real(s: Snapshot, r: int) -> np.ndarray:
    return s.arrays[KV][r, :, s.pads[r]:]


def test_stack_right_aligns_real_columns_and_trims_padding() -> None:
    a, b = _snap([3, 5], past=6, seed=0), _snap([9], past=9, seed=1)
    s = stack([a, b])
    print("past", s.past_len, "pads", s.pads)
    assert s.past_len == 9 and s.pads.tolist() == [6, 4, 0] and s.lengths.tolist() == [3, 5, 9]
    for r, (src, i) in enumerate([(a, 0), (a, 1), (b, 0)]):
        assert np.array_equal(_real(s, r), _real(src, i))
        assert not s.arrays[KV][r, :, : s.pads[r]].any()  # padding is zeros (masked out anyway)
        assert np.array_equal(s.arrays[REC][r], src.arrays[REC][i])
        assert np.array_equal(s.logits[r], src.logits[i])  # type: ignore[index]
    assert s.tokens == [[0, 1, 2], [0, 1, 2, 3, 4], list(range(9))]


def test_rows_select_and_trim() -> None:
    s = stack([_snap([3, 5], past=6, seed=0), _snap([9], past=9, seed=1)])
    two = s.rows([1, 0])
    assert two.past_len == 5 and two.pads.tolist() == [0, 2]  # the 9-token row left: 4 columns trimmed
    assert np.array_equal(_real(two, 0), _real(s, 1)) and np.array_equal(_real(two, 1), _real(s, 0))
    rep = s.rows([2]).repeat(3)
    assert rep.batch == 3 and all(np.array_equal(_real(rep, r), _real(s, 2)) for r in range(3))
    with pytest.raises(SnapshotError, match="one-row"):
        s.repeat(2)


def test_save_load_round_trip(tmp_path: Path) -> None:
    s = _snap([2, 4], past=4, seed=3)
    s.extra = {"messages": [{"role": "user", "content": "日本語"}]}
    got = Snapshot.load(s.save(tmp_path / "state.npz"))
    assert got.past_len == 4 and got.pads.tolist() == s.pads.tolist() and got.tokens == s.tokens
    assert got.kv_names == (KV,) and got.model == s.model and got.extra == s.extra
    assert all(np.array_equal(got.arrays[k], v) for k, v in s.arrays.items())
    assert np.array_equal(got.logits, s.logits)  # type: ignore[arg-type]
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SnapshotError, match="not a readable state file"):
        Snapshot.load(tmp_path / "junk.npz")
    with pytest.raises(SnapshotError, match="no state file"):
        Snapshot.load(tmp_path / "missing.npz")


def test_mask_buffer_matches_fresh_masks() -> None:
    buf = MaskBuffer()
    for pads, n in [([0], 5), ([0, 0, 0], 7), ([2, 0, 5], 6), ([0, 3], 3000), ([1], 2)]:
        p = np.asarray(pads, np.int64)
        got = buf.view(p, n)
        assert got.flags.c_contiguous and got.dtype == np.int64
        assert np.array_equal(got, mask_of(p, n))
