"""Precision and weight-only quantization (export/quantize.py, export/precision.py, export/accuracy.py).

Rungs: each quantized kernel vs numpy over the dequantized weights (exact to float rounding);
the int4 graph vs the float32 torch model over dequantized weights (exact: the streamed compose path);
int8/int4 (file path, default accuracy levels) and fp16 vs float32 torch, with tolerances relative to
a measured reference error; bad formats refused before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from granite_onnx.export.accuracy import (OrtStepper, compare_logits, dequantized_source, format_accuracy,
                                          reference_logits)
from granite_onnx.export.exporter import ExportError, ExportOptions, export
from granite_onnx.export.precision import FormatError, WeightFormat, provider_problem
from granite_onnx.export.quantize import (check_model, dequantize_experts, dequantize_linear, interleave_gate_up,
                                          optimize_with_format, quantize_experts, quantize_fp8, quantize_linear)
from granite_onnx.models.config import preset
from granite_onnx.models.weights import RandomWeights

SEED = 1  # the conftest fixtures' seed
TOKENS = np.random.default_rng(0).integers(0, preset("test").vocab_size, 33)


def _run(nodes: list, inits: list, x: np.ndarray, in_dtype: int = TensorProto.FLOAT) -> np.ndarray:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", in_dtype, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 11
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


# ----------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("bits", [4, 8])
def test_matmulnbits_equals_dequantized_matmul(bits: int) -> None:
    rng = np.random.default_rng(0)
    k, n, bs = 128, 48, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    q = quantize_linear(w, bits, bs)
    wd = dequantize_linear(q)
    x = rng.standard_normal((5, k)).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "B", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=bs, accuracy_level=0)
    y = _run([node], [numpy_helper.from_array(q.qweight, "B"), numpy_helper.from_array(q.scales, "s")], x)
    err, quant_err = np.abs(y - x @ wd).max(), np.abs(wd - w).max()
    print(f"int{bits}: |MatMulNBits − x·deq(W)| {err:.2e}, |deq(W) − W| {quant_err:.2e}")
    assert err < 1e-5 * np.abs(x @ wd).max() * 10  # float32 rounding of a K=128 dot product
    assert quant_err <= np.abs(w).max() / (2 ** (bits - 1)) + 1e-6  # at most half a step of the block's scale


def _moe_reference(x: np.ndarray, router: np.ndarray, gate_up: np.ndarray, down: np.ndarray, k: int) -> np.ndarray:
    """Granite's MoE in numpy: top-k raw logits, softmax over them, SwiGLU experts (gate | up)."""
    inter = down.shape[1]
    logits = x @ router
    out = np.zeros_like(x)
    for t in range(len(x)):
        top = np.argsort(-logits[t])[:k]
        w = np.exp(logits[t, top] - logits[t, top].max())
        w /= w.sum()
        for e, wt in zip(top, w):
            h = x[t] @ gate_up[e]
            out[t] += wt * ((h[:inter] / (1 + np.exp(-h[:inter])) * h[inter:]) @ down[e])
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_qmoe_layout(bits: int) -> None:
    """QMoE's CPU layout: fc1 rows interleaved gate/up, fc2 [E, D, I/pack], block scales; swiglu_fusion=1."""
    rng = np.random.default_rng(1)
    e, d, i, k, bs = 4, 64, 32, 2, 32
    gate_up = (rng.standard_normal((e, d, 2 * i)) / np.sqrt(d)).astype(np.float32)
    down = (rng.standard_normal((e, i, d)) / np.sqrt(i)).astype(np.float32)
    router = rng.standard_normal((d, e)).astype(np.float32)
    x = rng.standard_normal((7, d)).astype(np.float32)
    q = quantize_experts(gate_up, down, bits, bs)
    gu_d, dn_d = dequantize_experts(q)
    inits = [numpy_helper.from_array(a, n) for a, n in ((router, "router"), (q.fc1, "f1"), (q.fc1_scales, "s1"),
                                                         (q.fc2, "f2"), (q.fc2_scales, "s2"))]
    nodes = [helper.make_node("MatMul", ["x", "router"], ["logits"]),
             helper.make_node("QMoE", ["x", "logits", "f1", "s1", "", "f2", "s2"], ["y"], domain="com.microsoft",
                              k=k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
                              activation_alpha=1.0, activation_beta=0.0, expert_weight_bits=bits, block_size=bs)]
    y = _run(nodes, inits, x)
    ref_q = _moe_reference(x, router, gu_d, dn_d, k)
    err_weights = np.abs(ref_q - _moe_reference(x, router, gate_up, down, k)).max()
    err = np.abs(y - ref_q).max()
    print(f"int{bits}: |QMoE − MoE(deq W)| {err:.2e}; weight quantization alone {err_weights:.2e}")
    if bits == 4:
        assert err < 1e-5  # float activations: exact to rounding
    else:
        # block-wise 8-bit QMoE quantizes activations to int8 on CPU (no float kernel): that error is of the
        # order of the weight quantization's own
        assert err < 5 * err_weights


