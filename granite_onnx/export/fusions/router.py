"""The MoE router's MatMul merged into the shared expert's input projection (same input, one weight read).

Each FFN block reads its normalised input twice: the shared SwiGLU MLP's `MatMul(h, shared_in [D, 2S])`
(then split into gate | up), and the router's `MatMul(Reshape(h, [-1, D]), router [D, E])` whose logits
feed com.microsoft.MoE. One MatMul with the weights side by side does both:

    MatMul(h, [shared_in | router]) [.., 2S+E] → Split [S, S, E] → gate, up, logits → Reshape [-1, E] → MoE

At decode widths the router MatMul is a whole kernel launch for D·E weights (8 KB in the small preset):
this saves that launch and the flatten of h, at the price of the logits' Reshape (the CPU MoE kernel
wants 2-D router logits). Every output element is the same dot product as before: bit-equal.
The merged weight is a lazy initializer, computed while the model is saved.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from granite_onnx.export.fusions._common import (
    CPU_FLOAT_TYPES,
    ORT_DOMAIN,
    Scoped,
    apply,
    concat_initializer,
    static_dims,
)


def _merged(op: pattern.RewriterContext, shared: ir.Value, router: ir.Value) -> ir.Value:
    """Lazy initializer [shared_in | router] along the output axis."""
    return concat_initializer(op, f"{shared.name}.with_router", [shared, router])


class RouterIntoSharedProjection(pattern.RewriteRuleClassBase):
    """Split(MatMul(h, W), 2) and MoE(x, MatMul(Reshape(h, [-1, D]), R), …) → one MatMul(h, [W | R])."""

    def pattern(self, op, h, w, flat_shape, r, x, fc1, fc2):
        gate, up = op.Split(op.MatMul(h, w, _outputs=["gu"]), _allow_other_attributes=True, _outputs=["gate", "up"])
        logits = op.MatMul(op.Reshape(h, flat_shape, _allow_other_attributes=True, _outputs=["flat"]), r,
                           _outputs=["logits"])
        experts = op.MoE(x, logits, fc1, None, fc2, _domain=ORT_DOMAIN, _allow_other_attributes=True,
                         _outputs=["moe"])
        return gate, up, experts

    def check(self, op, h, w, flat_shape, r, gu, gate, flat, logits, moe, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        ws, rs = static_dims(w, 2), static_dims(r, 2)
        for v, dims in ((w, ws), (r, rs)):
            if v.const_value is None or dims is None or None in dims:
                return result.fail(f"{v.name} is not a 2-D initializer", v)
            if len(v.uses()) != 1:
                return result.fail(f"{v.name} is read by {len(v.uses())} nodes; merging would copy it", v)
            if v.const_value.dtype not in CPU_FLOAT_TYPES:
                return result.fail(f"{v.name} has element type {v.const_value.dtype}", v)
        if ws[0] != rs[0] or w.const_value.dtype != r.const_value.dtype:
            return result.fail(f"{w.name} {w.shape} and {r.name} {r.shape} do not read the same features", r)
        split = gate.producer()
        rank = h.shape.rank() if h.shape is not None else None
        if rank is None or split.attributes.get_int("axis", 0) not in (-1, rank - 1) or len(split.inputs) != 1 \
                or split.attributes.get_int("num_outputs", 0) != 2 or ws[1] % 2:
            return result.fail(f"{split.name} is not an even two-way split of the last axis", gate)
        target = ir.convenience.get_const_tensor(flat_shape)
        if target is None or target.numpy().reshape(-1).tolist() != [-1, ws[0]]:
            return result.fail(f"the router input is not h flattened to [-1, {ws[0]}]", flat)
        for v in (gu, logits):
            if len(v.uses()) != 1 or v.is_graph_output():
                return result.fail(f"{v.name} has other readers", v)
        # the flattened h may also be the MoE's own input (until static_shapes drops that flatten)
        if flat.is_graph_output() or any(u.node is not logits.producer() and u.node is not moe.producer()
                                         for u in flat.uses()):
            return result.fail(f"{flat.name} has other readers", flat)
        return result

    def rewrite(self, op, h, w, flat_shape, r, x, fc1, fc2, gu, flat, logits, moe, **_):
        half, experts = w.const_value.shape[1] // 2, r.const_value.shape[1]
        prefix, name = gu.producer().name.rsplit("/", 1)
        s = Scoped(op, prefix)
        both = s.MatMul(h, _merged(op, w, r), _what=name)
        gate, up, logits3 = s.Split(both, s.ints([half, half, experts], what="sizes"), axis=-1, _what="Split",
                                    _outputs=3)
        prefix, name = logits.producer().name.rsplit("/", 1)
        logits2 = Scoped(op, prefix).Reshape(logits3, Scoped(op, prefix).ints([-1, experts], what="shape"),
                                             _what=f"{name}_flat")
        node = moe.producer()
        attrs = {k: v.value for k, v in node.attributes.items()}
        prefix, name = node.name.rsplit("/", 1)
        if x is flat:  # the MoE read the flatten this rewrite removes: it gets its own (static_shapes drops it)
            flat_prefix, flat_name = flat.producer().name.rsplit("/", 1)
            x = Scoped(op, flat_prefix).Reshape(h, flat_shape, _what=flat_name)
        return gate, up, Scoped(op, prefix).MoE(x, logits2, fc1, None, fc2, _domain=ORT_DOMAIN, _what=name, **attrs)


router_rules = pattern.RewriteRuleSet([RouterIntoSharedProjection.rule()])


def fuse_router(model: ir.Model) -> int:
    """Merge each MoE router MatMul into the shared expert's input MatMul; return how many merged."""
    return apply(router_rules, model)
