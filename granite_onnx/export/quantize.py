"""Weight-only quantization, streamed: one layer's weights at a time, never the float model in memory.

The composer (compose.py) hands each layer's nodes and float weights to `Quantizer.rewrite`, which
returns the nodes rewritten for the weight format and the tensors to write in place of the float
weights; `quantize_model_file` runs the same rewrite over a saved model folder (`granite-onnx optimize
--quant`), reading one initializer at a time. Formats and what runs where: export/precision.py.

The packing is ONNX Runtime's own: `quantize_matmul_{4,8}bits` (the C++ kernels behind
onnxruntime/quantization/matmul_nbits_quantizer.py), round-to-nearest, symmetric (no zero points: the
kernels' default zero point 2^(bits−1) is implied), one float scale per `block_size` input features.

| weight (our layout)                 | becomes                                                            |
|-------------------------------------|--------------------------------------------------------------------|
| linear W [K, N] in MatMul(x, W)     | MatMulNBits(x, W.qweight [N, K/bs, bs·bits/8], W.scales [N, K/bs])   |
| experts gate_up [E, D, 2I], down [E, I, D] in granite_onnx.MoE | MatMul(x, router) + QMoE: fc1 [E, 2I, D·bits/8] with gate/up rows interleaved (g0, u0, g1, …; swiglu_fusion=1, the only CPU layout), scales [E, 2I, D/bs]; fc2 [E, D, I·bits/8], scales [E, D, I/bs] |
| tied embedding E [V, D]             | E.qweight [V, D/bs, bs·bits/8] read by GatherBlockQuantized (input ids) and by the MatMulNBits LM head |
| fp8: linear W                       | MatMulBlockQuantizedFp8Weight(x, e4m3 [N, K], scales [N, ⌈K/bs⌉])   |
| fp8: experts                        | QMoE(quant_type="fp8"): e4m3 [E, N, K], square-block scales [E, ⌈N/bs⌉, ⌈K/bs⌉] |

Probed on ONNX Runtime 1.32 CPU against numpy dequantized references (tests/export/test_quantize.py):
MatMulNBits and 4-bit block-wise QMoE equal x @ dequantize(W) to float rounding. Kernel choices, from
a single-token micro-benchmark at Granite-Tiny widths (2 threads, D=1536, 62 experts, top-6):

* MatMulNBits 8-bit with float activations (accuracy_level 0) dequantizes per call: 245 ms for a
  1536×6448 weight vs 20 ms for float32 MatMul. With accuracy_level=4 (activations quantized to int8
  per block on the fly) it takes 1.2 ms. int8 therefore uses accuracy_level 4.
* MatMulNBits 4-bit: 1.3 ms at level 0, 0.4 ms at level 4 (default 4; accuracy measured in BENCHMARKS.md).
* QMoE 4-bit block-wise: 0.27 ms at level 0, 1.0 ms at level 4 → level 0 (float activations, exact).
* QMoE 8-bit block-wise has no float-activation CPU kernel: it always quantizes activations to int8
  (0.5 ms; ~2% of the output's scale vs x @ dequantize(W)). Column-wise 8-bit QMoE keeps float
  activations but takes 18 ms — slower than the float MoE's sparse kernel — so int8 stays block-wise.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from onnx import NodeProto, helper

from granite_onnx.export.precision import FormatError, WeightFormat
from granite_onnx.models.config import HybridConfig

log = logging.getLogger(__name__)

ORT_DOMAIN = "com.microsoft"
PORTABLE_DOMAIN = "granite_onnx"  # == models.kernels.DOMAIN (imported lazily there: that module needs torch)

# Our parameter names (models/layers.py) of the linear layers that are quantized. The router stays in the
# precision dtype: it is tiny (D × E) and routing decisions are sensitive to it.
LINEAR_WEIGHTS = ("mamba.in_proj", "mamba.out_proj", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                  "ffn.shared_in", "ffn.shared_out")
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
FP8_MAX = 448.0  # largest finite float8 e4m3fn

_LAYER_PREFIX = re.compile(r"^model\.layers\.\d+\.")


def leaf_name(weight: str) -> str:
    """`model.layers.3.mamba.in_proj` → `mamba.in_proj`."""
    return _LAYER_PREFIX.sub("", weight)


def np_dtype(fmt: WeightFormat) -> np.dtype:
    if fmt.precision == "bf16":
        import ml_dtypes  # onnx's own dependency

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(fmt.dtype)


def default_accuracy_level(fmt: WeightFormat, op: str) -> int:
    """MatMulNBits/QMoE accuracy_level used when fmt.accuracy_level is None (see the module docstring)."""
    if fmt.accuracy_level is not None:
        return fmt.accuracy_level
    if op == "MatMulNBits":
        return 4
    return 0


# ------------------------------------------------------------------------------------------ kernels
@dataclass
class QuantizedLinear:
    """MatMulNBits' view of a weight W [K, N]: qweight [N, K/bs, bs·bits/8] uint8, scales [N, K/bs] float32."""

    qweight: np.ndarray
    scales: np.ndarray
    k: int
    n: int
    bits: int
    block_size: int