def test_gather_block_quantized_reads_the_head_tensor() -> None:
    """The tied embedding: GatherBlockQuantized over MatMulNBits' [V, D/bs, blob] tensor (rank-3 view)."""
    rng = np.random.default_rng(2)
    v, d, bs = 37, 64, 16
    emb = rng.standard_normal((v, d)).astype(np.float32)
    q = quantize_linear(emb.T, 4, bs)
    ids = np.array([[3, 0, 36, 5]], np.int64)
    node = helper.make_node("GatherBlockQuantized", ["E", "x", "s"], ["y"], domain="com.microsoft", gather_axis=0,
                            quantize_axis=2, block_size=bs, bits=4)
    y = _run([node], [numpy_helper.from_array(q.qweight, "E"), numpy_helper.from_array(q.scales[..., None], "s")],
             ids, TensorProto.INT64)
    np.testing.assert_allclose(y.reshape(4, d), dequantize_linear(q).T[ids[0]], atol=1e-6)


def test_fp8_block_quantization() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((3, 200, 96)).astype(np.float32)  # partial edge blocks on both axes
    for square, scale_shape in ((False, (3, 200, 1)), (True, (3, 2, 1))):
        q, s = quantize_fp8(w, 128, square=square)
        assert q.shape == w.shape and s.shape == scale_shape
        if square:
            deq = q.astype(np.float32) * np.repeat(np.repeat(s, 128, 1)[:, :200], 128, 2)[..., :96]
        else:
            deq = q.astype(np.float32) * s
        rel = np.abs(deq - w).max() / np.abs(w).max()
        assert rel <= 2 ** -4, rel  # e4m3: 3 mantissa bits


# ------------------------------------------------------------------------- whole model
@pytest.fixture(scope="module")
def int4_exact_dir(tmp_path_factory: pytest.TempPathFactory, test_model_dir: Path) -> Path:
    """int4 through the streamed compose path, float activations everywhere (accuracy_level 0)."""
    out = tmp_path_factory.mktemp("quant") / "int4-exact"
    export(preset_name="test", seed=SEED, out=out, options=ExportOptions(
        logits="all", quant="int4", block_size=16, accuracy_level=0, parity_check=False))
    return out


def test_int4_graph_equals_torch_over_dequantized_weights(int4_exact_dir: Path) -> None:
    """Rung: quantized ONNX vs float32 torch over dequantized weights — exact, so every layout is right."""
    fmt = WeightFormat.from_meta(json.loads((int4_exact_dir / "granite_config.json").read_text()))
    src = RandomWeights(preset("test"), SEED)
    got = OrtStepper(int4_exact_dir).teacher_forced(TOKENS)
    deq = reference_logits(dequantized_source(src, fmt), TOKENS)
    ref = reference_logits(src, TOKENS)
    err, quant_err = np.abs(got - deq).max(), np.abs(ref - deq).max()
    print(f"int4 ONNX vs torch(deq W): {err:.2e}; torch(deq W) vs torch(W): {quant_err:.2e}")
    assert err < 1e-4  # the float32 parity tolerance: nothing but rounding
    hist = json.loads((int4_exact_dir / "export_report.json").read_text())["op_histogram"]
    assert hist["com.microsoft.QMoE"] == 4 and hist["com.microsoft.GatherBlockQuantized"] == 1
    assert "Gemm" not in hist and "granite_onnx.MoE" not in hist


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_vs_float32_with_default_kernels(quant: str, test_model_dir: Path, tmp_path: Path) -> None:
    """`optimize --quant` (file path, fused, default kernels): its error vs float32, relative to the error
    weight quantization alone causes (torch over dequantized weights). The default MatMulNBits kernels
    quantize activations to int8 per block (and 8-bit QMoE always does): that adds about as much error
    as int8 weights cause themselves (measured 2.7× in max logit error, 2.2× in KL, on this preset) and
    little next to int4 weights' (1.06×)."""
    out = tmp_path / quant
    rep = optimize_with_format(test_model_dir, out, quant=quant, block_size=16)
    assert rep["fusion_counts"]["ssm_scan"] == 3 and rep["fusion_counts"]["attention"] == 1  # fusions still fire
    fmt = WeightFormat.from_meta(json.loads((out / "granite_config.json").read_text()))
    src = RandomWeights(preset("test"), SEED)
    got = OrtStepper(out).teacher_forced(TOKENS)
    ref = reference_logits(src, TOKENS)
    deq = reference_logits(dequantized_source(src, fmt), TOKENS)
    m, m_weights = compare_logits(ref, got, TOKENS[1:]), compare_logits(ref, deq, TOKENS[1:])
    print(f"{quant}: ONNX vs fp32 {m['max_abs_logit_diff']:.3f} (KL {m['mean_kl']:.2e}, top-1 "
          f"{m['top1_agreement']:.3f}); weights alone {m_weights['max_abs_logit_diff']:.3f} (KL {m_weights['mean_kl']:.2e})")
    bound = 4 if quant == "int8" else 2
    assert m["max_abs_logit_diff"] <= bound * m_weights["max_abs_logit_diff"]
    assert m["mean_kl"] <= bound * m_weights["mean_kl"] + 1e-6


