"""Compose the whole model graph from the traced layer templates and stream weights to external data.

embed → layers[i] (template of its kind, bound to layer i's weights) → final norm → LM head, in one
graph with the inputs/outputs of the state contract (export/io.py). Weights are written to
`model.onnx.data` one layer at a time: peak memory is about one layer, not the model.

Node names are hierarchical and greppable: `/model/layers.3/mamba/MatMul_2`, values likewise, weights
`model.layers.3.mamba.in_proj`.
"""

from __future__ import annotations

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
        b.nodes.append(m)

def compose(cfg: HybridConfig, src: WeightSource, data_path: Path, *, logits: str = "last",
            progress: Callable[[str], None] | None = None) -> ComposeResult:
    """Build the portable graph; stream every weight into `data_path`. `logits`: 'last' or 'all'."""
    if logits not in ("last", "all"):
        raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
    say = progress or (lambda s: log.info(s))
    res = ComposeResult(model=onnx.ModelProto())
    t0 = time.perf_counter()
    templates: dict[str, LayerTemplate] = {}
    protos: dict[str, onnx.GraphProto] = {}
    for kind in dict.fromkeys(cfg.layer_types):
        t = time.perf_counter()
        say(f"tracing the {kind} layer")
        tpl = trace_layer(cfg, kind)
        templates[kind] = tpl
        protos[kind] = ir.serde.serialize_graph(tpl.graph)
        res.timings[f"trace_{kind}_s"] = time.perf_counter() - t
    res.traced_kinds = list(templates)
    # One function per kernel the templates call.
    functions: dict[str, onnx.FunctionProto] = {}
    for tpl in templates.values():
        for n in tpl.graph:
            if n.domain == kernels.DOMAIN and n.op_type not in functions:
                t = time.perf_counter()
                attrs = {k: a.value for k, a in n.attributes.items()}
                say(f"tracing the {n.op_type} kernel")
                functions[n.op_type] = ir.serde.serialize_function(trace_kernel(cfg, n.op_type, attrs))
                res.timings[f"trace_kernel_{n.op_type}_s"] = time.perf_counter() - t

    b = _Builder()
    w = ExternalDataWriter(data_path)
    try:
        # --- embedding
        b.inits.append(w.add("model.embed_tokens.weight", src.embed().numpy().astype(np.float32)))
        emb = b.node("Gather", ["model.embed_tokens.weight", io.INPUT_IDS], ["/model/embed/gather"],
                     "/model/embed/Gather")
        h = b.node("Mul", [emb, b.const("/model/embed/multiplier", cfg.embedding_multiplier, np.float32)],
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
            weights = src.layer(i)
            for name, tensor in weights.items():
                b.inits.append(w.add(f"model.layers.{i}.{name}", tensor.numpy().astype(np.float32)))
            del weights
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
            _instantiate(b, protos[kind], tpl, i, ins, outs)
            h = out
            res.timings[f"layer_{i}_s"] = time.perf_counter() - t
            say(f"layer {i + 1}/{cfg.num_layers} ({kind}) written")
        # --- final norm and LM head
        b.inits.append(w.add("model.norm.weight", src.final_norm().numpy().astype(np.float32)))
        if logits == "last":
            b.node("Slice", [h, b.const("/model/last/start", [-1]), big, one], ["/model/last/output"],
                   "/model/last/Slice")
            h = "/model/last/output"
        b.node("RMSNormalization", [h, "model.norm.weight"], ["/model/norm/output"], "/model/norm/RMSNormalization",
               epsilon=cfg.rms_norm_eps, axis=-1)
        head = src.lm_head()
        if head is None:
            head_name = "model.embed_tokens.weight"
        else:
            head_name = "lm_head.weight"
            b.inits.append(w.add(head_name, head.numpy().astype(np.float32)))
        b.node("Shape", ["/model/norm/output"], ["/model/head/lead"], "/model/head/Shape", start=0, end=2)
        b.node("Reshape", ["/model/norm/output", b.const("/model/head/flat", [-1, cfg.hidden_size])],
               ["/model/head/flat_in"], "/model/head/Reshape")
        b.node("Gemm", ["/model/head/flat_in", head_name], ["/model/head/gemm"], "/model/lm_head/Gemm", transB=1)
        b.node("Concat", ["/model/head/lead", b.const("/model/head/vocab", [cfg.vocab_size])],
               ["/model/head/shape"], "/model/head/Concat", axis=0)
        b.node("Reshape", ["/model/head/gemm", "/model/head/shape"], ["/model/head/logits"], "/model/head/Reshape_1")
        b.node("Div", ["/model/head/logits", b.const("/model/head/scaling", cfg.logits_scaling, np.float32)],
               [io.LOGITS], "/model/lm_head/Div")
    finally:
        w.close()

    # --- graph I/O
    def vi(name: str, dtype: int, shape: tuple[Any, ...]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, dtype, list(shape))

    inputs = [vi(io.INPUT_IDS, TensorProto.INT64, (io.BATCH, io.SEQUENCE)),
              vi(io.ATTENTION_MASK, TensorProto.INT64, (io.BATCH, io.TOTAL_SEQUENCE))]
    inputs += [vi(s.past_name, TensorProto.FLOAT, s.shape) for s in io.state_specs(cfg)]
    kept = 1 if logits == "last" else io.SEQUENCE
    outputs = [vi(io.LOGITS, TensorProto.FLOAT, (io.BATCH, kept, cfg.vocab_size))]
    outputs += [vi(s.present_name, TensorProto.FLOAT, s.shape) for s in io.state_specs(cfg, present=True)]
    graph = helper.make_graph(b.nodes, "granite_hybrid", inputs, outputs, initializer=b.inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(kernels.DOMAIN, 1)],
        producer_name="granite-onnx", functions=list(functions.values()),
    )
    model.ir_version = 11
    res.model = model
    res.timings["compose_s"] = time.perf_counter() - t0
    return res

