"""Compose the whole model graph from the traced layer templates and stream weights to external data.

embed → layers[i] (template of its kind, bound to layer i's weights) → final norm → LM head, in one
graph with the inputs/outputs of the state contract (export/io.py). Weights are written to
`model.onnx.data` one layer at a time: peak memory is about one layer, not the model.

A `WeightFormat` (export/precision.py) sets the compute dtype the layers are traced in and how the big
weights are stored: with `--quant`, each layer's nodes and float weights go through
`quantize.Quantizer` before its tensors are written, so quantization is streamed too.

Node names are hierarchical and greppable: `/model/layers.3/mamba/MatMul_2`, values likewise, weights
`model.layers.3.mamba.in_proj`.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from granite_onnx.export import io
from granite_onnx.export.precision import WeightFormat
from granite_onnx.export.quantize import EMBED, LM_HEAD, ORT_DOMAIN, Quantizer, np_dtype
from granite_onnx.export.trace import OPSET, WEIGHT_PREFIX, LayerTemplate, trace_kernel, trace_layer
from granite_onnx.models import kernels
from granite_onnx.models.config import ATTENTION, HybridConfig
from granite_onnx.models.weights import WeightSource

log = logging.getLogger(__name__)

DATA_FILE = "model.onnx.data"
_ALIGN = 64

class ExternalDataWriter:
    """Appends tensors to one external-data file and returns TensorProtos that point into it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "wb")
        self.offset = 0

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        pad = (-self.offset) % _ALIGN
        if pad:
            self._f.write(b"\0" * pad)
            self.offset += pad
        data = np.ascontiguousarray(array)
        buf = data.tobytes()
        self._f.write(buf)
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(data.dtype), dims=list(data.shape))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(len(buf)))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.offset += len(buf)
        return t

    def close(self) -> None:
        self._f.flush()
        self._f.close()

@dataclass
class ComposeResult:
    model: onnx.ModelProto
    timings: dict[str, float] = field(default_factory=dict)
    traced_kinds: list[str] = field(default_factory=list)

def _const(name: str, arr: Any, dtype: Any = np.int64) -> TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(arr, dtype=dtype), name)

