"""Trace each layer kind once, and each compute kernel once, from PyTorch into ONNX (torch.onnx, dynamo).

* `trace_layer(cfg, kind)` → an ONNX graph *template* for one decoder layer: activations and state are
  graph inputs/outputs, and so are the weights (inputs named `w:<param>`), so one trace serves every layer
  of that kind and the composer binds each layer's own weights (export/compose.py).
* `trace_kernel(cfg, name, attrs)` → an ONNX local function `granite_onnx.<name>` whose body is the
  torch kernel (models/kernels.py) in standard ONNX ops. The layer trace holds one call node per kernel.

Symbolic dims follow export/io.py.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir
import torch

from granite_onnx.export import io
from granite_onnx.models import kernels
from granite_onnx.models.config import ATTENTION, HybridConfig
from granite_onnx.models.layers import make_layer

log = logging.getLogger(__name__)

OPSET = 23
WEIGHT_PREFIX = "w:"


@dataclass
class LayerTemplate:
    kind: str
    graph: ir.Graph
    act_inputs: list[str]  # activation/state input names, in order
    weight_inputs: list[str]  # our parameter names, in order (graph input names are w:<name>)
    outputs: list[str]


class _Functional(torch.nn.Module):
    """Calls `module` with its parameters passed as inputs, so the trace keeps them as graph inputs."""

    def __init__(self, module: torch.nn.Module, n_act: int, names: list[str]) -> None:
        super().__init__()
        self.module, self.n_act, self.names = module, n_act, names

    def forward(self, *args: torch.Tensor) -> Any:
        acts, ws = args[: self.n_act], args[self.n_act:]
        return torch.func.functional_call(self.module, dict(zip(self.names, ws)), acts)


def _export(fn: torch.nn.Module, args: tuple[torch.Tensor, ...], names: list[str], outputs: list[str],
            dynamic: list[dict[int, Any] | None]) -> ir.Model:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for noisy in ("torch.onnx", "onnxscript", "onnx_ir"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        prog = torch.onnx.export(
            fn, args, dynamo=True, opset_version=OPSET, input_names=names, output_names=outputs,
            dynamic_shapes=(tuple(dynamic),), optimize=True, verbose=False, report=False,
        )
    return prog.model


def _dim(name: str, min: int = 1) -> Any:  # noqa: A002
    return torch.export.Dim(name, min=min, max=1 << 20)


def trace_layer(cfg: HybridConfig, kind: str, dtype: torch.dtype = torch.float32) -> LayerTemplate:
    """Trace one decoder layer of `kind` with example shapes; return its graph template.

    `dtype` is the model dtype (weights, activations, conv and K/V state); the SSM state stays float32.
    Traced on the meta device: weights are graph inputs, so no example weight is ever allocated and
    tracing a 600 MB MoE layer costs no more memory than a small one.
    """
    key = (_trace_key(cfg, kind), kind, dtype)
    if key not in _LAYER_CACHE:
        with torch.device("meta"):
            _LAYER_CACHE[key] = _trace_layer(cfg, kind, dtype)
    return _LAYER_CACHE[key]


# Traces are pure functions of the layer-relevant config fields: one process (a test session, a sweep of
# exports) traces each distinct layer kind once. Callers must not mutate the returned graphs.
_LAYER_CACHE: dict[Any, LayerTemplate] = {}
_KERNEL_CACHE: dict[Any, ir.Function] = {}


def _trace_key(cfg: HybridConfig, kind: str) -> HybridConfig:
    """`cfg` with every field that a decoder layer does not read set to a constant."""
    return dataclasses.replace(cfg, layer_types=(kind,), vocab_size=1, tie_word_embeddings=True, name="",
                               bos_token_id=None, eos_token_id=None, pad_token_id=None, max_position_embeddings=1,
                               logits_scaling=1.0, embedding_multiplier=1.0)


def _trace_layer(cfg: HybridConfig, kind: str, dtype: torch.dtype = torch.float32) -> LayerTemplate:
    layer = make_layer(cfg, kind).eval()
    names = [n for n, _ in layer.named_parameters()]
    weights = tuple(torch.empty(p.shape, dtype=dtype) for _, p in layer.named_parameters())
    b, t, past = 2, 5, 3
    batch, seq, pseq = _dim(io.BATCH), _dim(io.SEQUENCE), _dim(io.PAST_SEQUENCE, 0)
    hidden = torch.randn(b, t, cfg.hidden_size, dtype=dtype)
    if kind == ATTENTION:
        acts = (hidden, torch.ones(b, past + t, dtype=torch.int64), torch.arange(t).repeat(b, 1),
                torch.randn(b, cfg.num_key_value_heads, past, cfg.head_dim, dtype=dtype),
                torch.randn(b, cfg.num_key_value_heads, past, cfg.head_dim, dtype=dtype))
        act_names = ["hidden", io.ATTENTION_MASK, "position_ids", "past_key", "past_value"]
        out_names = ["hidden_out", "present_key", "present_value"]
        dyn: list[dict[int, Any] | None] = [
            {0: batch, 1: seq}, {0: batch, 1: torch.export.Dim.AUTO}, {0: batch, 1: seq},
            {0: batch, 2: pseq}, {0: batch, 2: pseq}]
    else:
        acts = (hidden, torch.ones(b, t),
                torch.randn(b, cfg.conv_dim, cfg.mamba_d_conv - 1, dtype=dtype),
                torch.randn(b, cfg.mamba_n_heads, cfg.mamba_d_state, cfg.mamba_d_head))
        act_names = ["hidden", "mask", "conv_state", "recurrent_state"]
        out_names = ["hidden_out", "present_conv_state", "present_recurrent_state"]
        dyn = [{0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch}, {0: batch}]
    dyn += [None] * len(weights)
    model = _export(_Functional(layer, len(acts), names), acts + weights,
                    act_names + [WEIGHT_PREFIX + n for n in names], out_names, dyn)
    return LayerTemplate(kind, model.graph, act_names, names, out_names)


def _kernel_examples(cfg: HybridConfig, name: str, dtype: torch.dtype = torch.float32,
                     ) -> tuple[tuple[torch.Tensor, ...], list[str], list[str], list[dict[int, Any] | None]]:
    """Example inputs of kernel `name` with the dtypes the layer modules call it with (dtype = model dtype)."""
    b, t, p = 2, 5, 3
    f32 = torch.float32
    batch, seq, pseq = _dim(io.BATCH), _dim(io.SEQUENCE), _dim(io.PAST_SEQUENCE, 0)
    if name == "CausalConv1d":
        c, k = cfg.conv_dim, cfg.mamba_d_conv
        args = (torch.randn(b, c, t, dtype=dtype), torch.randn(b, c, k - 1, dtype=dtype),
                torch.randn(c, k, dtype=dtype), torch.randn(c, dtype=dtype))
        return args, ["x", "past", "weight", "bias"], ["y", "present"], [{0: batch, 2: seq}, {0: batch}, None, None]
    if name == "SSMScan":
        h, pd, g, n = cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_n_groups, cfg.mamba_d_state
        args = (torch.randn(b, t, h, pd, dtype=dtype), torch.rand(b, t, h, dtype=f32), -torch.rand(h, dtype=f32),
                torch.randn(b, t, g, n, dtype=dtype), torch.randn(b, t, g, n, dtype=dtype),
                torch.randn(b, h, n, pd, dtype=f32))
        return (args, ["x", "dt", "A", "B", "C", "h0"], ["y", "h"],
                [{0: batch, 1: seq}, {0: batch, 1: seq}, None, {0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch}])
    if name == "MoE":
        d, e, i = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
        args = (torch.randn(b * t, d, dtype=dtype), torch.randn(d, e, dtype=dtype),
                torch.randn(e, d, 2 * i, dtype=dtype), torch.randn(e, i, d, dtype=dtype))
        return args, ["x", "router", "gate_up", "down"], ["y"], [{0: _dim("tokens")}, None, None, None]
    if name == "Attention":
        hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        args = (torch.randn(b, hq, t, hd, dtype=dtype), torch.randn(b, hkv, t, hd, dtype=dtype),
                torch.randn(b, hkv, t, hd, dtype=dtype), torch.randn(b, hkv, p, hd, dtype=dtype),
                torch.randn(b, hkv, p, hd, dtype=dtype), torch.ones(b, p + t, dtype=torch.int64))
        return (args, ["q", "k", "v", "past_key", "past_value", "mask"], ["out", "present_key", "present_value"],
                [{0: batch, 2: seq}, {0: batch, 2: seq}, {0: batch, 2: seq}, {0: batch, 2: pseq},
                 {0: batch, 2: pseq}, {0: batch, 1: torch.export.Dim.AUTO}])
    raise KeyError(name)


class _Kernel(torch.nn.Module):
    def __init__(self, name: str, attrs: dict[str, Any]) -> None:
        super().__init__()
        self.fn, self.attrs = kernels.KERNELS[name], attrs

    def forward(self, *args: torch.Tensor) -> Any:
        return self.fn(*args, **self.attrs)


def trace_kernel(cfg: HybridConfig, name: str, attrs: dict[str, Any], dtype: torch.dtype = torch.float32,
                 ) -> ir.Function:
    """The ONNX function `granite_onnx.<name>` whose body computes kernels.<name> with `attrs` baked in,
    for inputs in model dtype `dtype` (the body's casts and constants are typed)."""
    key = (_trace_key(cfg, "mamba"), name, tuple(sorted(attrs.items())), dtype)
    if key not in _KERNEL_CACHE:
        _KERNEL_CACHE[key] = _trace_kernel(cfg, name, attrs, dtype)
    return _KERNEL_CACHE[key]


def _trace_kernel(cfg: HybridConfig, name: str, attrs: dict[str, Any], dtype: torch.dtype) -> ir.Function:
    with torch.device("meta"):  # example inputs carry shapes only
        args, ins, outs, dyn = _kernel_examples(cfg, name, dtype)
        model = _export(_Kernel(name, attrs), args, ins, outs, dyn)
    g = model.graph
    # A function has no initializers: turn the traced constants into Constant nodes.
    consts = []
    for init_name, value in list(g.initializers.items()):
        node = ir.node("Constant", [], attributes={"value": value.const_value}, outputs=[ir.Value(name=init_name)])
        consts.append((value, node))
    for value, node in consts:
        g.initializers.pop(value.name)
        value.replace_all_uses_with(node.outputs[0])
        g.insert_before(g[0], node) if len(g) else g.append(node)
    # A function that takes the call node's attributes, with the traced values as defaults.
    fattrs = [ir.Attr(k, ir.AttributeType.INT if isinstance(v, int) else ir.AttributeType.FLOAT, v)
              for k, v in attrs.items()]
    return ir.Function(kernels.DOMAIN, name, graph=g, attributes=fattrs)
