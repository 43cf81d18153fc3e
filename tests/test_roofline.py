"""The ceilings `granite-onnx bench` sets its figures against: the counts they rest on, and real
ONNX Runtime measurements of the rates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from granite_onnx.models.config import MAMBA, preset
from granite_onnx.roofline import bytes_per_decode_step, gemm_gflop_s, gemv_gb_s, matmul_model, prefill_flops


def test_decode_bytes_count_the_routed_experts_only() -> None:
    cfg = preset("small")  # 8 experts top-2: a token reads 2 of 8
    experts = cfg.num_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.intermediate_size
    rest = cfg.num_parameters() - experts
    assert bytes_per_decode_step(cfg, 1) == 4 * (rest + experts // 4)
    assert bytes_per_decode_step(cfg, 4) == 4 * (rest + experts)  # 4 tokens × 2 can reach all 8
    assert bytes_per_decode_step(cfg, 64, dtype_bytes=0.5) == 0.5 * cfg.num_parameters()


def test_prefill_flops_by_hand() -> None:
    cfg = preset("test")
    h, v, t = cfg.hidden_size, cfg.vocab_size, 100
    per_token = bytes_per_decode_step(cfg, 1, dtype_bytes=1) - v * h  # tied: the head is counted once
    scan = sum(4 * t * cfg.mamba_n_heads * cfg.mamba_d_head * cfg.mamba_d_state for k in cfg.layer_types if k == MAMBA)
    attn = sum(2 * t * t * cfg.num_attention_heads * cfg.head_dim for k in cfg.layer_types if k != MAMBA)
    want = 2 * t * per_token + 2 * v * h + scan + attn
    print(f"test preset, {t} tokens: {prefill_flops(cfg, t):.4g} FLOPs (want {want:.4g})")
    assert prefill_flops(cfg, t) == pytest.approx(want, rel=1e-12)
    assert attn > 0 and scan > 0
    # linear in the projections, quadratic in attention only
    assert prefill_flops(cfg, 2 * t) - 2 * prefill_flops(cfg, t) == pytest.approx(2 * attn - 2 * v * h, rel=1e-9)


def test_rate_models_hold_distinct_weights(tmp_path: Path) -> None:
    """ONNX Runtime shares identical initializers: a working set of copies would be read once and
    overstate the bandwidth (84 GB/s instead of 20 for 806 MB here). Every piece must differ."""
    path = matmul_model(tmp_path, 1, 32, [64, 64, 64])
    m = onnx.load(path)
    ws = [numpy_helper.to_array(t, base_dir=str(tmp_path)) for t in m.graph.initializer]
    assert [w.shape for w in ws] == [(32, 64)] * 3
    assert not np.array_equal(ws[0], ws[1]) and not np.array_equal(ws[1], ws[2])
    assert all(np.isfinite(w).all() and (w > 0).all() for w in ws)  # no NaN / denormal slow paths


def test_rates_are_measured() -> None:
    gb_s = gemv_gb_s(8 << 20, 256, threads=1, head=2000, min_s=0.05)
    gflop_s = gemm_gflop_s(128, threads=1, tokens=64, min_s=0.05)
    print(f"1 thread: batch-1 MatMul over 8 MiB {gb_s:.1f} GB/s; [64,128]×[128,512] {gflop_s:.1f} GFLOP/s")
    assert 0.1 < gb_s < 2000 and 0.1 < gflop_s < 10000
