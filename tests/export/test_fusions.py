"""Parity rung: fused vs portable graph, both in ONNX Runtime with its own graph optimisations off.

Per fusion: it fires (count ≥ 1) and the call nodes it replaces are gone; a graph its check must refuse
gives count 0 and says why; ORT outputs agree before and after on a left-padded batch-2 prefill, a
decode step with past state, and a batch-2 chunk of 3 tokens after that (GQA's `query_seqlens` case).

What "agree" means with left padding: every present.* state and the logits of real tokens. The rows
of padding *queries* differ by design (no key is visible to them; see fusions/attention.py), so the
logits at padding positions and the K/V rows at padding positions of an attention layer that comes
after another are not compared — nothing a real token computes ever reads them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from granite_onnx.export import io
from granite_onnx.export.compose import DATA_FILE, compose
from granite_onnx.export.fusions import (
    ALL_FUSIONS,
    explain,
    fuse_all,
    fuse_attention,
    fuse_causal_conv,
    fuse_model_file,
    fuse_moe,
    fuse_moe_split,
    fuse_rms_norm,
    fuse_router,
    fuse_scale_fold,
    fuse_skip_rms_norm,
    fuse_softplus,
    fuse_ssm_scan,
    fuse_static_shapes,
    portable_calls,
)
from granite_onnx.export.fusions._common import ORT_DOMAIN, PORTABLE_DOMAIN
from granite_onnx.export.fusions.cleanup import cleanup
from granite_onnx.export.fusions.moe import interleave_gate_up
from granite_onnx.export.fusions.static_shapes import DimClasses, static_target
from granite_onnx.models import kernels
from granite_onnx.models.config import ATTENTION, MAMBA, HybridConfig, preset
from granite_onnx.models.weights import RandomWeights

ATOL = 1e-4  # float32: logits and every present.* state
# Row 1 of the prompt is left-padded by PAD tokens; PROMPT spans 3 chunks of the test preset's SSD scan.
BATCH, PROMPT, PAD = 2, 37, 5

# what each fusion replaces (portable call ops) and what it must produce
REPLACES = {
    "scan": ({"CausalConv1d", "SSMScan"}, {"CausalConvWithState", "LinearAttention"}),
    "moe": ({"MoE"}, {"MoE"}),
    "router": ({"MoE"}, {"MoE"}),  # run with moe: it merges the router MatMul that moe makes
    "moe_split": ({"MoE"}, {"MoE"}),  # run with moe: it splits the experts of the MoE that moe makes
    "attention": ({"Attention"}, {"GroupQueryAttention"}),
    "norms": (set(), {"SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"}),
    "softplus": (set(), {"Softplus"}),  # the Where/Greater guard around it goes
    "fold": (set(), set()),  # a Mul folded into a weight: counted, and the outputs compared
    "shapes": (set(), set()),  # Reshape stays Reshape: its target becomes a constant (see _dynamic_reshapes)
}


# ----------------------------------------------------------------------------- fixtures
@dataclasses.dataclass
class Portable:
    cfg: HybridConfig
    path: Path
    outputs: dict[str, list[dict[str, np.ndarray]]]  # step → portable outputs by name
    feeds: dict[str, dict[str, np.ndarray]]  # step → inputs


def _session(path: Path, level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
             ) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ladder(cfg: HybridConfig, sess: ort.InferenceSession) -> tuple[dict, dict]:
    """Prefill (left-padded) → decode 1 token → chunk of 3 tokens, each from the previous portable state."""
    rng = np.random.default_rng(7)
    names = io.output_names(cfg)
    mask = np.ones((BATCH, PROMPT), np.int64)
    mask[1, :PAD] = 0
    feeds = {io.INPUT_IDS: rng.integers(0, cfg.vocab_size, (BATCH, PROMPT)), io.ATTENTION_MASK: mask}
    for spec in io.state_specs(cfg):
        feeds[spec.past_name] = np.zeros(spec.concrete_shape(BATCH, 0), np.float32)
    all_feeds, all_outs = {}, {}
    for step, new in (("prefill", 0), ("decode", 1), ("chunk", 3)):
        if new:
            prev = all_outs[list(all_outs)[-1]]
            feeds = {io.INPUT_IDS: rng.integers(0, cfg.vocab_size, (BATCH, new)),
                     io.ATTENTION_MASK: np.concatenate([feeds[io.ATTENTION_MASK], np.ones((BATCH, new), np.int64)], 1)}
            for present, past in io.iter_present_to_past(cfg):
                feeds[past] = prev[present]
        all_feeds[step] = feeds
        all_outs[step] = dict(zip(names, sess.run(None, feeds)))
    return all_feeds, all_outs


def _build(cfg: HybridConfig, folder: Path, logits: str = "all") -> Portable:
    folder.mkdir(parents=True, exist_ok=True)
    res = compose(cfg, RandomWeights(cfg, 1), folder / DATA_FILE, logits=logits)
    onnx.save(res.model, folder / "model.onnx")
    feeds, outs = _ladder(cfg, _session(folder / "model.onnx"))
    return Portable(cfg, folder / "model.onnx", outs, feeds)


def _dense_two_groups() -> HybridConfig:
    """No experts (the dense-MLP path: nothing for the MoE fusion) and 2 Mamba groups (keys expanded ×2)."""
    return dataclasses.replace(preset("test"), num_experts=0, num_experts_per_tok=0, mamba_n_groups=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Portable]:
    root = tmp_path_factory.mktemp("fusions")
    return {"test": _build(preset("test"), root / "test"),
            "dense_g2": _build(_dense_two_groups(), root / "dense_g2")}


# ----------------------------------------------------------------------------- helpers
def _fused(portable: Portable, tmp: Path, fusions: tuple[str, ...]) -> tuple[Path, dict[str, int]]:
    out = tmp / "model.onnx"
    return out, fuse_model_file(portable.path, out, fusions=fusions)


def _compare(portable: Portable, fused_path: Path,
             level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_DISABLE_ALL) -> None:
    """Max |diff| per output name and step (printed), then assert all of them at once."""
    cfg, sess = portable.cfg, _session(fused_path, level)
    attn = cfg.attention_layers
    failures = []
    for step, feeds in portable.feeds.items():
        got = dict(zip(io.output_names(cfg), sess.run(None, feeds)))
        mask = feeds[io.ATTENTION_MASK]
        for name, want in portable.outputs[step].items():
            diff = np.abs(got[name] - want)
            if name == io.LOGITS:
                diff = diff[mask[:, -diff.shape[1]:] > 0]  # positions of real tokens only
            elif name.endswith((".key", ".value")) and int(name.split(".")[1]) != attn[0]:
                diff = diff.transpose(0, 2, 1, 3)[mask > 0]  # rows of real tokens only
            err = float(diff.max()) if diff.size else 0.0
            print(f"{'✓' if err <= ATOL else '✗'} {step:8s} {name:30s} max |diff| {err:.2e}")
            if not err <= ATOL:
                failures.append(f"{step} {name}: {err:.2e} > {ATOL}")
    assert not failures, "fused ≠ portable: " + "; ".join(failures)


def _graph_model(inputs: list[ir.Value], nodes: list[ir.Node], outs: list[ir.Value], inits: list[ir.Value],
                 extra: ir.Node | None = None, opsets: dict[str, int] | None = None) -> ir.Model:
    """A hand-built test model: `extra` (a second reader of a weight, for the negative cases) is added as
    one more node and output; outputs are named y0, y1, ..."""
    if extra is not None:
        nodes, outs = [*nodes, extra], [*outs, extra.outputs[0]]
    for k, o in enumerate(outs):
        o.name = f"y{k}"
    return ir.Model(ir.Graph(inputs, outs, nodes=nodes, initializers=inits, opset_imports=opsets or {"": 23}),
                    ir_version=10)


def _ops(model: ir.Model) -> set[tuple[str, str]]:
    return {(n.domain, n.op_type) for n in model.graph.all_nodes()}


def _guarded_softplus(model: ir.Model) -> list[str]:
    """Where nodes that pick between x and Softplus(x): torch's threshold guard."""
    return [n.name for n in model.graph.all_nodes() if n.op_type == "Where" and n.inputs[2] is not None
            and n.inputs[2].producer() is not None and n.inputs[2].producer().op_type == "Softplus"]