def quantize_linear(w: np.ndarray, bits: int, block_size: int) -> QuantizedLinear:
    """Quantize W [K, N] (the B of MatMul(x, W)) block-wise along K with ONNX Runtime's kernels.

    Symmetric: q = round(w / s) + 2^(bits−1), s = the block's signed absolute maximum / −2^(bits−1).
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    w = np.ascontiguousarray(w, dtype=np.float32)
    k, n = w.shape
    if k % block_size:
        raise FormatError(f"a weight with {k} input features cannot be cut into blocks of {block_size}")
    kb, blob = k // block_size, block_size * bits // 8
    packed = np.zeros((n, kb, blob), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    zero_points = np.zeros((n, (kb * bits + 7) // 8), np.uint8)  # unused when symmetric
    fn = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}[bits]
    fn(packed, w, scales, zero_points, block_size, n, k, True)
    return QuantizedLinear(packed, scales, k, n, bits, block_size)


def dequantize_linear(q: QuantizedLinear) -> np.ndarray:
    """The float32 W [K, N] that MatMulNBits multiplies by: the reference the tests compare kernels with."""
    n, kb, blob = q.qweight.shape
    if q.bits == 4:
        codes = np.stack([q.qweight & 0x0F, q.qweight >> 4], axis=-1).reshape(n, kb, q.block_size)
    else:
        codes = q.qweight.reshape(n, kb, q.block_size)
    zero = 1 << (q.bits - 1)
    w = (codes.astype(np.float32) - zero) * q.scales[..., None]
    return np.ascontiguousarray(w.reshape(n, q.k).T)


def interleave_gate_up(gate_up: np.ndarray) -> np.ndarray:
    """[..., D, 2I] with columns [gate | up] → [..., D, 2I] with columns g0, u0, g1, u1, …"""
    i = gate_up.shape[-1] // 2
    return np.stack([gate_up[..., :i], gate_up[..., i:]], axis=-1).reshape(gate_up.shape)


def deinterleave_gate_up(w: np.ndarray) -> np.ndarray:
    return np.concatenate([w[..., 0::2], w[..., 1::2]], axis=-1)


@dataclass
class QuantizedExperts:
    """QMoE's int weights: fc1 [E, 2I, D·bits/8] (gate/up interleaved), fc2 [E, D, I·bits/8], scales per block."""

    fc1: np.ndarray
    fc1_scales: np.ndarray
    fc2: np.ndarray
    fc2_scales: np.ndarray
    bits: int
    block_size: int


def quantize_experts(gate_up: np.ndarray, down: np.ndarray, bits: int, block_size: int) -> QuantizedExperts:
    """Our experts (gate_up [E, D, 2I], down [E, I, D]) → QMoE's block-wise int layout, one expert at a time."""
    e = gate_up.shape[0]
    fc1, s1, fc2, s2 = [], [], [], []
    for j in range(e):
        q1 = quantize_linear(interleave_gate_up(gate_up[j]), bits, block_size)  # K = D, N = 2I
        q2 = quantize_linear(down[j], bits, block_size)  # K = I, N = D
        fc1.append(q1.qweight.reshape(q1.n, -1))
        s1.append(q1.scales)
        fc2.append(q2.qweight.reshape(q2.n, -1))
        s2.append(q2.scales)
    return QuantizedExperts(np.stack(fc1), np.stack(s1), np.stack(fc2), np.stack(s2), bits, block_size)


