"""Long prompts: chunk sizing under the attention budget, progress reports, and peak memory that grows
with the K/V cache only (measured in fresh processes; the 32K figure is in BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from granite_onnx.runtime import Model
from granite_onnx.runtime.generate import ATTENTION_BUDGET, MIN_AUTO_CHUNK, attention_budget_for


@pytest.fixture(scope="module")
def model(test_model_last_dir: Path) -> Model:
    return Model.load(test_model_last_dir, threads=2)


def test_chunk_length_keeps_the_attention_workspace_in_budget(model: Model) -> None:
    heads = model.cfg.num_attention_heads
    sizes = [model.chunk_length(past, 10**6, 1) for past in (0, 1000, 4000, 16000, 64000)]
    print("auto chunk by past length:", sizes)
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 1000
    assert model.attention_budget == ATTENTION_BUDGET  # a small model: the 64 MiB floor
    for past, t in zip((0, 1000, 4000, 16000, 64000), sizes):
        assert t == MIN_AUTO_CHUNK or 4 * (heads + 2) * t * (past + t) <= ATTENTION_BUDGET
    assert model.chunk_length(0, 10, 1) == 10  # a short prompt is one chunk
    assert model.chunk_length(5000, 10**6, 1, chunk_size=77) == 77
    assert model.chunk_length(0, 10**6, 4) < model.chunk_length(0, 10**6, 1)  # the batch shares the budget


def test_the_budget_grows_with_the_weights(model: Model) -> None:
    """Each chunk reads every weight once: big models get fewer, longer chunks (1/8 of the weight bytes)."""
    data = model.session.path / "model.onnx.data"
    assert model.session.weight_bytes == data.stat().st_size + (model.session.path / "model.onnx").stat().st_size
    assert attention_budget_for(10 * 2**20) == ATTENTION_BUDGET
    tiny_4l = 2_920_000_000  # Granite-Tiny widths, 4 layers, float32
    assert attention_budget_for(tiny_4l) == tiny_4l // 8
    small_budget = model.attention_budget
    try:
        model.attention_budget = attention_budget_for(tiny_4l)
        big = [model.chunk_length(past, 4096 - past, 1) for past in (0, 2000)]
    finally:
        model.attention_budget = small_budget
    small = [model.chunk_length(past, 4096 - past, 1) for past in (0, 2000)]
    print("chunks of a 4096-token prompt, 64 MiB vs 365 MB budget:", small, big)
    assert big[0] > 2 * small[0] and big[1] > 2 * small[1]


def test_progress_is_reported_per_chunk(model: Model) -> None:
    ids = list(map(int, np.random.default_rng(0).integers(3, model.cfg.vocab_size, 300)))
    seen: list[tuple[int, int]] = []
    ref, _ = model.prefill([ids])
    got, st = model.prefill([ids], chunk_size=64, progress=lambda d, n: seen.append((d, n)))
    assert seen == [(64, 300), (128, 300), (192, 300), (256, 300), (300, 300)] and st.past_len == 300
    assert float(np.abs(ref - got).max()) < 1e-4


MEASURE = """
import json, sys
from granite_onnx.runtime import Model
from granite_onnx.bench import long_prompt
m = Model.load(sys.argv[1], threads=2)
print(json.dumps(long_prompt(m, int(sys.argv[2]), None)))
"""


def _measure(folder: Path, tokens: int) -> dict:
    r = subprocess.run([sys.executable, "-c", MEASURE, str(folder), str(tokens)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
@pytest.mark.parametrize("layout", ["grow", "shared"])
def test_peak_memory_grows_with_the_kv_cache_only(layout: str, request: pytest.FixtureRequest) -> None:
    """Portable graph ("grow": the graph concatenates past and new K/V into a fresh buffer, so a step holds
    K/V twice) and fused graph ("shared": one capacity buffer, allocated once for the whole prompt)."""
    folder = request.getfixturevalue("test_model_last_dir" if layout == "grow" else "test_model_fused_dir")
    short, long = _measure(folder, 2048), _measure(folder, 4096)
    for r in (short, long):
        print(f"{layout}: {r['tokens']} tokens in {r['chunks']} chunks: {r['seconds']:.2f} s, peak RSS growth "
              f"{r['peak_rss_growth_mb']:.1f} MB, K/V {r['kv_mb']:.2f} MB")
    assert long["chunks"] > short["chunks"] > 1
    budget_mb = ATTENTION_BUDGET / 2**20
    copies = 2 if layout == "grow" else 1
    assert long["peak_rss_growth_mb"] <= copies * long["kv_mb"] + budget_mb + 32
    assert long["peak_rss_growth_mb"] - short["peak_rss_growth_mb"] <= copies * (long["kv_mb"] - short["kv_mb"]) + 12