def _router_matmuls(model: ir.Model) -> list[str]:
    """MatMuls whose output is a MoE's router logits (the router fusion merges them away)."""
    return [n.inputs[1].producer().name for n in model.graph.all_nodes() if n.op_type == "MoE"
            and n.inputs[1].producer() is not None and n.inputs[1].producer().op_type == "MatMul"]


def _assert_split_experts(model: ir.Model, cfg: HybridConfig) -> None:
    """Every MoE node runs 2E half-experts, top-2k, and keeps its name."""
    moes = [n for n in model.graph.all_nodes() if n.op_type == "MoE"]
    assert len(moes) == cfg.num_layers
    for n in moes:
        assert n.name.endswith("/MoE/MoE"), n.name
        assert n.attributes.get_int("k") == 2 * cfg.num_experts_per_tok
        assert list(n.inputs[2].shape) == [2 * cfg.num_experts, cfg.intermediate_size, cfg.hidden_size]


def _dynamic_reshapes(model: ir.Model) -> list[str]:
    return [n.name for n in model.graph.all_nodes()
            if n.op_type == "Reshape" and n.inputs[1] is not None and n.inputs[1].const_value is None]


def _expected_counts(cfg: HybridConfig, logits: str = "all") -> dict[str, int]:
    n_mamba = cfg.layer_types.count(MAMBA)
    layers = cfg.num_layers
    return {
        "causal_conv": n_mamba, "ssm_scan": n_mamba, "attention": cfg.layer_types.count(ATTENTION),
        "moe": layers if cfg.has_experts else 0,
        # each layer's post-norm + the next layer's input norm (the final norm when logits="all")
        "skip_rms_norm": 2 * layers - (logits == "last"),
        # layer 0's input norm, each Mamba gated norm (+ the final norm after the last-position Slice)
        "rms_norm": 1 + n_mamba + (logits == "last"),
        "softplus": n_mamba,  # each Mamba layer's dt
        "router": layers if cfg.has_experts else 0,
        "moe_split": layers if cfg.has_experts else 0,
    }


