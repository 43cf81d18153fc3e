"""RMS norms → ONNX Runtime's fused normalisation kernels.

* `h = Add(residual, Mul(x, residual_multiplier)); RMSNormalization(h, w)` (each sublayer's residual
  followed by the next norm) → `com.microsoft.SkipSimplifiedLayerNormalization(residual, skip, w)`,
  whose 4th output is the sum h itself, which feeds the next residual Add.
* Any other `RMSNormalization(x, w)` (the first layer's input norm, the Mamba gated group-norm, the
  final norm after the last-position Slice) → `SimplifiedLayerNormalization(x, w)`.

Note: ONNX Runtime registers SimplifiedLayerNormalization in the *ONNX* domain (""), not in
com.microsoft (a historical accident onnxscript's own fusions also note); SkipSimplifiedLayerNormalization
is in com.microsoft. Both compute in float32 like RMSNormalization with stash_type=1.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from granite_onnx.export.fusions._common import ORT_DOMAIN, Scoped, apply, check_float, scope_of, static_dims


def _norm_attrs(result: pattern.MatchResult, norm: ir.Node, rank: int | None) -> pattern.MatchResult:
    axis = norm.attributes.get_int("axis", -1)
    if rank is None or axis not in (-1, rank - 1):
        return result.fail(f"{norm.name}: only a last-axis norm fuses (axis={axis}, rank={rank})", norm)
    if norm.attributes.get_int("stash_type", 1) != 1:
        return result.fail(f"{norm.name}: stash_type must be 1 (float32 statistics)", norm)
    return result


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    """True unless the static shapes prove the Add broadcasts (symbolic dims are taken as equal)."""
    if a.shape is None or b.shape is None or a.shape.rank() != b.shape.rank():
        return False
    for x, y in zip(a.shape, b.shape):
        if isinstance(x, int) and isinstance(y, int) and x != y:
            return False
        if (x == 1) != (y == 1):  # one side literally 1: a broadcast
            return False
    return True


class SkipRmsNormFusion(pattern.RewriteRuleClassBase):
    """Add + RMSNormalization → SkipSimplifiedLayerNormalization (outputs the norm and the sum)."""

    def pattern(self, op, residual, skip, weight):
        h = op.Add(residual, skip)
        return op.RMSNormalization(h, weight, _allow_other_attributes=True, _outputs=["y"]), h

    def check(self, op, residual, skip, weight, y, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        rank = residual.shape.rank() if residual.shape is not None else None
        if rank not in (2, 3):
            return result.fail(f"SkipSimplifiedLayerNormalization takes [B,S,D] or [N,D], got {residual.shape}",
                               residual)
        if not _same_shape(residual, skip):
            return result.fail(f"the Add broadcasts ({residual.shape} + {skip.shape}); the fused op does not", skip)
        w = static_dims(weight, 1)
        if w is None or w[0] is None or residual.shape[-1] != w[0]:
            return result.fail(f"weight {weight.name} {weight.shape} is not [hidden] of {residual.shape}", weight)
        if not _norm_attrs(result, y.producer(), rank):
            return result
        return check_float(result, "SkipSimplifiedLayerNormalization", residual, skip, weight)

    def rewrite(self, op, residual, skip, weight, y, **_):
        eps = y.producer().attributes.get_float("epsilon", 1e-5)
        s = Scoped(op, scope_of(y))
        out, _mean, _inv_std, total = s.SkipSimplifiedLayerNormalization(
            residual, skip, weight, epsilon=eps, _domain=ORT_DOMAIN, _outputs=4)
        return out, total


class RmsNormFusion(pattern.RewriteRuleClassBase):
    """RMSNormalization → SimplifiedLayerNormalization (ORT's kernel; same math)."""

    def pattern(self, op, x, weight):
        return op.RMSNormalization(x, weight, _allow_other_attributes=True, _outputs=["y"])

    def check(self, op, x, weight, y, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        rank = x.shape.rank() if x.shape is not None else None
        if not _norm_attrs(result, y.producer(), rank):
            return result
        return check_float(result, "SimplifiedLayerNormalization", x, weight)

    def rewrite(self, op, x, weight, y, **_):
        norm = y.producer()
        s = Scoped(op, scope_of(y))
        return s.SimplifiedLayerNormalization(x, weight, axis=-1, epsilon=norm.attributes.get_float("epsilon", 1e-5),
                                              stash_type=1)


skip_rms_norm_rules = pattern.RewriteRuleSet([SkipRmsNormFusion.rule()])
rms_norm_rules = pattern.RewriteRuleSet([RmsNormFusion.rule()])


def fuse_skip_rms_norm(model: ir.Model) -> int:
    """Replace residual Add + RMSNormalization pairs with SkipSimplifiedLayerNormalization; return the count."""
    return apply(skip_rms_norm_rules, model)


def fuse_rms_norm(model: ir.Model) -> int:
    """Replace the remaining RMSNormalization nodes with SimplifiedLayerNormalization; return the count."""
    return apply(rms_norm_rules, model)


def fuse_norms(model: ir.Model) -> int:
    """Skip-norms first (they consume the Add), then plain norms; return the total count."""
    return fuse_skip_rms_norm(model) + fuse_rms_norm(model)