class _Builder:
    """Small helper that appends nodes with hierarchical names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.value_info: dict[str, onnx.ValueInfoProto] = {}  # traced types/shapes, by (renamed) value name
        self._n = 0

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "",
             **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs[0]

    def const(self, name: str, arr: Any, dtype: Any = np.int64) -> str:
        self.inits.append(_const(name, arr, dtype))
        return name

def _instantiate(b: _Builder, tpl_proto: onnx.GraphProto, tpl: LayerTemplate, i: int,
                 bind_inputs: dict[str, str], bind_outputs: dict[str, str]) -> None:
    """Copy template nodes for layer i, renaming values and binding inputs/outputs/weights."""
    prefix = f"/model/layers.{i}"
    rename: dict[str, str] = {"": ""}
    rename.update(bind_inputs)
    for w in tpl.weight_inputs:
        rename[WEIGHT_PREFIX + w] = f"model.layers.{i}.{w}"
    for init in tpl_proto.initializer:  # small traced constants: one copy per layer
        new = f"{prefix}/{init.name}"
        rename[init.name] = new
        c = TensorProto()
        c.CopyFrom(init)
        c.name = new
        b.inits.append(c)
    rename.update(bind_outputs)
    traced_info = {v.name: v for v in tpl_proto.value_info}
    counts: dict[str, int] = {}
    for n in tpl_proto.node:
        scope = ""
        for p in n.metadata_props:
            if p.key == "pkg.torch.onnx.name_scopes":
                parts = [s for s in p.value.strip("[]").replace("'", "").split(", ") if s]
                scope = "/".join(parts[:-1])
        key = f"{scope}/{n.op_type}"
        k = counts.get(key, 0)
        counts[key] = k + 1
        m = onnx.NodeProto()
        m.CopyFrom(n)
        del m.metadata_props[:]
        m.name = f"{prefix}/{scope + '/' if scope else ''}{n.op_type}" + (f"_{k}" if k else "")
        for j, x in enumerate(m.input):
            m.input[j] = rename.setdefault(x, f"{prefix}/{x}")
        for j, y in enumerate(m.output):
            m.output[j] = rename.setdefault(y, f"{prefix}/{y}")
            if y in traced_info:
                vi = onnx.ValueInfoProto()
                vi.CopyFrom(traced_info[y])
                vi.name = m.output[j]
                b.value_info[vi.name] = vi
        b.nodes.append(m)

@functools.lru_cache(maxsize=16)
def _traced_layer(cfg: HybridConfig, kind: str, dtype: Any) -> tuple[LayerTemplate, onnx.GraphProto]:
    """trace_layer, once per process for each (config, kind, dtype): exporting one model in several
    formats (tools/bench_quant.py, the tests) re-traces only when the compute dtype changes."""
    tpl = trace_layer(cfg, kind, dtype)
    return tpl, ir.serde.serialize_graph(tpl.graph)


@functools.lru_cache(maxsize=32)
def _traced_kernel(cfg: HybridConfig, name: str, attrs: tuple[tuple[str, Any], ...], dtype: Any) -> onnx.FunctionProto:
    return ir.serde.serialize_function(trace_kernel(cfg, name, dict(attrs), dtype))


def _torch_dtype(fmt: WeightFormat) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[fmt.precision]


def compose(cfg: HybridConfig, src: WeightSource, data_path: Path, *, logits: str = "last",
            progress: Callable[[str], None] | None = None, fmt: WeightFormat | None = None) -> ComposeResult:
    """Build the graph; stream every weight into `data_path`. `logits`: 'last' or 'all'.

    `fmt` (default fp32, no quantization) sets the compute dtype and the weight storage.
    """
    if logits not in ("last", "all"):
        raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
    fmt = fmt or WeightFormat()
    say = progress or (lambda s: log.info(s))
    res = ComposeResult(model=onnx.ModelProto())
    dtype = np_dtype(fmt)
    onnx_dtype = helper.np_dtype_to_tensor_dtype(dtype)
    quant = Quantizer(fmt)
    quantized = fmt.quant != "none"
    t0 = time.perf_counter()
    templates: dict[str, LayerTemplate] = {}
    protos: dict[str, onnx.GraphProto] = {}
    for kind in dict.fromkeys(cfg.layer_types):
        t = time.perf_counter()
        say(f"tracing the {kind} layer" + ("" if fmt.precision == "fp32" else f" in {fmt.precision}"))
        templates[kind], protos[kind] = _traced_layer(cfg, kind, _torch_dtype(fmt))
        res.timings[f"trace_{kind}_s"] = time.perf_counter() - t
    res.traced_kinds = list(templates)
    kernel_attrs: dict[str, dict[str, Any]] = {}
    for tpl in templates.values():
        for n in tpl.graph:
            if n.domain == kernels.DOMAIN:
                kernel_attrs.setdefault(n.op_type, {k: a.value for k, a in n.attributes.items()})

    def write(name: str, array: np.ndarray) -> None:
        b.inits.append(w.add(name, array))

    b = _Builder()
    w = ExternalDataWriter(data_path)
    try:
        # --- embedding (tied to the LM head unless the source has its own head)
        embed = src.embed().numpy()
        head = src.lm_head()
        shared = quantized and fmt.quant != "fp8" and fmt.embedding == "shared" and head is None
        head_q = quantized and fmt.quant != "fp8" and fmt.embedding != "float"
        qt: dict[str, np.ndarray] = {}
        if shared:
            quant.embedding(embed, qt)
            for name, arr in qt.items():
                write(name, arr)
            b.node("GatherBlockQuantized", [f"{EMBED}.qweight", io.INPUT_IDS, f"{EMBED}.gather_scales"],
                   ["/model/embed/gather_blocks"], "/model/embed/GatherBlockQuantized", domain=ORT_DOMAIN,
                   gather_axis=0, quantize_axis=2, block_size=fmt.block_size, bits=fmt.embed_bits)
            # [B, T, D/bs, bs] → [B, T, D]
            emb = b.node("Reshape", ["/model/embed/gather_blocks", b.const("/model/embed/shape", [0, 0, cfg.hidden_size])],
                         ["/model/embed/gather"], "/model/embed/Reshape")
        else:
            write(EMBED, embed.astype(dtype))
            emb = b.node("Gather", [EMBED, io.INPUT_IDS], ["/model/embed/gather"], "/model/embed/Gather")
        h = b.node("Mul", [emb, b.const("/model/embed/multiplier", cfg.embedding_multiplier, dtype)],
                   ["/model/embed/output"], "/model/embed/Mul")
        # --- per-step masks shared by all layers
        b.node("Shape", [io.INPUT_IDS], ["/model/seq_len"], "/model/mask/Shape", start=1, end=2)
        b.node("Neg", ["/model/seq_len"], ["/model/neg_seq_len"], "/model/mask/Neg")
        big = b.const("/model/mask/int_max", [np.iinfo(np.int64).max])
        one = b.const("/model/mask/axis1", [1])
        b.node("Slice", [io.ATTENTION_MASK, "/model/neg_seq_len", big, one], ["/model/mask/new"],
               "/model/mask/Slice")
        b.node("Cast", ["/model/mask/new"], ["/model/mask/new_f"], "/model/mask/Cast", to=TensorProto.FLOAT)
        if ATTENTION in cfg.layer_types:
            b.node("CumSum", [io.ATTENTION_MASK, b.const("/model/pos/axis", 1)], ["/model/pos/cumsum"],
                   "/model/pos/CumSum")
            b.node("Sub", ["/model/pos/cumsum", b.const("/model/pos/one", 1)], ["/model/pos/sub"], "/model/pos/Sub")
            b.node("Max", ["/model/pos/sub", b.const("/model/pos/zero", 0)], ["/model/pos/all"], "/model/pos/Max")
            b.node("Slice", ["/model/pos/all", "/model/neg_seq_len", big, one], ["/model/position_ids"],
                   "/model/pos/Slice")
        # --- layers
        for i, kind in enumerate(cfg.layer_types):
            t = time.perf_counter()
            weights = {f"model.layers.{i}.{name}": tensor.numpy() for name, tensor in src.layer(i).items()}
            tpl = templates[kind]
            out = f"/model/layers.{i}/output"
            if kind == ATTENTION:
                ins = {"hidden": h, io.ATTENTION_MASK: io.ATTENTION_MASK, "position_ids": "/model/position_ids",
                       "past_key": io.PAST_KEY % i, "past_value": io.PAST_VALUE % i}
                outs = {"hidden_out": out, "present_key": io.PRESENT_KEY % i, "present_value": io.PRESENT_VALUE % i}
            else:
                ins = {"hidden": h, "mask": "/model/mask/new_f", "conv_state": io.PAST_CONV % i,
                       "recurrent_state": io.PAST_RECURRENT % i}
                outs = {"hidden_out": out, "present_conv_state": io.PRESENT_CONV % i,
                        "present_recurrent_state": io.PRESENT_RECURRENT % i}
            start = len(b.nodes)
            _instantiate(b, protos[kind], tpl, i, ins, outs)
            consumed: set[str] = set()
            if quantized:
                getters = {name: (lambda a=a: a) for name, a in weights.items()}
                b.nodes[start:], qt, consumed = quant.rewrite(b.nodes[start:], getters)
                for name, arr in qt.items():
                    write(name, arr)
                del qt
            for name, arr in weights.items():
                if name not in consumed:
                    write(name, arr.astype(dtype))
            del weights
            h = out
            res.timings[f"layer_{i}_s"] = time.perf_counter() - t
            say(f"layer {i + 1}/{cfg.num_layers} ({kind}) written")
        # --- final norm and LM head
        write("model.norm.weight", src.final_norm().numpy().astype(dtype))
        if logits == "last":
            b.node("Slice", [h, b.const("/model/last/start", [-1]), big, one], ["/model/last/output"],
                   "/model/last/Slice")
            h = "/model/last/output"
        b.node("RMSNormalization", [h, "model.norm.weight"], ["/model/norm/output"], "/model/norm/RMSNormalization",
               epsilon=cfg.rms_norm_eps, axis=-1)
        if head_q:
            if shared:
                head_name = EMBED
            else:
                head_name = LM_HEAD
                qt = {}
                quant.head(embed if head is None else head.numpy(), head_name, qt)
                for name, arr in qt.items():
                    write(name, arr)
            b.nodes.append(quant.quantized_head_node("/model/norm/output", "/model/head/logits", head_name,
                                                     cfg.hidden_size, cfg.vocab_size, "/model/lm_head/MatMulNBits"))
        else:
            if head is None:
                head_name = EMBED
            else:
                head_name = LM_HEAD
                write(head_name, head.numpy().astype(dtype))
            b.node("Shape", ["/model/norm/output"], ["/model/head/lead"], "/model/head/Shape", start=0, end=2)
            b.node("Reshape", ["/model/norm/output", b.const("/model/head/flat", [-1, cfg.hidden_size])],
                   ["/model/head/flat_in"], "/model/head/Reshape")
            b.node("Gemm", ["/model/head/flat_in", head_name], ["/model/head/gemm"], "/model/lm_head/Gemm", transB=1)
            b.node("Concat", ["/model/head/lead", b.const("/model/head/vocab", [cfg.vocab_size])],
                   ["/model/head/shape"], "/model/head/Concat", axis=0)
            b.node("Reshape", ["/model/head/gemm", "/model/head/shape"], ["/model/head/logits"], "/model/head/Reshape_1")
        del embed
        scores = "/model/head/logits"
        if fmt.precision != "fp32":  # logits are float32 at every precision (the state contract)
            scores = b.node("Cast", [scores], ["/model/head/logits_f32"], "/model/head/Cast", to=TensorProto.FLOAT)
        b.node("Div", [scores, b.const("/model/head/scaling", cfg.logits_scaling, np.float32)],
               [io.LOGITS], "/model/lm_head/Div")
    finally:
        w.close()

    # One function per kernel that is still called (quantization replaces the MoE calls with QMoE).
    functions: dict[str, onnx.FunctionProto] = {}
    for name in dict.fromkeys(n.op_type for n in b.nodes if n.domain == kernels.DOMAIN):
        t = time.perf_counter()
        say(f"tracing the {name} kernel")
        functions[name] = _traced_kernel(cfg, name, tuple(sorted(kernel_attrs[name].items())), _torch_dtype(fmt))
        res.timings[f"trace_kernel_{name}_s"] = time.perf_counter() - t

    # --- graph I/O
    def vi(name: str, dtype: int, shape: tuple[Any, ...]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, dtype, list(shape))

    def state_type(s: io.StateSpec) -> int:
        return TensorProto.FLOAT if s.float32_always else onnx_dtype

    inputs = [vi(io.INPUT_IDS, TensorProto.INT64, (io.BATCH, io.SEQUENCE)),
              vi(io.ATTENTION_MASK, TensorProto.INT64, (io.BATCH, io.TOTAL_SEQUENCE))]
    inputs += [vi(s.past_name, state_type(s), s.shape) for s in io.state_specs(cfg)]
    kept = 1 if logits == "last" else io.SEQUENCE
    outputs = [vi(io.LOGITS, TensorProto.FLOAT, (io.BATCH, kept, cfg.vocab_size))]
    outputs += [vi(s.present_name, state_type(s), s.shape) for s in io.state_specs(cfg, present=True)]
    # ONNX shape inference knows no contrib op: give the outputs of those we emit their traced type and
    # shape, so that inference (and the fusions' checks, which read static dims) continues past them.
    b.value_info["/model/embed/gather"] = vi("/model/embed/gather", onnx_dtype,
                                             (io.BATCH, io.SEQUENCE, cfg.hidden_size))
    b.value_info["/model/head/logits"] = vi("/model/head/logits", onnx_dtype, (io.BATCH, kept, cfg.vocab_size))
    io_names = {v.name for v in inputs + outputs}
    typed = {y for n in b.nodes if n.domain == ORT_DOMAIN for y in n.output} | {"/model/embed/gather"}
    value_info = [v for name, v in b.value_info.items() if name in typed and name not in io_names]
    graph = helper.make_graph(b.nodes, "granite_hybrid", inputs, outputs, initializer=b.inits, value_info=value_info)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(kernels.DOMAIN, 1)]
    if any(n.domain == ORT_DOMAIN for n in b.nodes):
        opsets.append(helper.make_opsetid(ORT_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="granite-onnx",
                              functions=list(functions.values()))
    model.ir_version = 11
    res.model = model
    res.timings["compose_s"] = time.perf_counter() - t0
    return res