# ----------------------------------------------------------------------------- tests
def test_portable_domain_is_the_kernels_domain() -> None:
    assert PORTABLE_DOMAIN == kernels.DOMAIN


def test_interleave_gate_up_layout() -> None:
    """fc1[e] rows are g0, u0, g1, u1, … of gate_up[e] = [D, gate | up]: the layout probed on the CPU kernel."""
    e, d, i = 2, 3, 4
    gu = np.arange(e * d * 2 * i, dtype=np.float32).reshape(e, d, 2 * i)
    fc1 = interleave_gate_up(gu)
    assert fc1.shape == (e, 2 * i, d)
    np.testing.assert_array_equal(fc1[:, 0::2, :], gu[..., :i].transpose(0, 2, 1))
    np.testing.assert_array_equal(fc1[:, 1::2, :], gu[..., i:].transpose(0, 2, 1))


@pytest.mark.parametrize("fusion", ALL_FUSIONS)
def test_each_fusion_fires_and_keeps_outputs(models: dict[str, Portable], fusion: str, tmp_path: Path) -> None:
    portable = models["test"]
    path, counts = _fused(portable, tmp_path, ("moe", fusion) if fusion in ("router", "moe_split") else (fusion,))
    expected = _expected_counts(portable.cfg)
    fired = {k: v for k, v in counts.items() if k != "cleanup" and v}
    if fusion in ("shapes", "fold"):  # how often they fire depends on the fusions before them
        assert fired and set(fired) <= {"static_reshape", "drop_reshape", "scale_fold"}, counts
    else:
        assert fired and all(expected[k] == v for k, v in fired.items()), (counts, expected)
    model = ir.load(path)
    gone, made = REPLACES[fusion]
    ops = _ops(model)
    assert not {(PORTABLE_DOMAIN, op) for op in gone} & ops
    assert all(any(op == o for _, o in ops) for op in made)
    if fusion == "norms":
        assert ("", "RMSNormalization") not in ops
    if fusion == "softplus":
        assert not _guarded_softplus(model)
    if fusion == "router":
        assert not _router_matmuls(model)
    if fusion == "moe_split":
        _assert_split_experts(model, portable.cfg)
    if fusion == "attention":  # no RoPE in "test": q, k, v come from one packed MatMul
        assert all(n.inputs[1] is None and n.inputs[2] is None for n in model.graph if n.op_type == "GroupQueryAttention")
    _compare(portable, path)


@pytest.mark.parametrize("name", ["test", "dense_g2"])
def test_fuse_all(models: dict[str, Portable], name: str, tmp_path: Path) -> None:
    portable = models[name]
    path, counts = _fused(portable, tmp_path, ALL_FUSIONS)
    print(counts)
    assert {k: v for k, v in counts.items() if k not in ("cleanup", "static_reshape", "drop_reshape", "scale_fold")} == \
        _expected_counts(portable.cfg)
    model = ir.load(path)
    # every Mamba layer's head split/merge reshapes get constant targets, and their Shape/Concat go
    left = _dynamic_reshapes(model)
    print("dynamic Reshape targets left:", left)
    assert counts["static_reshape"] >= 4 * portable.cfg.layer_types.count(MAMBA)
    assert not [n for n in left if "/mamba/" in n]
    # each Mamba layer: the gated-norm weight and the residual multiplier go into out_proj; each layer's
    # FFN residual multiplier goes into the shared MLP's (or dense MLP's) down weight and the experts' fc2
    cfg = portable.cfg
    assert counts["scale_fold"] >= 2 * cfg.layer_types.count(MAMBA) + cfg.num_layers
    for node in model.graph:
        if node.op_type == "MoE":
            assert [u.node.op_type for u in node.outputs[0].uses()] == ["Add"], node.name
    assert counts["drop_reshape"] >= 1
    # the scan kernel takes x as it is and gives y as it is (no reshape or expand around it): dt scales
    # the key, and D·x is computed on the packed layout
    for node in model.graph:
        if node.op_type == "LinearAttention":
            value = node.inputs[2].producer()
            assert value is not None and value.op_type == "Split", (node.name, value)
            assert "Reshape" not in {u.node.op_type for u in node.outputs[0].uses()}, node.name
    assert not [n.name for n in model.graph if n.op_type == "Expand" and "/mamba/" in n.name]
    assert not _router_matmuls(model)
    if cfg.has_experts:
        _assert_split_experts(model, cfg)
    assert all(n.inputs[1] is None for n in model.graph if n.op_type == "GroupQueryAttention")  # packed QKV
    ops = _ops(model)
    assert portable_calls(model) == [] and not model.functions
    assert not {op for _, op in ops} & {"Scan", "Loop", "RMSNormalization", "Div"}  # Div: logits_scaling in Gemm
    assert PORTABLE_DOMAIN not in model.opset_imports and ORT_DOMAIN in model.opset_imports
    # hierarchical names survive: the GQA node sits where the Attention call was
    gqa = [n.name for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert gqa and all(n.startswith(f"/model/layers.{i}/") for n, i in zip(gqa, portable.cfg.attention_layers))
    assert model.metadata_props["granite_onnx.fusions"]
    _compare(portable, path)
    # and as it will run: ONNX Runtime's own fusions on top must not change it either
    _compare(portable, path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)


def test_fuse_model_file_refuses_to_overwrite_its_source(models: dict[str, Portable]) -> None:
    with pytest.raises(ValueError, match="onto itself"):
        fuse_model_file(models["test"].path, models["test"].path)


def test_unknown_fusion_name() -> None:
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse_all(ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 23}), ir_version=10), fusions=("rope",))