def dequantize_experts(q: QuantizedExperts) -> tuple[np.ndarray, np.ndarray]:
    """(gate_up [E, D, 2I], down [E, I, D]) as QMoE multiplies by them."""
    gu, dn = [], []
    bs = q.block_size
    for j in range(q.fc1.shape[0]):
        n1, d = q.fc1.shape[1], q.fc1_scales.shape[2] * bs
        w1 = dequantize_linear(QuantizedLinear(q.fc1[j].reshape(n1, d // bs, -1), q.fc1_scales[j], d, n1, q.bits, bs))
        gu.append(deinterleave_gate_up(w1))
        n2, i = q.fc2.shape[1], q.fc2_scales.shape[2] * bs
        dn.append(dequantize_linear(QuantizedLinear(q.fc2[j].reshape(n2, i // bs, -1), q.fc2_scales[j], i, n2,
                                                    q.bits, bs)))
    return np.stack(gu), np.stack(dn)


def quantize_fp8(w_nk: np.ndarray, block_size: int, *, square: bool) -> tuple[np.ndarray, np.ndarray]:
    """float8 e4m3fn weights [..., N, K] with float32 scales per block.

    square=False: one scale per (row, block of K) → [..., N, ⌈K/bs⌉] (MatMulBlockQuantizedFp8Weight).
    square=True: one scale per bs×bs tile → [..., ⌈N/bs⌉, ⌈K/bs⌉] (block-scaled QMoE fp8).
    """
    import ml_dtypes

    w = np.asarray(w_nk, np.float32)
    *lead, n, k = w.shape
    kb, nb = -(-k // block_size), -(-n // block_size)
    wp = np.pad(w, [(0, 0)] * len(lead) + [(0, nb * block_size - n if square else 0), (0, kb * block_size - k)])
    if square:
        tiles = wp.reshape(*lead, nb, block_size, kb, block_size)
        amax = np.abs(tiles).max(axis=(-3, -1))  # [..., nb, kb]
        scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
        q = tiles / scale[..., :, None, :, None]
        q = q.reshape(*lead, nb * block_size, kb * block_size)[..., :n, :k]
    else:
        blocks = wp.reshape(*lead, n, kb, block_size)
        amax = np.abs(blocks).max(axis=-1)  # [..., n, kb]
        scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
        q = (blocks / scale[..., None]).reshape(*lead, n, kb * block_size)[..., :k]
    return np.clip(q, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn), scale


# ------------------------------------------------------------------------------- model checks
def quantized_widths(cfg: HybridConfig, fmt: WeightFormat) -> dict[str, int]:
    """Input width K of every kind of weight the format quantizes (blocks run along K)."""
    if fmt.quant == "none":
        return {}
    k: dict[str, int] = {}
    d = cfg.hidden_size
    if "mamba" in cfg.layer_types:
        k["mamba.in_proj (hidden_size)"] = d
        k["mamba.out_proj (mamba_expand × hidden_size)"] = cfg.mamba_d_inner
    if "attention" in cfg.layer_types:
        k["attn.q/k/v_proj (hidden_size)"] = d
        k["attn.o_proj (heads × head_dim)"] = cfg.num_attention_heads * cfg.head_dim
    k["ffn.shared_in (hidden_size)"] = d
    k["ffn.shared_out (shared_intermediate_size)"] = cfg.shared_intermediate_size
    if cfg.has_experts:
        k["experts fc1 (hidden_size)"] = d
        k["experts fc2 (intermediate_size)"] = cfg.intermediate_size
    if fmt.quant != "fp8" and fmt.embedding != "float":
        k["embedding / LM head (hidden_size)"] = d
    return k


def check_model(cfg: HybridConfig, fmt: WeightFormat) -> None:
    """Raise FormatError when the format's block size cannot cut every quantized weight of `cfg`.

    FP8 takes partial edge blocks, so only the integer formats need K % block_size == 0.
    """
    if fmt.quant in ("none", "fp8"):
        return
    widths = quantized_widths(cfg, fmt)
    bs = fmt.block_size
    bad = {name: k for name, k in widths.items() if k % bs}
    if not bad:
        return
    g = math.gcd(*widths.values())
    best = 1 << (g.bit_length() - 1) if g else 0
    while best and g % best:
        best >>= 1
    name, k = next(iter(bad.items()))
    if k < bs:
        what = f"{name} has only {k} input features, fewer than --block-size {bs}: too small to quantize"
    else:
        what = f"--block-size {bs} does not divide the {k} input features of {name}"
    fix = (f"use --block-size {best}" if best >= 16 else
           f"this model's widths ({', '.join(str(v) for v in sorted(set(widths.values())))}) have no common "
           "power-of-two block ≥ 16: export it with --quant none")
    others = "" if len(bad) == 1 else f" (also: {', '.join(list(bad)[1:])})"
    raise FormatError(f"{fmt.quant}: {what}{others}; every quantized weight is cut into blocks along its input "
                      f"features; {fix}")


def estimate_bytes(cfg: HybridConfig, fmt: WeightFormat) -> int:
    """Approximate size of model.onnx.data in `fmt` (for the free-disk check)."""
    total = cfg.num_parameters()
    elem = {"fp32": 4, "fp16": 2, "bf16": 2}[fmt.precision]
    if fmt.quant == "none":
        return total * elem
    per = fmt.bits / 8 + (elem / fmt.block_size if fmt.quant != "fp8" else 4 / fmt.block_size)
    return int(total * per + (cfg.vocab_size * cfg.hidden_size * elem if fmt.embedding == "head" else 0))


# ------------------------------------------------------------------------------------ rewrite
WeightGetter = Callable[[str], np.ndarray]


class Quantizer:
    """Rewrites nodes for a weight format and produces the tensors that replace their float weights.

    `rewrite(nodes, weights)` looks at `nodes` (one layer, or a whole graph) and the float weights it may
    read (`weights`: name → getter, called at most once per weight, so a caller can stream them); it
    returns the new node list, the new tensors {name: array} and the names of the float weights they
    replace (the caller must not write those). A weight also read by a node that is not rewritten stays.
    """

    def __init__(self, fmt: WeightFormat) -> None:
        self.fmt = fmt
        self.dtype = np_dtype(fmt)

    # -- helpers
    def _scales(self, s: np.ndarray) -> np.ndarray:
        return s.astype(self.dtype)  # MatMulNBits/QMoE/GatherBlockQuantized: scales in the activation dtype

    def rewrite(self, nodes: list[NodeProto], weights: Mapping[str, WeightGetter],
                ) -> tuple[list[NodeProto], dict[str, np.ndarray], set[str]]:
        if self.fmt.quant == "none":
            return nodes, {}, set()
        readers: dict[str, int] = {}
        for n in nodes:
            for x in n.input:
                if x in weights:
                    readers[x] = readers.get(x, 0) + 1
        out: list[NodeProto] = []
        tensors: dict[str, np.ndarray] = {}
        consumed: set[str] = set()
        for n in nodes:
            new = None
            if n.op_type == "MatMul" and n.domain == "" and self._is_linear(n.input[1], weights, readers):
                new = self._linear(n, weights[n.input[1]](), tensors)
                consumed.add(n.input[1])
            elif n.op_type == "MoE" and n.domain in (PORTABLE_DOMAIN, ORT_DOMAIN) and \
                    all(readers.get(x) == 1 for x in self._expert_inputs(n)):
                new = self._experts(n, weights, tensors)
                consumed.update(self._expert_inputs(n))
            out.extend(new if new is not None else [n])
        return out, tensors, consumed

    @staticmethod
    def _is_linear(name: str, weights: Mapping[str, WeightGetter], readers: Mapping[str, int]) -> bool:
        return name in weights and leaf_name(name) in LINEAR_WEIGHTS and readers.get(name) == 1

    @staticmethod
    def _expert_inputs(n: NodeProto) -> list[str]:
        # portable call: (x, router, gate_up, down); fused com.microsoft.MoE: (x, logits, fc1, fc1_bias, fc2, ...)
        return [n.input[2], n.input[3]] if n.domain == PORTABLE_DOMAIN else [n.input[2], n.input[4]]

    def _linear(self, n: NodeProto, w: np.ndarray, tensors: dict[str, np.ndarray]) -> list[NodeProto]:
        fmt, name = self.fmt, n.input[1]
        k, nn = w.shape
        if fmt.quant == "fp8":
            q, s = quantize_fp8(w.T, fmt.block_size, square=False)
            tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = q, s  # fp8 scales are float32 always
            return [helper.make_node("MatMulBlockQuantizedFp8Weight", [n.input[0], f"{name}.qweight", f"{name}.scales"],
                                     list(n.output), name=_renamed(n.name, "MatMul", "MatMulFp8"), domain=ORT_DOMAIN,
                                     block_size=fmt.block_size)]
        q = quantize_linear(w, fmt.bits, fmt.block_size)
        tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = q.qweight, self._scales(q.scales)
        return [helper.make_node("MatMulNBits", [n.input[0], f"{name}.qweight", f"{name}.scales"], list(n.output),
                                 name=_renamed(n.name, "MatMul", "MatMulNBits"), domain=ORT_DOMAIN, K=k, N=nn,
                                 bits=fmt.bits, block_size=fmt.block_size,
                                 accuracy_level=default_accuracy_level(fmt, "MatMulNBits"))]

    def _experts(self, n: NodeProto, weights: Mapping[str, WeightGetter], tensors: dict[str, np.ndarray],
                 ) -> list[NodeProto]:
        fmt = self.fmt
        nodes: list[NodeProto] = []
        if n.domain == PORTABLE_DOMAIN:
            x, router, gu_name, dn_name = n.input[:4]
            top_k = next(a.i for a in n.attribute if a.name == "top_k")
            gate_up, down = weights[gu_name](), weights[dn_name]()  # [E, D, 2I], [E, I, D]
            logits = f"{n.output[0]}/router_logits"
            nodes.append(helper.make_node("MatMul", [x, router], [logits], name=_renamed(n.name, "MoE", "router/MatMul")))
            prefix = gu_name.rsplit(".", 1)[0]
        else:  # already fused: fc1 [E, 2I, D] interleaved rows, fc2 [E, D, I] (out × in)
            x, logits = n.input[0], n.input[1]
            top_k = next(a.i for a in n.attribute if a.name == "k")
            fc1, fc2 = weights[n.input[2]](), weights[n.input[4]]()
            gate_up = deinterleave_gate_up(fc1.transpose(0, 2, 1))
            down = fc2.transpose(0, 2, 1)
            prefix = n.input[2].rsplit(".", 1)[0]
        names = {k: f"{prefix}.experts_{k}" for k in ("fc1", "fc1_scales", "fc2", "fc2_scales")}
        attrs: dict[str, object] = dict(k=top_k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
                                        activation_alpha=1.0, activation_beta=0.0, block_size=fmt.block_size)
        if fmt.quant == "fp8":
            # row-major [E, N, K] e4m3 with square-block scales; gate/up rows interleaved as for int
            q1, s1 = quantize_fp8(interleave_gate_up(gate_up).transpose(0, 2, 1), fmt.block_size, square=True)
            q2, s2 = quantize_fp8(down.transpose(0, 2, 1), fmt.block_size, square=True)
            tensors.update({names["fc1"]: q1, names["fc1_scales"]: s1, names["fc2"]: q2, names["fc2_scales"]: s2})
            attrs["quant_type"] = "fp8"
        else:
            q = quantize_experts(gate_up, down, fmt.bits, fmt.block_size)
            tensors.update({names["fc1"]: q.fc1, names["fc1_scales"]: self._scales(q.fc1_scales),
                            names["fc2"]: q.fc2, names["fc2_scales"]: self._scales(q.fc2_scales)})
            attrs["expert_weight_bits"] = fmt.bits
            level = default_accuracy_level(fmt, "QMoE")
            if level:
                attrs["accuracy_level"] = level
        del gate_up, down
        nodes.append(helper.make_node("QMoE", [x, logits, names["fc1"], names["fc1_scales"], "", names["fc2"],
                                               names["fc2_scales"]], list(n.output),
                                      name=_renamed(n.name, "MoE", "QMoE"), domain=ORT_DOMAIN, **attrs))
        return nodes

    # -- the tied embedding / LM head (compose builds these nodes itself)
    def embedding(self, embed: np.ndarray, tensors: dict[str, np.ndarray]) -> QuantizedLinear:
        """Quantize E [V, D] along D once, for GatherBlockQuantized and the MatMulNBits head alike."""
        q = quantize_linear(embed.T, self.fmt.embed_bits, self.fmt.block_size)  # W = Eᵀ [K=D, N=V] → qweight [V, D/bs, blob]
        tensors[f"{EMBED}.qweight"] = q.qweight
        tensors[f"{EMBED}.scales"] = self._scales(q.scales)  # [V, D/bs] for the head
        tensors[f"{EMBED}.gather_scales"] = self._scales(q.scales[..., None])  # [V, D/bs, 1]: GBQ's rank-3 view
        return q

    def quantized_head_node(self, h: str, out: str, head: str, k: int, n: int, name: str) -> NodeProto:
        return helper.make_node("MatMulNBits", [h, f"{head}.qweight", f"{head}.scales"], [out], name=name,
                                domain=ORT_DOMAIN, K=k, N=n, bits=self.fmt.embed_bits, block_size=self.fmt.block_size,
                                accuracy_level=default_accuracy_level(self.fmt, "MatMulNBits"))

    def head(self, w: np.ndarray, name: str, tensors: dict[str, np.ndarray]) -> QuantizedLinear:
        """An untied LM head [V, D] (or a tied one kept apart from the float gather): qweight + scales."""
        q = quantize_linear(w.T, self.fmt.embed_bits, self.fmt.block_size)
        tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = q.qweight, self._scales(q.scales)
        return q


def _renamed(name: str, old: str, new: str) -> str:
    """`/model/layers.3/mamba/MatMul_2` → `/model/layers.3/mamba/MatMulNBits_2` (names stay greppable)."""
    head, sep, last = name.rpartition("/")
    return f"{head}{sep}{last.replace(old, new, 1) if old in last else new + '_' + last}"


def used_functions(nodes: Iterable[NodeProto], domain: str) -> set[str]:
    return {n.op_type for n in nodes if n.domain == domain}


# --------------------------------------------------------------------- a saved model folder
def _external_reader(tensor: "onnx.TensorProto", base: Path) -> WeightGetter:  # noqa: F821
    """A getter that memory-maps one external initializer (read only when called)."""
    from onnx import helper as h

    info = {e.key: e.value for e in tensor.external_data}
    dtype = h.tensor_dtype_to_np_dtype(tensor.data_type)
    shape = tuple(tensor.dims)

    def get() -> np.ndarray:
        arr = np.memmap(base / info["location"], dtype=dtype, mode="r", offset=int(info.get("offset", 0)),
                        shape=shape)
        return np.asarray(arr, dtype=np.float32)

    return get


def quantize_model_file(in_path: Path, out_path: Path, fmt: WeightFormat) -> dict[str, int]:
    """Quantize a saved float32 model.onnx (portable or fused) into `out_path` (+ `model.onnx.data`).

    Streams: nodes are rewritten one layer at a time and every tensor is read from the input's external
    data only when it is written, so peak memory is about one layer. Returns how many nodes of each
    kind were replaced. The precision is not changed (that needs a re-trace: `granite-onnx export`).
    """
    import onnx
    from onnx import TensorProto

    from granite_onnx.export.compose import DATA_FILE, ExternalDataWriter

    in_path, out_path = Path(in_path), Path(out_path)
    model = onnx.load(str(in_path), load_external_data=False)
    # ONNX shape inference knows no contrib op: keep the float graph's inferred types of the values the
    # contrib nodes will produce, so that inference (and the fusions' checks) continues past them.
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    g = model.graph
    external = {t.name: t for t in g.initializer if t.data_location == TensorProto.EXTERNAL}
    getters = {name: _external_reader(t, in_path.parent) for name, t in external.items()}
    quant = Quantizer(fmt)
    writer = ExternalDataWriter(out_path.parent / DATA_FILE)
    written: list[TensorProto] = []
    consumed_all: set[str] = set()
    counts = {"matmul_nbits": 0, "qmoe": 0, "embedding": 0, "lm_head": 0}
    new_nodes: list[NodeProto] = []
    try:
        # contiguous runs of one layer's nodes, so that one layer's quantized tensors are in memory at a time
        runs: list[list[NodeProto]] = []
        last = None
        for n in g.node:
            m = re.match(r"^/model/layers\.(\d+)/", n.name)
            key = m.group(1) if m else None
            if key is None or key != last:
                runs.append([])
            runs[-1].append(n)
            last = key
        for run in runs:
            nodes, tensors, consumed = quant.rewrite(run, getters)
            counts["matmul_nbits"] += sum(n.op_type in ("MatMulNBits", "MatMulBlockQuantizedFp8Weight") for n in nodes)
            counts["qmoe"] += sum(n.op_type == "QMoE" for n in nodes)
            for name, arr in tensors.items():
                written.append(writer.add(name, arr))
            consumed_all |= consumed
            new_nodes.extend(nodes)
        new_nodes = _quantize_embedding(new_nodes, getters, quant, writer, written, consumed_all, counts)
        for name, t in external.items():
            if name not in consumed_all:
                written.append(writer.add(name, getters[name]().astype(np_dtype(fmt))
                                          if t.data_type == TensorProto.FLOAT else _raw(t, in_path.parent)))
    finally:
        writer.close()
    inline = [t for t in g.initializer if t.data_location != TensorProto.EXTERNAL]
    del g.initializer[:]
    g.initializer.extend(inline + written)
    del g.node[:]
    g.node.extend(new_nodes)
    have = {v.name for v in g.value_info}
    for n in new_nodes:
        if n.domain == ORT_DOMAIN or n.op_type == "Reshape" and n.name.endswith("/Gather/Reshape"):
            g.value_info.extend(inferred[y] for y in n.output if y in inferred and y not in have)
    if not any(o.domain == ORT_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(ORT_DOMAIN, 1))
    onnx.save(model, str(out_path))
    return counts


def _raw(t: "onnx.TensorProto", base: Path) -> np.ndarray:  # noqa: F821
    from onnx import helper as h

    info = {e.key: e.value for e in t.external_data}
    return np.array(np.memmap(base / info["location"], dtype=h.tensor_dtype_to_np_dtype(t.data_type), mode="r",
                              offset=int(info.get("offset", 0)), shape=tuple(t.dims)))


def _quantize_embedding(nodes: list[NodeProto], getters: Mapping[str, WeightGetter], quant: Quantizer,
                        writer: object, written: list, consumed: set[str], counts: dict[str, int]) -> list[NodeProto]:
    """Gather(E, ids) → GatherBlockQuantized + Reshape, Gemm(x, E, transB=1) → MatMulNBits (shared tensor)."""
    fmt = quant.fmt
    if fmt.quant == "fp8" or fmt.embedding == "float" or EMBED not in getters:
        return nodes
    gathers = [n for n in nodes if n.op_type == "Gather" and n.input[0] == EMBED]
    heads = [n for n in nodes if n.op_type == "Gemm" and n.input[1] == EMBED]
    readers = [n for n in nodes if EMBED in n.input]
    if len(gathers) != 1 or len(heads) != 1 or len(readers) != 2 or fmt.embedding != "shared":
        return nodes  # an untied or unusual layout: leave the embedding in float
    embed = getters[EMBED]()
    tensors: dict[str, np.ndarray] = {}
    q = quant.embedding(embed, tensors)
    del embed
    for name, arr in tensors.items():
        written.append(writer.add(name, arr))  # type: ignore[attr-defined]
    consumed.add(EMBED)
    d = q.k
    out: list[NodeProto] = []
    for n in nodes:
        if n is gathers[0]:
            blocks = f"{n.output[0]}/blocks"
            shape = f"{n.output[0]}/shape"
            out.append(helper.make_node("Constant", [], [shape], name=f"{n.name}/shape",
                                        value=helper.make_tensor(shape, 7, [3], [0, 0, d])))
            out.append(helper.make_node("GatherBlockQuantized", [f"{EMBED}.qweight", n.input[1], f"{EMBED}.gather_scales"],
                                        [blocks], name=_renamed(n.name, "Gather", "GatherBlockQuantized"),
                                        domain=ORT_DOMAIN, gather_axis=0, quantize_axis=2,
                                        block_size=fmt.block_size, bits=fmt.embed_bits))
            out.append(helper.make_node("Reshape", [blocks, shape], list(n.output), name=f"{n.name}/Reshape"))
            counts["embedding"] += 1
        elif n is heads[0]:
            # a fused graph's head Gemm may carry logits_scaling as alpha (fusions/scale_fold.py): keep it
            alpha = next((a.f for a in n.attribute if a.name == "alpha"), 1.0)
            head_out = n.output[0] if alpha == 1.0 else f"{n.output[0]}/unscaled"
            out.append(quant.quantized_head_node(n.input[0], head_out, EMBED, d, q.n,
                                                 _renamed(n.name, "Gemm", "MatMulNBits")))
            if alpha != 1.0:
                scale = f"{n.name}/alpha"
                out.append(helper.make_node("Constant", [], [scale], name=f"{n.name}/alpha",
                                            value=helper.make_tensor(scale, helper.np_dtype_to_tensor_dtype(
                                                np_dtype(fmt)), [], [alpha])))
                out.append(helper.make_node("Mul", [head_out, scale], list(n.output), name=f"{n.name}/alpha_Mul"))
            counts["lm_head"] += 1
        else:
            out.append(n)
    return out


def optimize_with_format(in_dir: str | Path, out_dir: str | Path, *, precision: str | None = None,
                         quant: str = "none", block_size: int = 0, overwrite: bool = False) -> dict:
    """`granite-onnx optimize IN OUT --quant ...`: quantize a float32 folder, then fuse it (if portable).

    Written atomically like every model folder. The precision of a folder cannot change here (it is
    the dtype its layers were traced in): asking for another one is an error that says to re-export.
    """
    from granite_onnx.export.exporter import GRANITE_CONFIG, MODEL_FILE, ExportError
    from granite_onnx.models.config import HybridConfig

    src, out = Path(in_dir), Path(out_dir)
    if not (src / MODEL_FILE).exists() or not (src / GRANITE_CONFIG).exists():
        raise ExportError(f"{src} is not a granite-onnx model folder (no {MODEL_FILE}/{GRANITE_CONFIG})")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it")
    meta = json.loads((src / GRANITE_CONFIG).read_text())
    have = WeightFormat.from_meta(meta)
    if precision is not None and precision != have.precision:
        raise ExportError(f"{src} computes in {have.precision}; changing the precision to {precision} re-traces the "
                          f"layers: re-export with `granite-onnx export ... --precision {precision}`")
    if have.quant != "none":
        raise ExportError(f"{src} is already quantized ({have.describe()}); quantize a float folder")
    try:
        fmt = WeightFormat(precision=have.precision, quant=quant, block_size=block_size)
        check_model(HybridConfig.from_json_dict(meta["config"]), fmt)
    except FormatError as e:
        raise ExportError(str(e)) from None
    if fmt.quant == "none":
        from granite_onnx.export.optimize import optimize_folder

        return optimize_folder(src, out, overwrite=overwrite)
    from granite_onnx.export.folder import atomic_folder

    if meta.get("graph") == "fused":
        why = _split_experts_problem(src / MODEL_FILE, fmt)
        if why:
            raise ExportError(why)
        with atomic_folder(out, overwrite=overwrite, tag="quant") as tmp:
            report = _quantize_into(src, tmp, meta, fmt)
        return report
    # A portable folder: quantize beside it, then fuse into `out` (optimize_folder writes atomically).
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent if str(out.parent) else ".", prefix=f".{out.name}.quant-") as t:
        _quantize_into(src, Path(t), meta, fmt)
        from granite_onnx.export.optimize import optimize_folder

        return optimize_folder(Path(t), out, overwrite=overwrite)


def _split_experts_problem(model_path: Path, fmt: WeightFormat) -> str | None:
    """Why `fmt` cannot quantize the experts of a fused graph, or None.

    A fused graph's MoE experts are split in halves of their intermediate units (fusions/moe_split.py):
    fc2 then has I/2 input features, which the block size must divide too (check_model checks I).
    """
    if fmt.quant in ("none", "fp8"):
        return None
    m = onnx_load_no_data(model_path)
    dims = {t.name: list(t.dims) for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "MoE" and n.domain == ORT_DOMAIN and len(n.input) > 4 and n.input[4] in dims:
            k = dims[n.input[4]][-1]
            if k % fmt.block_size:
                return (f"{fmt.quant}: --block-size {fmt.block_size} does not divide the {k} input features of the "
                        f"fused experts' down projection ({n.name}: experts split in halves for decode speed); "
                        "quantize the portable folder instead (`granite-onnx export --portable`, then "
                        "`granite-onnx optimize --quant`), or pick a block size that divides " + str(k))
    return None


def _quantize_into(src: Path, tmp: Path, meta: dict[str, Any], fmt: WeightFormat) -> dict[str, Any]:
    from granite_onnx.export.exporter import GRANITE_CONFIG, MODEL_FILE, REPORT, op_histogram

    counts = quantize_model_file(src / MODEL_FILE, tmp / MODEL_FILE, fmt)
    for f in src.iterdir():
        if f.is_file() and f.name not in (MODEL_FILE, "model.onnx.data"):
            shutil.copy2(f, tmp / f.name)
    meta["weights"] = fmt.to_json()
    (tmp / GRANITE_CONFIG).write_text(json.dumps(meta, indent=2))
    report = json.loads((src / REPORT).read_text()) if (src / REPORT).exists() else {}
    report.update({"weights": fmt.to_json(), "quantize_counts": counts,
                   "op_histogram": op_histogram(onnx_load_no_data(tmp / MODEL_FILE))})
    (tmp / REPORT).write_text(json.dumps(report, indent=2))
    return report


def onnx_load_no_data(path: Path) -> "onnx.ModelProto":  # noqa: F821
    import onnx

    return onnx.load(str(path), load_external_data=False)
