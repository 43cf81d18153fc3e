"""torch's thresholded softplus → ONNX Runtime's Softplus alone.

`F.softplus(x)` exports as `Where(Greater(x, 20), x, Softplus(x))`: above the threshold torch returns
x itself, because the textbook `log(1 + exp(x))` overflows there in float32 (exp(89) = inf), and the
portable graph keeps that guard for runtimes that compute it literally. ONNX Runtime's CPU Softplus
is the stable form (`x + log1p(exp(−x))` for x > 0), so the guard is dead weight: 2 of the ~40 nodes
of a Mamba layer's decode step (the dt path).

Equality, not closeness: for float32 x > 17, log1p(exp(−x)) < 4.2e−8 is below half an ulp of x, so
ORT's Softplus(x) rounds to x exactly — the value the Where picked; at or below the threshold the Where
picked Softplus(x) itself. So the rewrite changes no bit for any threshold ≥ 17 (torch's default is
20). Probed on ORT 1.32 CPU for x in [−1e4, 1e4], ±1e30, 3e38: finite, and equal to x above 17
(tests/export/test_fusions.py). Only float32 fuses: a float16 Softplus would need its own bound.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from granite_onnx.export.fusions._common import Scoped, apply, scope_of

# float32 x above this equals ORT's Softplus(x) exactly (see the module docstring)
EXACT_ABOVE = 17.0


class ThresholdedSoftplus(pattern.RewriteRuleClassBase):
    """Where(Greater(x, t), x, Softplus(x)) → Softplus(x), t ≥ 17, float32."""

    def pattern(self, op, x, threshold):
        return op.Where(op.Greater(x, threshold), x, op.Softplus(x), _outputs=["y"])

    def check(self, op, x, threshold, y, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.dtype != ir.DataType.FLOAT:
            return result.fail(f"{x.name} is {x.dtype}; only float32 Softplus is known to equal x above the "
                               "threshold", x)
        t = ir.convenience.get_const_tensor(threshold)
        if t is None or t.size != 1:
            return result.fail(f"threshold {threshold.name} is not a constant scalar", threshold)
        value = float(np.asarray(t.numpy()).reshape(()))
        if not value >= EXACT_ABOVE:
            return result.fail(f"threshold {value} < {EXACT_ABOVE}: between the two, Softplus(x) ≠ x in float32",
                               threshold)
        return result

    def rewrite(self, op, x, threshold, y, **_):
        return Scoped(op, scope_of(y)).Softplus(x)


softplus_rules = pattern.RewriteRuleSet([ThresholdedSoftplus.rule()])


def fuse_softplus(model: ir.Model) -> int:
    """Drop torch's softplus threshold guard (ORT's Softplus is stable); return how many went."""
    return apply(softplus_rules, model)