# ----------------------------------------------------------- negative cases: graphs a check must refuse
def _value(name: str, dtype: ir.DataType, shape: tuple[int | str, ...]) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))


def _one_node(op_type: str, domain: str, inputs: list[ir.Value], n_out: int, attrs: dict | None = None,
              initializers: tuple[ir.Value, ...] = ()) -> ir.Model:
    node = ir.node(op_type, inputs, attributes=attrs or {}, domain=domain, num_outputs=n_out,
                   name=f"/model/layers.0/{op_type}")
    for i, out in enumerate(node.outputs):
        out.name = f"out{i}"
    graph = ir.Graph([v for v in inputs if v not in initializers], list(node.outputs), nodes=[node],
                     initializers=initializers, opset_imports={"": 23, PORTABLE_DOMAIN: 1})
    return ir.Model(graph, ir_version=10)


def _weight(name: str, shape: tuple[int, ...]) -> ir.Value:
    v = _value(name, ir.DataType.FLOAT, shape)
    v.const_value = ir.tensor(np.zeros(shape, np.float32), name=name)
    return v


F32, F64 = ir.DataType.FLOAT, ir.DataType.DOUBLE


def _refusal(fuse: Callable[[ir.Model], int], model: ir.Model, fusion: str) -> str:
    reasons = explain(model, fusions=(fusion,))
    count = fuse(model)
    print(count, reasons)
    assert count == 0
    assert len(reasons) == 1
    return next(iter(reasons.values()))


def test_conv_refuses_float64() -> None:
    x, past = _value("x", F64, ("b", 8, "t")), _value("past", F64, ("b", 8, 3))
    w, b = _value("w", F64, (8, 4)), _value("bias", F64, (8,))
    model = _one_node("CausalConv1d", PORTABLE_DOMAIN, [x, past, w, b], 2)
    assert "no ONNX Runtime CPU kernel" in _refusal(fuse_causal_conv, model, "scan")


def test_conv_refuses_a_state_that_is_not_k_minus_1_wide() -> None:
    x, past = _value("x", F32, ("b", 8, "t")), _value("past", F32, ("b", 8, 2))
    model = _one_node("CausalConv1d", PORTABLE_DOMAIN, [x, past, _weight("w", (8, 4)), _weight("bias", (8,))], 2)
    assert "K−1 = 3" in _refusal(fuse_causal_conv, model, "scan")


def test_scan_refuses_heads_not_a_multiple_of_groups() -> None:
    b, t = "b", "t"
    ins = [_value("x", F32, (b, t, 3, 8)), _value("dt", F32, (b, t, 3)), _value("A", F32, (3,)),
           _value("B", F32, (b, t, 2, 4)), _value("C", F32, (b, t, 2, 4)), _value("h0", F32, (b, 3, 4, 8))]
    model = _one_node("SSMScan", PORTABLE_DOMAIN, ins, 2, {"chunk_size": 16})
    assert "not a multiple of 2 groups" in _refusal(fuse_ssm_scan, model, "scan")


def test_moe_refuses_expert_weights_that_are_not_initializers() -> None:
    ins = [_value("x", F32, ("n", 8)), _value("router", F32, (8, 4)), _value("gate_up", F32, (4, 8, 12)),
           _value("down", F32, (4, 6, 8))]
    model = _one_node("MoE", PORTABLE_DOMAIN, ins, 1, {"top_k": 2})
    assert "not an initializer" in _refusal(fuse_moe, model, "moe")


def test_attention_refuses_query_heads_not_a_multiple_of_kv_heads() -> None:
    b, t, p = "b", "t", "p"
    ins = [_value("q", F32, (b, 3, t, 16)), _value("k", F32, (b, 2, t, 16)), _value("v", F32, (b, 2, t, 16)),
           _value("pk", F32, (b, 2, p, 16)), _value("pv", F32, (b, 2, p, 16)),
           _value("mask", ir.DataType.INT64, (b, "s"))]
    model = _one_node("Attention", PORTABLE_DOMAIN, ins, 3, {"scale": 0.5})
    assert "not a multiple of 2 key/value heads" in _refusal(fuse_attention, model, "attention")


def test_norm_refuses_a_norm_over_leading_axes() -> None:
    w = _weight("w", (5, 8))
    model = _one_node("RMSNormalization", "", [_value("x", F32, (2, 5, 8)), w], 1, {"axis": 1, "epsilon": 1e-3},
                      initializers=(w,))
    assert "only a last-axis norm" in _refusal(fuse_rms_norm, model, "norms")


