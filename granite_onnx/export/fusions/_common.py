"""Helpers shared by the fusion rules: domains, shape reading, derived initializers, node names.

The fusions are torch-free (they run on a saved portable graph), so the portable domain is spelled
here rather than imported from models/kernels.py; tests/export/test_fusions.py checks they agree.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass
from onnxscript.rewriter import pattern

log = logging.getLogger(__name__)

PORTABLE_DOMAIN = "granite_onnx"  # == models.kernels.DOMAIN: the domain of the portable call nodes
ORT_DOMAIN = "com.microsoft"

# The float types ONNX Runtime's CPU kernels of these contrib ops are registered for (bfloat16 is
# CUDA-only for most of them, so a bfloat16 graph keeps its portable form).
CPU_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def infer_shapes(model: ir.Model) -> None:
    """Run ONNX shape inference in place (initializer data is never loaded: onnx_ir strips it first).

    The checks read static dims (heads, head_dim, d_state) that only shape inference supplies: the
    portable graph is composed from traced templates and carries no value_info of its own.
    """
    ShapeInferencePass(strict_mode=False)(model)


def apply(rules: pattern.RewriteRuleSet, model: ir.Model, *, infer: bool = True) -> int:
    """Apply `rules` once over the model; return how many times they fired."""
    if infer:
        infer_shapes(model)
    count = rules.apply_to_model(model)
    log.debug("%s fired %d times", rules, count)
    return count


def static_dims(value: ir.Value | None, rank: int) -> tuple[int | None, ...] | None:
    """The dims of `value` as ints (None where symbolic), or None when its rank is unknown or not `rank`."""
    if value is None or value.shape is None or value.shape.rank() != rank:
        return None
    return tuple(d if isinstance(d, int) else None for d in value.shape)


def dtype_of(*values: ir.Value | None) -> ir.DataType | None:
    """The common element type of `values`, or None if unknown or mixed."""
    types = {v.dtype for v in values if v is not None}
    return types.pop() if len(types) == 1 and None not in types else None


def check_float(result: pattern.MatchResult, what: str, *values: ir.Value | None) -> pattern.MatchResult:
    """Fail `result` unless every value has the same known float type with a CPU kernel."""
    dtype = dtype_of(*values)
    if dtype is None:
        names = ", ".join(f"{v.name}: {v.dtype}" for v in values if v is not None)
        return result.fail(f"{what}: element types unknown or mixed ({names}); run shape inference first")
    if dtype not in CPU_FLOAT_TYPES:
        return result.fail(f"{what}: element type {dtype} has no ONNX Runtime CPU kernel (float32/float16 only)")
    return result


def scope_of(value: ir.Value) -> str:
    """The node-name prefix of the node producing `value` (`/model/layers.3/.../SSMScan` → that string)."""
    node = value.producer()
    return node.name if node is not None and node.name else (value.name or "fused")


class Scoped:
    """Wraps a rewriter `op` so every node it makes is named `<prefix>/<what>` and so are its outputs.

    The portable graph's names are hierarchical (`/model/layers.3/mamba/...`); fused nodes keep that,
    so two graphs can still be diffed layer by layer.
    """

    def __init__(self, op: pattern.RewriterContext, prefix: str) -> None:
        self.op, self.prefix = op, prefix
        self._used: dict[str, int] = {}

    def __getattr__(self, op_type: str) -> Callable[..., ir.Value | Sequence[ir.Value]]:
        def make(*args: ir.Value | None, _what: str | None = None, _outputs: int = 1, **kwargs: object):
            base = f"{self.prefix}/{_what or op_type}"
            k = self._used.get(base, 0)
            self._used[base] = k + 1
            name = base if k == 0 else f"{base}_{k}"
            outs = [f"{name}/output_{i}" for i in range(_outputs)]
            return self.op.op(op_type, *args, _name=name, _outputs=outs, **kwargs)

        return make

    def ints(self, values: Sequence[int], what: str = "Constant") -> ir.Value:
        return self.Constant(_what=what, value=ir.tensor(np.asarray(values, dtype=np.int64)))

    def scalar(self, value: float | int, dtype: ir.DataType, what: str = "Constant") -> ir.Value:
        return self.Constant(_what=what, value=ir.tensor(np.asarray(value, dtype=dtype.numpy())))


def lazy_initializer(op: pattern.RewriterContext, name: str, shape: Sequence[int], dtype: ir.DataType,
                     compute: Callable[[], np.ndarray]) -> ir.Value:
    """A new initializer holding `compute()`, which runs only when the tensor is saved (or read): the
    rewrites' re-laid-out weights stay unmaterialised, so saving streams one tensor at a time."""

    def tensor() -> ir.Tensor:
        return ir.tensor(np.ascontiguousarray(compute()), name=name)

    return op.initializer(ir.LazyTensor(tensor, dtype=dtype, shape=ir.Shape(shape), name=name), name=name)


def concat_initializer(op: pattern.RewriterContext, name: str, values: Sequence[ir.Value], axis: int = 1) -> ir.Value:
    """A new initializer: the constants `values` concatenated along `axis` (a lazy_initializer)."""
    tensors = [v.const_value for v in values]
    shape = list(tensors[0].shape)
    shape[axis] = sum(t.shape[axis] for t in tensors)
    return lazy_initializer(op, name, shape, tensors[0].dtype,
                            lambda: np.concatenate([t.numpy() for t in tensors], axis=axis))


def derived_initializer(op: pattern.RewriterContext, source: ir.Value, name: str, shape: Sequence[int],
                        fn: Callable[[np.ndarray], np.ndarray]) -> ir.Value:
    """A new initializer `fn(source)`, computed only when it is saved (or read).

    The weights of a real model live in external data: `ir.LazyTensor` keeps the re-laid-out copy
    unmaterialised, so saving streams one tensor at a time instead of holding two models in memory.
    If the graph already holds `name` (two nodes sharing one weight), that initializer is reused.
    """
    graph = source.graph
    if graph is not None and name in graph.initializers:
        return graph.initializers[name]
    src = source.const_value
    assert src is not None, f"{source.name} is not a constant"
    return lazy_initializer(op, name, shape, src.dtype, lambda: fn(src.numpy()))
