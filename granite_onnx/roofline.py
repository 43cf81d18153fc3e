"""What this machine lets ONNX Runtime do at best: the ceilings `granite-onnx bench` sets its figures against.

A decode step at batch 1 reads every weight it uses once and does ~2 FLOPs per weight, so its floor is
the bytes it must read over the rate ONNX Runtime's own MatMul reads weights at batch 1 (a GEMV),
measured here over a working set of the same size: a step whose weights fit in the last-level cache is
held to the cache's rate, a larger one to the memory's. A machine copy bandwidth (a STREAM-style copy of
an array larger than any cache) says nothing about the first kind: on a machine with a 300 MB L3 the
whole `small` preset (83 MB) stays in cache and is read at twice the copy bandwidth.

A prefill is compute-bound: its floor is its FLOPs over the rate ONNX Runtime's MatMul reaches on a
dense [tokens, hidden] × [hidden, 4·hidden] product with prepacked weights (the weights each chunk
reads are left out: at best that read overlaps the compute).

Either floor gives a ceiling on the speed-up over any other runtime: ceiling ×HF = HF's time / the floor.
Both floors are optimistic (no node costs anything but its bytes or FLOPs, every kernel is as good as
the best dense one, the scan and attention count only their multiply-adds), so a ceiling is an upper
bound — within the noise of a shared machine, and with one known give: a decode working set larger than
the last-level cache partly survives there from one step to the next, so a step can beat its floor by
some 5–20 % (tiny-4L: 806 MB against a 300 MB L3). A target well above its ceiling cannot be met by a
graph on this machine, only by reading fewer bytes or doing fewer FLOPs.

Torch-free: onnx and onnxruntime only.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np

from granite_onnx.models.config import MAMBA, HybridConfig

GEMV_CAP_BYTES = 1 << 30  # beyond 1 GiB no CPU cache holds any of it: the rate is the memory's
_PIECE_BYTES = 4 << 20  # the working set is cut into MatMuls of ~4 MiB, about a Granite projection's size


def bytes_per_decode_step(cfg: HybridConfig, batch: int, dtype_bytes: float = 4) -> float:
    """Weight bytes one decode step must read: everything but the experts, plus the experts that the
    batch's tokens can route to (at most all of them)."""
    total = cfg.num_parameters()
    if cfg.num_experts:
        per_layer = cfg.num_experts * 3 * cfg.hidden_size * cfg.intermediate_size
        experts = per_layer * cfg.num_layers
        touched = min(1.0, batch * cfg.num_experts_per_tok / cfg.num_experts)
        total = total - experts + int(experts * touched)
    # the tied embedding is gathered, not read whole — but the LM head reads it whole: count it once
    return total * dtype_bytes


def prefill_flops(cfg: HybridConfig, tokens: int) -> float:
    """Multiply-add FLOPs of prefilling `tokens` (one sequence, logits of the last position only): the
    projections and the routed experts per token, the LM head once, causal attention, and the scan in its
    recurrent form (4 FLOPs per state element per token). A lower bound: norms, gates, the conv and the
    chunked scan's extra work are left out."""
    h, v = cfg.hidden_size, cfg.vocab_size
    per_token = bytes_per_decode_step(cfg, 1, dtype_bytes=1)  # parameters one token multiplies
    embed = v * h * (1 if cfg.tie_word_embeddings else 2)  # gathered (and the head is counted once below)
    flops = 2.0 * tokens * (per_token - embed) + 2.0 * v * h
    for t in cfg.layer_types:
        if t == MAMBA:
            flops += 4.0 * tokens * cfg.mamba_n_heads * cfg.mamba_d_head * cfg.mamba_d_state
        else:  # QKᵀ and AV over the causal half
            flops += 2.0 * tokens * tokens * cfg.num_attention_heads * cfg.head_dim
    return flops


def matmul_model(folder: Path, m: int, k: int, widths: list[int]) -> Path:
    """Independent MatMuls [m, k] × [k, n] of one input, n in `widths`, the weights in an external data file."""
    import onnx
    from onnx import TensorProto, helper

    data = folder / "w.bin"
    rng = np.random.default_rng(0)
    inits = []
    with open(data, "wb") as f:
        for i, n in enumerate(widths):  # distinct values: ONNX Runtime shares identical initializers
            w = rng.random((k, n), dtype=np.float32)
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[k, n])
            t.data_location = TensorProto.EXTERNAL
            for key, val in (("location", data.name), ("offset", str(f.tell())), ("length", str(w.nbytes))):
                t.external_data.add(key=key, value=val)
            f.write(w.tobytes())
            inits.append(t)
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(len(widths))]
    graph = helper.make_graph(nodes, "roofline", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [m, n])
                               for i, n in enumerate(widths)], inits)
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _best_run_s(folder: Path, m: int, k: int, widths: list[int], threads: int, min_s: float) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(matmul_model(folder, m, k, widths)), so, providers=["CPUExecutionProvider"])
    x = np.full((m, k), 0.5, dtype=np.float32)
    for _ in range(3):  # prepacking, first touch, caches
        sess.run(None, {"x": x})
    best, spent = math.inf, 0.0
    while spent < min_s or best == math.inf:
        t = time.perf_counter()
        sess.run(None, {"x": x})
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
    return best


def gemv_widths(nbytes: float, k: int, head: int = 0) -> list[int]:
    """Output widths of float32 [k, n] weights making a working set of `nbytes` (at least ~4 MiB, at most
    1 GiB) laid out like a model's: one [k, head] MatMul (the LM head; 0: none) and the rest in pieces of
    ~4 MiB (k: the hidden size)."""
    total = min(max(float(nbytes), _PIECE_BYTES), GEMV_CAP_BYTES)
    widths = [head] if 0 < 4 * k * head < total else []
    n = max(64, _PIECE_BYTES // (4 * k))
    return widths + [n] * max(1, round((total - 4 * k * sum(widths)) / (4 * k * n)))


def gemv_gb_s(nbytes: float, k: int, threads: int, head: int = 0, min_s: float = 0.3) -> float:
    """Bytes per second ONNX Runtime's MatMul reads float32 weights at batch 1, over a working set of
    `nbytes` laid out as `gemv_widths` lays it out; best run."""
    widths = gemv_widths(nbytes, k, head)
    with tempfile.TemporaryDirectory(prefix="granite-roofline-") as tmp:
        s = _best_run_s(Path(tmp), 1, k, widths, threads, min_s)
    return 4.0 * k * sum(widths) / s / 1e9


def gemm_gflop_s(k: int, threads: int, tokens: int = 512, min_s: float = 0.3) -> float:
    """FLOPs per second of ONNX Runtime's MatMul on [tokens, k] × [k, 4k] with prepacked weights; best run."""
    with tempfile.TemporaryDirectory(prefix="granite-roofline-") as tmp:
        s = _best_run_s(Path(tmp), tokens, k, [4 * k], threads, min_s)
    return 2.0 * tokens * k * 4 * k / s / 1e9