def test_skip_norm_refuses_a_broadcasting_add() -> None:
    a, b = _value("a", F32, (1, 5, 8)), _value("b", F32, (2, 5, 8))
    w = _weight("w", (8,))
    add = ir.node("Add", [a, b], name="/model/Add")
    norm = ir.node("RMSNormalization", [add.outputs[0], w], attributes={"epsilon": 1e-3}, name="/model/RMSNorm")
    norm.outputs[0].name = "y"
    graph = ir.Graph([a, b], [norm.outputs[0]], nodes=[add, norm], initializers=[w], opset_imports={"": 23})
    model = ir.Model(graph, ir_version=10)
    reasons = explain(model, fusions=("norms",))
    assert "broadcasts" in reasons["/model/RMSNorm"]
    assert fuse_skip_rms_norm(model) == 0
    assert fuse_rms_norm(model) == 1  # the norm alone still fuses


def _reshape_model(x_shape: tuple, y_shape: tuple, source: ir.Value | None = None) -> ir.Model:
    """Reshape(x, Concat(Shape(source)[0:2], [4, 4])) — the traced form of `x.view(b, t, 4, 4)`."""
    x = _value("x", F32, x_shape)
    source = source or x
    shape = ir.node("Shape", [source], attributes={"start": 0, "end": 2}, name="/model/Shape")
    heads = ir.Value(name="heads", const_value=ir.tensor(np.array([4, 4], np.int64), name="heads"))
    target = ir.node("Concat", [shape.outputs[0], heads], attributes={"axis": 0}, name="/model/Concat")
    reshape = ir.node("Reshape", [x, target.outputs[0]], attributes={"allowzero": 1}, name="/model/Reshape")
    reshape.outputs[0].name, reshape.outputs[0].shape = "y", ir.Shape(y_shape)
    reshape.outputs[0].type = ir.TensorType(F32)
    inputs = [x] if source is x else [x, source]
    graph = ir.Graph(inputs, [reshape.outputs[0]], nodes=[shape, target, reshape], initializers=[heads],
                     opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


def test_static_reshape_gets_a_constant_target_with_the_same_outputs(tmp_path: Path) -> None:
    model = _reshape_model(("b", "t", 16), ("b", "t", 4, 4))
    before = tmp_path / "before.onnx"
    ir.save(model, before)
    assert fuse_static_shapes(model) == 1
    cleanup(model)
    assert {n.op_type for n in model.graph} == {"Reshape"}  # Shape and Concat fell out
    (node,) = model.graph
    assert node.inputs[1].const_value.numpy().tolist() == [0, 0, 4, 4]
    after = tmp_path / "after.onnx"
    ir.save(model, after)
    x = np.random.default_rng(0).standard_normal((3, 5, 16)).astype(np.float32)
    want = _session(before).run(None, {"x": x})[0]
    got = _session(after).run(None, {"x": x})[0]
    assert want.shape == got.shape == (3, 5, 4, 4) and np.array_equal(want, got)


def test_static_reshape_refuses_two_dims_it_cannot_tie_to_its_input() -> None:
    # [n, 16] → [b, t, 4, 4] with n = b·t: one -1 cannot stand for both b and t
    model = _reshape_model(("n", 16), ("b", "t", 4, 4), source=_value("s", F32, ("b", "t", 16)))
    (reshape,) = [n for n in model.graph if n.op_type == "Reshape"]
    target, why = static_target(reshape, DimClasses(model))
    assert target is None and "2 dims not shared" in why
    assert fuse_static_shapes(model) == 0


def _scaled_matmul_model(shared: bool) -> tuple[ir.Model, ir.Value]:
    """y = MatMul(Mul(x, s), W) · c (+ MatMul(x, W) when `shared`): the two scale folds' shapes."""
    rng = np.random.default_rng(3)
    x = _value("x", F32, ("b", "t", 8))
    s, c, w = (_weight(n, shape) for n, shape in (("s", (8,)), ("c", ()), ("W", (8, 6))))
    s.const_value = ir.tensor(rng.standard_normal(8).astype(np.float32), name="s")
    c.const_value = ir.tensor(np.float32(0.37), name="c")
    w.const_value = ir.tensor(rng.standard_normal((8, 6)).astype(np.float32), name="W")
    mul = ir.node("Mul", [x, s], name="/model/norm/Mul")
    mm = ir.node("MatMul", [mul.outputs[0], w], name="/model/out_proj/MatMul")
    scale = ir.node("Mul", [mm.outputs[0], c], name="/model/residual/Mul")
    other = ir.node("MatMul", [x, w], name="/model/other/MatMul") if shared else None
    return _graph_model([x], [mul, mm, scale], [scale.outputs[0]], [s, c, w], other), x


def test_scale_fold_moves_both_scales_into_the_weight(tmp_path: Path) -> None:
    model, _ = _scaled_matmul_model(shared=False)
    ir.save(model, tmp_path / "before.onnx")
    assert fuse_scale_fold(model) == 2
    cleanup(model)
    assert [n.op_type for n in model.graph] == ["MatMul"]
    ir.save(model, tmp_path / "after.onnx")
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    want = _session(tmp_path / "before.onnx").run(None, {"x": x})[0]
    got = _session(tmp_path / "after.onnx").run(None, {"x": x})[0]
    print("max |diff|", np.abs(want - got).max())
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_scale_fold_refuses_a_weight_another_node_reads() -> None:
    model, _ = _scaled_matmul_model(shared=True)
    reasons = explain(model, fusions=("fold",))
    assert any("read by 2 nodes" in r for r in reasons.values()), reasons
    assert fuse_scale_fold(model) == 0


def _softplus_model(threshold: float, dtype: ir.DataType = F32) -> ir.Model:
    """Where(Greater(x, t), x, Softplus(x)): torch's F.softplus as torch.onnx exports it."""
    x = _value("x", dtype, ("n",))
    t = _value("threshold", dtype, ())
    t.const_value = ir.tensor(np.asarray(threshold, dtype=dtype.numpy()), name="threshold")
    sp = ir.node("Softplus", [x], name="/model/layers.0/mamba/Softplus")
    gt = ir.node("Greater", [x, t], name="/model/layers.0/mamba/Greater")
    where = ir.node("Where", [gt.outputs[0], x, sp.outputs[0]], name="/model/layers.0/mamba/Where")
    where.outputs[0].name = "y"
    graph = ir.Graph([x], [where.outputs[0]], nodes=[sp, gt, where], initializers=[t], opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


def test_softplus_guard_goes_and_no_value_changes(tmp_path: Path) -> None:
    model = _softplus_model(20.0)
    ir.save(model, tmp_path / "before.onnx")
    assert fuse_softplus(model) == 1
    cleanup(model)
    assert [n.op_type for n in model.graph] == ["Softplus"]
    ir.save(model, tmp_path / "after.onnx")
    # both sides of the threshold, far negatives, overflow territory for a literal log(1 + exp(x))
    x = np.concatenate([np.linspace(-1e4, 1e4, 20001), np.linspace(-30, 30, 60001), np.linspace(17, 21, 4001),
                        [-3e38, -1e30, 88.7, 89.0, 1e4, 1e30, 3e38]]).astype(np.float32)
    want = _session(tmp_path / "before.onnx").run(None, {"x": x})[0]
    got = _session(tmp_path / "after.onnx").run(None, {"x": x})[0]
    assert np.isfinite(got).all()
    assert np.array_equal(got, want)  # exact: above 17, ORT's Softplus(x) rounds to x itself


def test_softplus_guard_stays_below_the_exact_bound_and_for_float16() -> None:
    assert "Softplus(x) ≠ x" in _refusal(fuse_softplus, _softplus_model(10.0), "softplus")
    assert "only float32" in _refusal(fuse_softplus, _softplus_model(20.0, ir.DataType.FLOAT16), "softplus")


def _ffn_model(shared_fc2: bool, unflatten: bool) -> ir.Model:
    """Mul(Add(MatMul(a, W), MoE(x, logits, fc1, –, fc2)), c): the FFN block's residual multiplier.
    `shared_fc2`: a second MoE reads the same fc2 (the fold must refuse); `unflatten`: the MoE output is
    reshaped before the Add, as before static_shapes runs."""
    rng = np.random.default_rng(5)
    e, d, i, s = 4, 8, 6, 10
    x, a, logits = _value("x", F32, ("n", d)), _value("a", F32, ("n", s)), _value("logits", F32, ("n", e))
    inits = [_weight("W", (s, d)), _weight("fc1", (e, 2 * i, d)), _weight("fc2", (e, d, i)), _weight("c", ())]
    for v in inits:
        v.const_value = ir.tensor(rng.standard_normal(v.shape.numpy()).astype(np.float32), name=v.name)
    w, fc1, fc2, c = inits
    attrs = {"k": 2, "activation_type": "swiglu", "normalize_routing_weights": 1, "swiglu_fusion": 1}
    mm = ir.node("MatMul", [a, w], name="/model/layers.0/ffn/MatMul_1")
    moe = ir.node("MoE", [x, logits, fc1, None, fc2], attributes=attrs, domain=ORT_DOMAIN,
                  name="/model/layers.0/ffn/MoE/MoE")
    nodes, experts = [mm, moe], moe.outputs[0]
    if unflatten:
        shape = _value("shape", ir.DataType.INT64, (2,))
        shape.const_value = ir.tensor(np.array([-1, d], np.int64), name="shape")
        inits.append(shape)
        nodes.append(ir.node("Reshape", [experts, shape], name="/model/layers.0/ffn/Reshape_1"))
        experts = nodes[-1].outputs[0]
    add = ir.node("Add", [mm.outputs[0], experts], name="/model/layers.0/ffn/Add")
    mul = ir.node("Mul", [add.outputs[0], c], name="/model/layers.0/Mul_1")
    other = (ir.node("MoE", [x, logits, fc1, None, fc2], attributes=attrs, domain=ORT_DOMAIN, name="/model/other/MoE")
             if shared_fc2 else None)
    return _graph_model([x, a, logits], [*nodes, add, mul], [mul.outputs[0]], inits, other,
                        {"": 23, ORT_DOMAIN: 1})


@pytest.mark.parametrize("unflatten", [False, True])
def test_scale_fold_moves_the_ffn_multiplier_into_both_down_weights(tmp_path: Path, unflatten: bool) -> None:
    model = _ffn_model(shared_fc2=False, unflatten=unflatten)
    ir.save(model, tmp_path / "before.onnx")
    assert fuse_scale_fold(model) == 1
    cleanup(model)
    assert "Mul" not in [n.op_type for n in model.graph]
    assert {n.name for n in model.graph} >= {"/model/layers.0/ffn/MatMul_1", "/model/layers.0/ffn/MoE/MoE"}
    ir.save(model, tmp_path / "after.onnx")
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((3, 8)).astype(np.float32), "a": rng.standard_normal((3, 10)).astype(np.float32),
             "logits": rng.standard_normal((3, 4)).astype(np.float32)}
    want = _session(tmp_path / "before.onnx").run(None, feeds)[0]
    got = _session(tmp_path / "after.onnx").run(None, feeds)[0]
    print("max |diff|", np.abs(want - got).max())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_scale_fold_refuses_experts_another_moe_reads() -> None:
    model = _ffn_model(shared_fc2=True, unflatten=False)
    reasons = explain(model, fusions=("fold",))
    assert any("fc2 is read by 2 nodes" in r for r in reasons.values()), reasons
    assert fuse_scale_fold(model) == 0


def _router_model(shared_router: bool) -> ir.Model:
    """The FFN input side: Split(MatMul(h, W), 2) for the shared MLP, MoE(h, MatMul(Reshape(h, [-1, D]), R)).
    `shared_router`: another node reads R (the merge must refuse)."""
    rng = np.random.default_rng(9)
    e, d, i, s = 4, 8, 6, 10
    h = _value("h", F32, ("b", "t", d))
    inits = [_weight("W", (d, 2 * s)), _weight("R", (d, e)), _weight("fc1", (e, 2 * i, d)), _weight("fc2", (e, d, i))]
    for v in inits:
        v.const_value = ir.tensor(rng.standard_normal(v.shape.numpy()).astype(np.float32), name=v.name)
    w, r, fc1, fc2 = inits
    flat_shape = _value("flat_shape", ir.DataType.INT64, (2,))
    flat_shape.const_value = ir.tensor(np.array([-1, d], np.int64), name="flat_shape")
    inits.append(flat_shape)
    mm = ir.node("MatMul", [h, w], name="/model/layers.0/ffn/MatMul")
    split = ir.node("Split", [mm.outputs[0]], attributes={"axis": -1, "num_outputs": 2}, num_outputs=2,
                    name="/model/layers.0/ffn/Split")
    flat = ir.node("Reshape", [h, flat_shape], name="/model/layers.0/ffn/Reshape")
    router = ir.node("MatMul", [flat.outputs[0], r], name="/model/layers.0/ffn/MoE/router")
    moe = ir.node("MoE", [flat.outputs[0], router.outputs[0], fc1, None, fc2], domain=ORT_DOMAIN,
                  attributes={"k": 2, "activation_type": "swiglu", "normalize_routing_weights": 1, "swiglu_fusion": 1},
                  name="/model/layers.0/ffn/MoE/MoE")
    other = ir.node("MatMul", [h, r], name="/model/other/MatMul") if shared_router else None
    return _graph_model([h], [mm, split, flat, router, moe], [*split.outputs, moe.outputs[0]], inits, other,
                        {"": 23, ORT_DOMAIN: 1})


def test_router_merges_into_the_shared_projection(tmp_path: Path) -> None:
    model = _router_model(shared_router=False)
    ir.save(model, tmp_path / "before.onnx")
    assert fuse_router(model) == 1
    cleanup(model)
    assert [n.op_type for n in model.graph].count("MatMul") == 1 and not _router_matmuls(model)
    ir.save(model, tmp_path / "after.onnx")
    h = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    want = _session(tmp_path / "before.onnx").run(None, {"h": h})
    got = _session(tmp_path / "after.onnx").run(None, {"h": h})
    for name, a, b in zip(("gate", "up", "moe"), want, got):
        print(name, "max |diff|", np.abs(a - b).max())
        np.testing.assert_array_equal(b, a)  # the same dot products


def test_router_refuses_a_router_weight_another_node_reads() -> None:
    assert "read by 2 nodes" in _refusal(fuse_router, _router_model(shared_router=True), "router")


def _head_model(divisor: ir.Value | None = None) -> tuple[ir.Model, float]:
    """Div(Reshape(Gemm(x, E, transB=1), [B, T, V]), s): the tied LM head and logits_scaling."""
    rng = np.random.default_rng(4)
    x = _value("x", F32, ("n", 8))
    emb = _weight("E", (12, 8))
    emb.const_value = ir.tensor(rng.standard_normal((12, 8)).astype(np.float32), name="E")
    shape = _value("shape", ir.DataType.INT64, (3,))
    shape.const_value = ir.tensor(np.array([-1, 1, 12], np.int64), name="shape")
    inits, inputs = [emb, shape], [x]
    if divisor is None:
        divisor = _weight("scaling", ())
        divisor.const_value = ir.tensor(np.float32(3.3), name="scaling")
        inits.append(divisor)
    else:
        inputs.append(divisor)
    gemm = ir.node("Gemm", [x, emb], attributes={"transB": 1}, name="/model/lm_head/Gemm")
    unflat = ir.node("Reshape", [gemm.outputs[0], shape], name="/model/head/Reshape_1")
    div = ir.node("Div", [unflat.outputs[0], divisor], name="/model/lm_head/Div")
    div.outputs[0].name = "logits"
    graph = ir.Graph(inputs, [div.outputs[0]], nodes=[gemm, unflat, div], initializers=inits, opset_imports={"": 23})
    return ir.Model(graph, ir_version=10), 3.3


def test_logits_scaling_goes_into_the_gemm_alpha(tmp_path: Path) -> None:
    model, scaling = _head_model()
    ir.save(model, tmp_path / "before.onnx")
    assert fuse_scale_fold(model) == 1
    cleanup(model)
    assert [n.op_type for n in model.graph] == ["Gemm", "Reshape"]
    (gemm,) = [n for n in model.graph if n.op_type == "Gemm"]
    assert gemm.attributes.get_float("alpha") == pytest.approx(1 / scaling)
    ir.save(model, tmp_path / "after.onnx")
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    want = _session(tmp_path / "before.onnx").run(None, {"x": x})[0]
    got = _session(tmp_path / "after.onnx").run(None, {"x": x})[0]
    print("max |diff|", np.abs(want - got).max())
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_logits_scaling_stays_when_it_is_not_a_constant() -> None:
    model, _ = _head_model(divisor=_value("scaling", F32, ()))
    reasons = explain(model, fusions=("fold",))
    assert any("not a constant float scalar" in r for r in reasons.values()), reasons
    assert fuse_scale_fold(model) == 0


def _moe_model(router_matmul: bool, inter: int = 6, attrs: dict | None = None) -> ir.Model:
    """com.microsoft.MoE as moe.py makes it; the logits from MatMul(x, R) or a graph input."""
    rng = np.random.default_rng(11)
    e, d = 5, 8
    x = _value("x", F32, ("n", d))
    inits = [_weight("fc1", (e, 2 * inter, d)), _weight("fc2", (e, d, inter))]
    inputs = [x]
    nodes = []
    if router_matmul:
        inits.append(_weight("R", (d, e)))
        router = ir.node("MatMul", [x, inits[-1]], name="/model/layers.0/ffn/MoE/router")
        nodes.append(router)
        logits = router.outputs[0]
    else:
        logits = _value("logits", F32, ("n", e))
        inputs.append(logits)
    for v in inits:
        v.const_value = ir.tensor(rng.standard_normal(v.shape.numpy()).astype(np.float32), name=v.name)
    attrs = attrs or {"k": 2, "activation_type": "swiglu", "normalize_routing_weights": 1, "swiglu_fusion": 1}
    moe = ir.node("MoE", [x, logits, inits[0], None, inits[1]], attributes=attrs, domain=ORT_DOMAIN,
                  name="/model/layers.0/ffn/MoE/MoE")
    moe.outputs[0].name = "y"
    nodes.append(moe)
    graph = ir.Graph(inputs, [moe.outputs[0]], nodes=nodes, initializers=inits, opset_imports={"": 23, ORT_DOMAIN: 1})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("router_matmul", [True, False])
def test_moe_split_into_half_experts_keeps_outputs(tmp_path: Path, router_matmul: bool) -> None:
    model = _moe_model(router_matmul)
    ir.save(model, tmp_path / "before.onnx")
    assert fuse_moe_split(model) == 1
    cleanup(model)
    ops = [n.op_type for n in model.graph]
    # the duplicated logits: the router weight's columns repeated, or a Concat of a logits input
    assert ops == (["MatMul", "MoE"] if router_matmul else ["Concat", "MoE"]), ops
    ir.save(model, tmp_path / "after.onnx")
    rng = np.random.default_rng(0)
    before, after = _session(tmp_path / "before.onnx"), _session(tmp_path / "after.onnx")
    for n in (1, 3, 7):  # a decode step, and tokens sharing experts (several rows per expert GEMM)
        feeds = {"x": rng.standard_normal((n, 8)).astype(np.float32)}
        if not router_matmul:
            feeds["logits"] = rng.standard_normal((n, 5)).astype(np.float32)
        want, got = before.run(None, feeds)[0], after.run(None, feeds)[0]
        print(n, "max |diff|", np.abs(want - got).max())
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_moe_split_refuses_odd_widths_and_a_clamped_swiglu() -> None:
    assert "not a multiple of 2" in _refusal(fuse_moe_split, _moe_model(False, inter=5), "moe_split")
    clamped = {"k": 2, "activation_type": "swiglu", "normalize_routing_weights": 1, "swiglu_fusion": 1,
               "swiglu_limit": 7.0}
    assert "swiglu_limit" in _refusal(fuse_moe_split, _moe_model(False, attrs=clamped), "moe_split")
