"""Constant scales folded into the weight of the MatMul next to them.

* `MatMul(Mul(x, s), W)` with s a constant [K] (or scalar) → `MatMul(x, s[:, None] · W)`
  (the Mamba gated norm's weight before out_proj);
* `Mul(MatMul(x, W), c)` with c a constant [N] (or scalar) → `MatMul(x, W · c)`
  (residual_multiplier after out_proj / o_proj);
* `Mul(Add(MatMul(a, W), MoE(x, logits, fc1, –, fc2)), c)` → `Add(MatMul(a, W · c), MoE(.., fc2 · c))`
  (residual_multiplier after the shared MLP + experts: the MoE output is linear in fc2, which has no bias);
* `Div(Reshape(Gemm(x, W), shape), s)` with s a constant scalar → `Reshape(Gemm(x, W, alpha=alpha/s), shape)`
  (logits_scaling after the LM head, whose weight is the tied embedding: it cannot be scaled itself).

Why: at decode widths every node costs a kernel launch of a few µs whatever its size; these Muls are
pure per-token overhead. The folded weight is a new lazy initializer computed while the model is
saved (one tensor at a time); the old one falls out with cleanup. Only weights read by this one
MatMul are folded — a shared weight (tied embeddings) would change its other readers.
Rounding: the product is formed once in float32 instead of per token; the difference is ~1 ulp of
each weight, far below the fp32 parity tolerance. Gemm's alpha scales the product exactly when 1/s is
a power of two (logits_scaling 4 of the small preset), else within an ulp of the division.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from granite_onnx.export.fusions._common import (
    CPU_FLOAT_TYPES,
    ORT_DOMAIN,
    Scoped,
    apply,
    lazy_initializer,
    scope_of,
    static_dims,
)


def _scale_vector(value: ir.Value, length: int) -> str | None:
    """None if `value` is a float constant of shape [], [1] or [..., length] with 1s before; else why not."""
    if value.const_value is None:
        return f"{value.name} is not a constant"
    shape = value.const_value.shape
    dims = list(shape)
    if dims and dims[-1] not in (1, length) or any(d != 1 for d in dims[:-1]):
        return f"{value.name} {shape} is not a scalar or a vector along the MatMul's axis ({length})"
    if value.const_value.dtype not in CPU_FLOAT_TYPES:
        return f"{value.name} has element type {value.const_value.dtype}"
    return None


def _folded(op: pattern.RewriterContext, w: ir.Value, s: ir.Value, axis: int, tag: str) -> ir.Value:
    """Lazy initializer W · s with s broadcast along `axis` of W (0: rows, 1: columns)."""
    wt, st = w.const_value, s.const_value

    def compute() -> np.ndarray:
        vec = st.numpy().reshape(-1).astype(wt.numpy().dtype)
        return wt.numpy() * (vec[:, None] if axis == 0 else vec[None, :])

    return lazy_initializer(op, f"{w.name}.{tag}", wt.shape, wt.dtype, compute)


def _check_weight(result: pattern.MatchResult, w: ir.Value) -> tuple[int, int] | None:
    dims = static_dims(w, 2)
    if w.const_value is None or dims is None or None in dims:
        result.fail(f"{w.name} is not a 2-D initializer")
        return None
    if len(w.uses()) != 1:
        result.fail(f"{w.name} is read by {len(w.uses())} nodes; folding would change the others")
        return None
    return dims  # type: ignore[return-value]


class ScaleIntoMatMulInput(pattern.RewriteRuleClassBase):
    """MatMul(Mul(a, b), W), one of a/b a constant [K] → MatMul(x, s[:, None]·W)."""

    def pattern(self, op, a, b, w):
        return op.MatMul(op.Mul(a, b, _outputs=["scaled"]), w, _outputs=["y"])

    def check(self, op, a, b, w, scaled, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        dims = _check_weight(result, w)
        if dims is None:
            return result
        if len(scaled.uses()) != 1:
            return result.fail(f"{scaled.name} has other readers")
        s = a if a.const_value is not None else b
        why = _scale_vector(s, dims[0])
        if why:
            return result.fail(why, s)
        x = b if s is a else a
        if x.shape is not None and x.shape.rank() >= 1 and isinstance(x.shape[-1], int) and \
                s.const_value.shape.rank() >= 1 and x.shape[-1] != dims[0]:
            return result.fail(f"{x.name} {x.shape} is broadcast by the scale", x)
        return result

    def rewrite(self, op, a, b, w, y, **_):
        s, x = (a, b) if a.const_value is not None else (b, a)
        return Scoped(op, scope_of(y)).MatMul(x, _folded(op, w, s, 0, "row_scaled"), _what="MatMul")


class ScaleIntoMatMulOutput(pattern.RewriteRuleClassBase):
    """Mul(MatMul(x, W), c), c a constant [N] → MatMul(x, W·c)."""

    def pattern(self, op, x, w, c):
        return op.Mul(op.MatMul(x, w, _outputs=["mm"]), c, _outputs=["y"])

    def check(self, op, x, w, c, mm, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        dims = _check_weight(result, w)
        if dims is None:
            return result
        if len(mm.uses()) != 1:
            return result.fail(f"{mm.name} has other readers")
        why = _scale_vector(c, dims[1])
        if why:
            return result.fail(why, c)
        return result

    def rewrite(self, op, x, w, c, y, **_):
        return Scoped(op, scope_of(y)).MatMul(x, _folded(op, w, c, 1, "col_scaled"), _what="MatMul")


def _folded_experts(op: pattern.RewriterContext, fc2: ir.Value, c: ir.Value) -> ir.Value:
    """Lazy initializer fc2 · c, c broadcast along fc2's output axis (fc2 is [E, D, I], out × in)."""
    wt, ct = fc2.const_value, c.const_value
    return lazy_initializer(op, f"{fc2.name}.out_scaled", wt.shape, wt.dtype,
                            lambda: wt.numpy() * ct.numpy().reshape(-1).astype(wt.numpy().dtype)[None, :, None])