def test_fp16_vs_float32(tmp_path: Path) -> None:
    """fp16 graph (fp16 weights, activations, conv/K/V state; SSM state float32) on CPU vs float32 torch:
    within 2× the error of the same torch model run in float16."""
    import torch

    from granite_onnx.export import io
    from granite_onnx.models.weights import load_torch_model

    out = tmp_path / "fp16"
    export(preset_name="test", seed=SEED, out=out, options=ExportOptions(logits="all", precision="fp16",
                                                                          parity_check=False))
    sess_types = {i.name: i.type for i in ort.InferenceSession(str(out / "model.onnx")).get_inputs()}
    cfg = preset("test")
    for s in io.state_specs(cfg):
        assert sess_types[s.past_name] == ("tensor(float)" if s.float32_always else "tensor(float16)"), s.past_name
    src = RandomWeights(cfg, SEED)
    got = OrtStepper(out).teacher_forced(TOKENS)
    ref = reference_logits(src, TOKENS)
    model = load_torch_model(src).half()
    past = [torch.zeros(s.concrete_shape(1, 0), dtype=torch.float32 if s.float32_always else torch.float16)
            for s in io.state_specs(cfg)]
    ids = torch.from_numpy(TOKENS[None])
    with torch.no_grad():
        half = model(ids, torch.ones_like(ids), past)[0][0].float().numpy()
    err, err_ref = np.abs(got - ref).max(), np.abs(half - ref).max()
    m = compare_logits(ref, got, TOKENS[1:])
    print(f"fp16 ONNX vs fp32: {err:.3e} (top-1 {m['top1_agreement']:.3f}, KL {m['mean_kl']:.2e}); "
          f"torch fp16 vs fp32: {err_ref:.3e}")
    assert err <= 2 * err_ref
    assert m["top1_agreement"] >= 0.95


