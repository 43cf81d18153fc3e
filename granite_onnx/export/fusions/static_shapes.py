"""Static Reshape targets: a Reshape whose target shape the traced graph computes at run time
(Shape → Concat, per layer) gets a constant target instead, with 0 ("copy this input dim") for the
dims it shares with its input and -1 for at most one other dynamic dim.

Why: the traced layers rebuild every target shape from `Shape` of some tensor on each step. At decode
widths those little Shape/Concat/Reshape kernels cost as much as real work (≈ 17 % of a fused
`small` decode step); with constant targets the shape subgraphs become dead and cleanup removes them.

torch exports `allowzero=1`; the rewrite sets `allowzero=0` (the target it writes holds no literal 0).
Soundness rests on ONNX's symbolic shape inference: the same symbol at the same axis of the input and
the output is the same run-time value, so 0 (copy, `allowzero=0`) reproduces it, and the product of the
dims makes a single remaining dim exact through -1. A Reshape whose output has two dims that the input
does not share at the same axis keeps its dynamic target (check says why).

ONNX's shape inference knows nothing of the contrib ops the other fusions produce, so their outputs
lose the batch/sequence symbols. `annotate_contrib_shapes` restores them from each op's definition
(output shape = one input's shape) before the symbols are compared.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from granite_onnx.export.fusions._common import ORT_DOMAIN, infer_shapes

log = logging.getLogger(__name__)

# (domain, op) → {output index: input index whose shape it has}, from the contrib op definitions
# (onnxruntime docs/ContribOperators.md). LinearAttention's output is [B, T, q_heads · v_head] = value's.
_SAME_SHAPE: dict[tuple[str, str], dict[int, int]] = {
    (ORT_DOMAIN, "CausalConvWithState"): {0: 0},
    (ORT_DOMAIN, "LinearAttention"): {0: 2},
    (ORT_DOMAIN, "MoE"): {0: 0},
    (ORT_DOMAIN, "GroupQueryAttention"): {0: 0},
    (ORT_DOMAIN, "SkipSimplifiedLayerNormalization"): {0: 0, 3: 0},
    ("", "SimplifiedLayerNormalization"): {0: 0},
}


def _known(shape: ir.Shape | None) -> bool:
    return shape is not None and all(isinstance(d, int) or d.value is not None for d in shape)


def annotate_contrib_shapes(model: ir.Model) -> int:
    """Give contrib-op outputs the shape of the input their definition equates them with; return how many."""
    n = 0
    for node in model.graph.all_nodes():
        for out_i, in_i in _SAME_SHAPE.get((node.domain, node.op_type), {}).items():
            if out_i >= len(node.outputs) or in_i >= len(node.inputs):
                continue
            src, dst = node.inputs[in_i], node.outputs[out_i]
            if src is None or not _known(src.shape):
                continue
            # GroupQueryAttention with packed QKV (no key input) has a wider query than its output
            if node.op_type == "GroupQueryAttention" and (len(node.inputs) < 2 or node.inputs[1] is None):
                continue
            if dst.shape != src.shape:
                dst.shape = ir.Shape(src.shape)
                n += 1
            if dst.type is None:
                dst.type = src.type
    return n


# Elementwise ops whose inputs broadcast numpy-style to the output.
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Where", "Sigmoid", "Softplus", "Neg", "Exp", "Cast",
                "Greater", "Less", "Equal", "Max", "Min", "Identity", "Relu", "Tanh", "Sqrt", "Reciprocal"}


class DimClasses:
    """Union-find over symbolic dims: which symbols name the same run-time value.

    ONNX's inference gives a fresh `unk__N` whenever it cannot tell two symbols apart (a broadcast of
    `batch` against `unk__3`, any contrib op). This merges them back under one assumption: **a symbolic
    dim never broadcasts against another symbolic dim** — only static 1s broadcast. The composed graph
    keeps it by construction (masks and states are [batch, sequence, ...] end to end); the parity
    tests run batch ≠ sequence ≠ 1, where a wrong merge would change a shape and fail.
    """

    def __init__(self, model: ir.Model) -> None:
        self._parent: dict[str, str] = {}
        for node in model.graph.all_nodes():
            self._visit(node)

    def find(self, name: str) -> str:
        root = name
        while self._parent.get(root, root) != root:
            root = self._parent[root]
        self._parent[name] = root
        return root

    def same(self, a: ir.SymbolicDim | int, b: ir.SymbolicDim | int) -> bool:
        if isinstance(a, int) or isinstance(b, int) or a.value is None or b.value is None:
            return False
        return self.find(a.value) == self.find(b.value)

    def _union(self, a: object, b: object) -> None:
        if isinstance(a, ir.SymbolicDim) and isinstance(b, ir.SymbolicDim) and a.value and b.value:
            ra, rb = self.find(a.value), self.find(b.value)
            if ra != rb:  # keep a named (non-unk) root where there is one: it reads better in logs
                ra, rb = (ra, rb) if not ra.startswith("unk__") else (rb, ra)
                self._parent[rb] = ra

    def _visit(self, node: ir.Node) -> None:
        shapes = [v.shape if v is not None else None for v in node.inputs]
        outs = [v.shape for v in node.outputs]
        if node.domain == "" and node.op_type in _ELEMENTWISE and outs and outs[0] is not None:
            rank = outs[0].rank()
            for shape in shapes:
                if shape is None:
                    continue
                for i in range(1, min(rank, shape.rank()) + 1):  # aligned from the right
                    self._union(outs[0][rank - i], shape[shape.rank() - i])
        elif node.domain == "" and node.op_type == "Transpose" and shapes and shapes[0] is not None \
                and outs[0] is not None:
            perm = node.attributes.get_ints("perm", list(reversed(range(shapes[0].rank()))))
            for i, p in enumerate(perm):
                self._union(outs[0][i], shapes[0][p])
        elif node.domain == "" and node.op_type == "Reshape" and shapes and shapes[0] is not None \
                and outs[0] is not None and node.attributes.get_int("allowzero", 0) == 0:
            # a 0 in a constant target copies that input dim (ONNX inference may name it afresh); a single
            # -1 among dims that all match the input's, rank for rank, is that input dim too (same size)
            target = ir.convenience.get_const_tensor(node.inputs[1]) if node.inputs[1] is not None else None
            if target is not None:
                dims = target.numpy().reshape(-1).tolist()
                for i, d in enumerate(dims):
                    if d == 0 and i < min(shapes[0].rank(), outs[0].rank()):
                        self._union(outs[0][i], shapes[0][i])
                x = shapes[0]
                if dims.count(-1) == 1 and len(dims) == x.rank() == outs[0].rank() and all(
                        d in (0, -1) or (isinstance(x[i], int) and x[i] == d) for i, d in enumerate(dims)):
                    j = dims.index(-1)
                    self._union(outs[0][j], x[j])
        elif node.domain == "" and node.op_type == "Split" and shapes and shapes[0] is not None:
            axis = node.attributes.get_int("axis", 0) % shapes[0].rank()
            for out in outs:
                if out is not None and out.rank() == shapes[0].rank():
                    for i in range(out.rank()):
                        if i != axis:
                            self._union(out[i], shapes[0][i])
        for out_i, in_i in _SAME_SHAPE.get((node.domain, node.op_type), {}).items():
            if out_i < len(outs) and in_i < len(shapes) and outs[out_i] is not None and shapes[in_i] is not None \
                    and outs[out_i].rank() == shapes[in_i].rank():
                for a, b in zip(outs[out_i], shapes[in_i]):
                    self._union(a, b)


def static_target(node: ir.Node, dims: DimClasses) -> tuple[list[int] | None, str]:
    """The constant target that reproduces this Reshape, or (None, why not)."""
    if node.inputs[1] is None or _constant(node.inputs[1]):
        return None, "target is already constant"
    x, y = node.inputs[0], node.outputs[0]
    if y.shape is None or x is None or x.shape is None:
        return None, "input or output rank unknown"
    target: list[int] = []
    for i, d in enumerate(y.shape):
        if isinstance(d, int):
            if d == 0:
                return None, f"output dim {i} is 0"
            target.append(d)
        elif i < x.shape.rank() and dims.same(x.shape[i], d):
            target.append(0)
        else:
            target.append(-1)
    if target.count(-1) > 1:
        return None, f"output {y.shape} has {target.count(-1)} dims not shared with input {x.shape}"
    return target, ""


def fuse_static_shapes(model: ir.Model) -> int:
    """Replace dynamic Reshape targets with constants where shape inference proves them; return the count."""
    infer_shapes(model)
    if annotate_contrib_shapes(model):
        infer_shapes(model)
    dims = DimClasses(model)
    count = 0
    for node in list(model.graph.all_nodes()):
        if node.op_type != "Reshape" or node.domain != "":
            continue
        target, why = static_target(node, dims)
        if target is None:
            log.debug("%s keeps its dynamic target: %s", node.name, why)
            continue
        const = ir.Value(name=f"{node.name}/static_shape", shape=ir.Shape([len(target)]),
                         type=ir.TensorType(ir.DataType.INT64),
                         const_value=ir.tensor(np.array(target, dtype=np.int64)))
        model.graph.register_initializer(const)
        node.replace_input_with(1, const)
        # torch exports allowzero=1; our target has no literal 0, so with allowzero=0 every 0 is a copy
        # (and a copied 0-sized dim stays 0, as before)
        node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
        count += 1
    return count


def _constant(value: ir.Value | None) -> bool:
    """A constant, as an initializer or a Constant node (cleanup has not lifted those yet)."""
    return value is not None and ir.convenience.get_const_tensor(value) is not None


def _replace_output(model: ir.Model, old: ir.Value, new: ir.Value) -> bool:
    """Point every reader of `old` at `new`; refuse (False) when `old` is a graph output."""
    if old.is_graph_output():
        return False
    old.replace_all_uses_with(new)
    return True


def _only_reader(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    return uses[0].node if len(uses) == 1 and not value.is_graph_output() else None


def fuse_drop_reshapes(model: ir.Model) -> int:
    """Remove Reshapes that change nothing the next kernel sees; return how many went.

    * Reshape∘Reshape → one Reshape of the first input (the target re-derived against it);
    * a Reshape whose output provably has its input's shape → gone;
    * `Reshape → SimplifiedLayerNormalization → Reshape` that only inserts a size-1 axis before the
      normalised one (the Mamba group norm with n_groups = 1) → the norm alone;
    * com.microsoft.MoE takes [B, S, D] as well as [N, D]: the flatten before it and the unflatten after
      it go (the router MatMul keeps the flattened input: MoE wants 2-D router logits).
    Same symbolic-dim reasoning (and assumption) as `fuse_static_shapes`.
    """
    infer_shapes(model)
    annotate_contrib_shapes(model)
    infer_shapes(model)
    dims = DimClasses(model)

    def same_shape(a: ir.Value, b: ir.Value) -> bool:
        return (a.shape is not None and b.shape is not None and a.shape.rank() == b.shape.rank()
                and all(x == y if isinstance(x, int) or isinstance(y, int) else dims.same(x, y)
                        for x, y in zip(a.shape, b.shape)))

    count = 0
    graph = model.graph
    for node in list(graph.all_nodes()):
        if node.graph is None:  # removed earlier in this loop
            continue
        if node.op_type == "Reshape" and node.domain == "":
            inner = node.inputs[0].producer() if node.inputs[0] is not None else None
            if inner is not None and inner.op_type == "Reshape" and inner.domain == "" and \
                    _only_reader(inner.outputs[0]) is node and _constant(node.inputs[1]):
                # re-derive the target against the first input: symbolic 0s refer to different tensors
                probe_in, old_target = node.inputs[0], node.inputs[1]
                node.replace_input_with(0, inner.inputs[0])
                node.replace_input_with(1, ir.Value(name=f"{node.name}/probe"))
                target, _ = static_target(node, dims)
                if target is None:
                    node.replace_input_with(0, probe_in)
                    node.replace_input_with(1, old_target)
                else:
                    const = ir.Value(name=f"{node.name}/merged_shape", shape=ir.Shape([len(target)]),
                                     type=ir.TensorType(ir.DataType.INT64),
                                     const_value=ir.tensor(np.array(target, dtype=np.int64)))
                    graph.register_initializer(const)
                    node.replace_input_with(1, const)
                    node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
                    graph.remove(inner, safe=True)
                    count += 1
            if same_shape(node.inputs[0], node.outputs[0]) and \
                    _replace_output(model, node.outputs[0], node.inputs[0]):
                graph.remove(node, safe=True)
                count += 1
        elif node.op_type == "SimplifiedLayerNormalization" and node.domain == "":
            before, after = node.inputs[0].producer(), _only_reader(node.outputs[0])
            if before is None or after is None or before.op_type != "Reshape" or after.op_type != "Reshape" or \
                    _only_reader(before.outputs[0]) is not node or len(node.outputs) != 1:
                continue
            x, inner_shape = before.inputs[0], before.outputs[0].shape
            if node.attributes.get_int("axis", -1) not in (-1, (inner_shape.rank() - 1) if inner_shape else -2):
                continue
            # [.., D] → [.., 1, D]: the normalised axis (and its scale) is untouched
            if x.shape is None or inner_shape is None or inner_shape.rank() != x.shape.rank() + 1 or \
                    inner_shape[-2] != 1 or not isinstance(x.shape[-1], int) or inner_shape[-1] != x.shape[-1] or \
                    not same_shape(x, after.outputs[0]):
                continue
            if not _replace_output(model, after.outputs[0], node.outputs[0]):
                continue
            node.replace_input_with(0, x)
            node.outputs[0].shape = after.outputs[0].shape
            graph.remove([before, after], safe=True)
            count += 2
        elif node.op_type == "MoE" and node.domain == ORT_DOMAIN:
            flat = node.inputs[0].producer()
            if flat is None or flat.op_type != "Reshape" or flat.inputs[0].shape is None or \
                    flat.inputs[0].shape.rank() != 3:
                continue
            x = flat.inputs[0]
            unflat = _only_reader(node.outputs[0])
            if unflat is None or unflat.op_type != "Reshape" or not same_shape(x, unflat.outputs[0]):
                continue
            if not _replace_output(model, unflat.outputs[0], node.outputs[0]):
                continue
            node.replace_input_with(0, x)
            node.outputs[0].shape = x.shape
            graph.remove(unflat, safe=True)
            count += 1
    return count