class ScaleIntoFeedForward(pattern.RewriteRuleClassBase):
    """Mul(Add(MatMul(a, W), MoE(…, fc2)), c), c a constant [D] → Add(MatMul(a, W·c), MoE(…, fc2·c))."""

    def pattern(self, op, a, w, x, logits, fc1, fc2, c):
        shared = op.MatMul(a, w, _outputs=["mm"])
        experts = op.MoE(x, logits, fc1, None, fc2, _domain=ORT_DOMAIN, _allow_other_attributes=True,
                         _outputs=["moe"])
        return op.Mul(op.Add(shared, experts, _outputs=["total"]), c, _outputs=["y"])

    def check(self, op, a, w, x, logits, fc1, fc2, c, mm, moe, total, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        dims = _check_weight(result, w)
        if dims is None:
            return result
        experts = static_dims(fc2, 3)
        if fc2.const_value is None or experts is None or None in experts:
            return result.fail(f"{fc2.name} is not a 3-D initializer")
        if len(fc2.uses()) != 1:
            return result.fail(f"{fc2.name} is read by {len(fc2.uses())} nodes; folding would change the others")
        if experts[1] != dims[1]:
            return result.fail(f"{fc2.name} {fc2.shape} does not output the {dims[1]} features of {w.name}", fc2)
        for v in (mm, moe, total):
            if len(v.uses()) != 1 or v.is_graph_output():
                return result.fail(f"{v.name} has other readers")
        why = _scale_vector(c, dims[1])
        if why:
            return result.fail(why, c)
        return result

    def rewrite(self, op, a, w, x, logits, fc1, fc2, c, mm, moe, y, shape=None, **_):
        # the new nodes keep the names of the MatMul and MoE they replace (the scale Mul just goes)
        attrs = {k: v.value for k, v in moe.producer().attributes.items()}
        prefix, name = moe.producer().name.rsplit("/", 1)
        experts = Scoped(op, prefix).MoE(x, logits, fc1, None, _folded_experts(op, fc2, c), _domain=ORT_DOMAIN,
                                         _what=name, **attrs)
        if shape is not None:
            experts = Scoped(op, prefix).Reshape(experts, shape, _what="unflatten")
        prefix, name = mm.producer().name.rsplit("/", 1)
        shared = Scoped(op, prefix).MatMul(a, _folded(op, w, c, 1, "col_scaled"), _what=name)
        return Scoped(op, scope_of(y)).Add(shared, experts, _what="Add")


class ScaleIntoFeedForwardReshaped(ScaleIntoFeedForward):
    """The same with the MoE's [N, D] output reshaped to [B, T, D] before the Add (static_shapes, which
    runs later, drops that Reshape)."""

    def pattern(self, op, a, w, x, logits, fc1, fc2, c, shape):
        shared = op.MatMul(a, w, _outputs=["mm"])
        experts = op.MoE(x, logits, fc1, None, fc2, _domain=ORT_DOMAIN, _allow_other_attributes=True,
                         _outputs=["moe"])
        unflat = op.Reshape(experts, shape, _allow_other_attributes=True, _outputs=["unflat"])
        return op.Mul(op.Add(shared, unflat, _outputs=["total"]), c, _outputs=["y"])

    def check(self, op, unflat, **kw) -> pattern.MatchResult:
        if len(unflat.uses()) != 1:
            return pattern.MatchResult().fail(f"{unflat.name} has other readers")
        return super().check(op, **kw)


class DivisorIntoGemmAlpha(pattern.RewriteRuleClassBase):
    """Div(Reshape(Gemm(a, b), shape), s), s a constant scalar, no C → Reshape(Gemm(a, b, alpha=alpha/s), shape)."""

    def pattern(self, op, a, b, shape, s):
        gemm = op.Gemm(a, b, _allow_other_attributes=True, _outputs=["gemm"])
        return op.Div(op.Reshape(gemm, shape, _allow_other_attributes=True, _outputs=["unflat"]), s, _outputs=["y"])

    def check(self, op, s, gemm, unflat, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        for v in (gemm, unflat):
            if len(v.uses()) != 1 or v.is_graph_output():
                return result.fail(f"{v.name} has other readers")
        t = s.const_value
        if t is None or t.size != 1 or t.dtype not in CPU_FLOAT_TYPES:
            return result.fail(f"divisor {s.name} is not a constant float scalar", s)
        if not np.isfinite(float(t.numpy().reshape(()))) or float(t.numpy().reshape(())) == 0:
            return result.fail(f"divisor {s.name} is not finite and nonzero", s)
        return result

    def rewrite(self, op, a, b, shape, s, gemm, unflat, y, **_):
        node = gemm.producer()
        attrs = {k: v.value for k, v in node.attributes.items()}
        attrs["alpha"] = float(attrs.get("alpha", 1.0)) / float(s.const_value.numpy().reshape(()))
        prefix, name = node.name.rsplit("/", 1)
        out = Scoped(op, prefix).Gemm(a, b, _what=name, **attrs)
        prefix, name = unflat.producer().name.rsplit("/", 1)
        return Scoped(op, prefix).Reshape(out, shape, _what=name)


scale_fold_rules = pattern.RewriteRuleSet([ScaleIntoMatMulInput.rule(), ScaleIntoMatMulOutput.rule(),
                                           ScaleIntoFeedForward.rule(), ScaleIntoFeedForwardReshaped.rule(),
                                           DivisorIntoGemmAlpha.rule()],
                                          commute=True)


def fuse_scale_fold(model: ir.Model) -> int:
    """Fold constant scales into adjacent MatMul weights; return how many Muls went."""
    return apply(scale_fold_rules, model)