def test_accuracy_report_on_a_folder(test_model_dir: Path, tmp_path: Path) -> None:
    from granite_onnx.export.accuracy import accuracy_report

    out = tmp_path / "int8"
    optimize_with_format(test_model_dir, out, quant="int8", block_size=16)
    rep = accuracy_report(out, "test", positions=32)
    print(format_accuracy(rep))
    assert rep["positions"] == 32 and rep["weights"]["quant"] == "int8"
    assert 0.9 <= rep["top1_agreement"] <= 1 and rep["mean_kl"] < 1e-2
    assert set(rep["checks"]) == {"top1", "mean_kl"}


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, match", [
    ({"precision": "fp64"}, "unknown precision"),
    ({"quant": "int3"}, "unknown quantization"),
    ({"quant": "int4", "block_size": 24}, "power of two ≥ 16"),
    ({"quant": "int4", "block_size": 8}, "power of two ≥ 16"),
    ({"block_size": 32}, "needs a quantization"),
    ({"quant": "fp8"}, "needs --precision fp16 or bf16"),
])
def test_bad_formats(kw: dict, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        WeightFormat(**kw)


def test_block_size_must_divide_every_width() -> None:
    cfg = preset("test")  # hidden 64, expert intermediate 48, shared 80
    with pytest.raises(FormatError, match=r"does not divide the 80 input features.*use --block-size 16"):
        check_model(cfg, WeightFormat(quant="int4", block_size=32))
    with pytest.raises(FormatError, match=r"only 64 input features, fewer than --block-size 128: too small"):
        check_model(cfg, WeightFormat(quant="int4", block_size=128))
    check_model(cfg, WeightFormat(quant="int4", block_size=16))
    check_model(cfg, WeightFormat(precision="fp16", quant="fp8", block_size=128))  # fp8 takes partial blocks


def _fused_copy(portable: Path, out: Path, fusions: tuple[str, ...]) -> Path:
    """A fused folder made from `portable` with the given fusions (the exporter always applies them all)."""
    import shutil

    from granite_onnx.export.fusions import fuse_model_file

    out.mkdir(parents=True)
    fuse_model_file(portable / "model.onnx", out / "model.onnx", fusions=fusions)
    for f in portable.iterdir():
        if f.name not in ("model.onnx", "model.onnx.data"):
            shutil.copy(f, out / f.name)
    meta = json.loads((out / "granite_config.json").read_text())
    (out / "granite_config.json").write_text(json.dumps({**meta, "graph": "fused"}))
    return out


def test_quantizing_a_fused_folder(tmp_path: Path) -> None:
    """`optimize --quant` on a fused folder, whose head Gemm carries logits_scaling as alpha and whose
    experts are split in halves (fusions/scale_fold.py, moe_split.py): the split quantizes to the same
    weights as the unsplit experts (same blocks: I/2 is a multiple of 16; fc2·2 gets scales·2), and the
    error vs float32 stays that of quantizing the portable folder (a dropped alpha: logits 2.7× off)."""
    import dataclasses

    from granite_onnx.export.fusions import ALL_FUSIONS

    cfg = dataclasses.replace(preset("test"), intermediate_size=64)
    portable = tmp_path / "portable"
    export(source=RandomWeights(cfg, SEED), out=portable, options=ExportOptions(logits="all", parity_check=False))
    split = _fused_copy(portable, tmp_path / "split", ALL_FUSIONS)
    whole = _fused_copy(portable, tmp_path / "whole", tuple(f for f in ALL_FUSIONS if f != "moe_split"))
    logits = {}
    for name, folder in (("split", split), ("whole", whole), ("portable", portable)):
        optimize_with_format(folder, tmp_path / f"{name}-int4", quant="int4", block_size=16)
        logits[name] = OrtStepper(tmp_path / f"{name}-int4").teacher_forced(TOKENS)
    ref = OrtStepper(split).teacher_forced(TOKENS)
    scale = float(np.abs(ref).max())
    split_vs_whole = float(np.abs(logits["split"] - logits["whole"]).max())
    err, err_portable = (float(np.abs(logits[k] - ref).max()) for k in ("split", "portable"))
    print(f"int4 split vs whole experts {split_vs_whole:.2e}; vs float32: fused folder {err:.3f}, "
          f"portable folder {err_portable:.3f} (logits up to {scale:.1f})")
    # not bit-equal: the split sums the experts' halves in another order (~1e-7), and the int8 activation
    # quantization of the default MatMulNBits kernels downstream turns such differences into rounding flips
    assert split_vs_whole <= 0.05 * err_portable
    assert err <= 2 * err_portable + 1e-3 * scale


def test_quantizing_a_fused_folder_needs_a_block_that_divides_the_split_experts(tmp_path: Path) -> None:
    export(preset_name="test", seed=SEED, out=tmp_path / "fused", options=ExportOptions(optimize=True,
                                                                                         parity_check=False))
    with pytest.raises(ExportError, match=r"does not divide the 24 input features.*split in halves.*portable"):
        optimize_with_format(tmp_path / "fused", tmp_path / "int4", quant="int4", block_size=16)
    assert not (tmp_path / "int4").exists()


def test_refused_export_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "m"
    with pytest.raises(ExportError, match="--block-size"):
        export(preset_name="test", out=out, options=ExportOptions(quant="int4", block_size=32))
    assert list(tmp_path.iterdir()) == []  # no folder, no hidden temp folder


def test_cli_reports_bad_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from granite_onnx.cli import main

    rc = main(["export", "--preset", "test", "--out", str(tmp_path / "m"), "--quant", "int4", "--block-size", "24"])
    assert rc == 2 and "power of two" in capsys.readouterr().err
    rc = main(["export", "--preset", "test", "--out", str(tmp_path / "m"), "--quant", "fp8"])
    assert rc == 2 and "--precision fp16 or bf16" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_cuda_only_formats_are_named() -> None:
    def meta(**w: object) -> dict:
        return {"weights": WeightFormat(**w).to_json()}  # type: ignore[arg-type]

    assert provider_problem(meta(quant="int4"), "cpu") is None
    assert provider_problem(meta(precision="fp16"), "cpu") is None
    assert provider_problem({}, "cpu") is None  # folders exported before formats existed: fp32
    for w in ({"precision": "bf16"}, {"precision": "fp16", "quant": "fp8"}):
        why = provider_problem(meta(**w), "cpu")
        assert why is not None and "provider 'cuda'" in why and "re-export" in why
        assert provider_problem(meta(**w), "cuda") is None


def test_interleave_gate_up() -> None:
    gu = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # I = 2: columns g0 g1 u0 u1
    assert interleave_gate_up(gu)[0, 0].tolist() == [0, 2, 1, 3]
