"""Granite MoE → `com.microsoft.MoE` (sparse: only the top-k experts run per token).

`granite_onnx.MoE(x [N,D], router [D,E], gate_up [E,D,2I], down [E,I,D]; top_k)` routes each token to
the top-k raw router logits, softmaxes over those k, and sums SwiGLU experts. The contrib op with
`activation_type="swiglu", normalize_routing_weights=1, k=top_k` fed the **raw logits** MatMul(x,
router) computes exactly that (softmax over all E, keep the top k, renormalise = softmax over the k).

Weight layouts the CPU kernel needs (probed on ORT 1.32; the other layout is off by O(1)):
    fc1 [E, 2I, D]  "out × in"; rows interleaved gate/up: row 2j = gate column j, row 2j+1 = up column j
                    (`swiglu_fusion=1`; the CPU kernel refuses 0 and 2)
    fc2 [E, D, I]   "out × in", i.e. our down [E, I, D] transposed
The re-laid-out weights are new lazy initializers `…ffn.moe_fc1` / `…ffn.moe_fc2`, computed while the
model is saved; the old ones fall out with cleanup. The shared expert stays a separate dense MLP.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from granite_onnx.export.fusions._common import (
    ORT_DOMAIN,
    PORTABLE_DOMAIN,
    Scoped,
    apply,
    check_float,
    derived_initializer,
    scope_of,
    static_dims,
)


def interleave_gate_up(gate_up: np.ndarray) -> np.ndarray:
    """[E, D, 2I] (gate | up along the last dim) → [E, 2I, D] with rows g0, u0, g1, u1, …"""
    e, d, two_i = gate_up.shape
    i = two_i // 2
    pairs = np.stack([gate_up[..., :i], gate_up[..., i:]], axis=-1)  # [E, D, I, 2]
    return pairs.reshape(e, d, two_i).transpose(0, 2, 1)


class MoEFusion(pattern.RewriteRuleClassBase):
    """MoE call → MatMul(x, router) + com.microsoft.MoE(swiglu, interleaved fc1)."""

    def pattern(self, op, x, router, gate_up, down):
        return op.MoE(x, router, gate_up, down, _domain=PORTABLE_DOMAIN, _allow_other_attributes=True,
                      _outputs=["y"])

    def check(self, op, x, router, gate_up, down, y, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        for w in (gate_up, down):
            if w.const_value is None:
                return result.fail(f"expert weight {w.name} is not an initializer: its layout cannot be "
                                   "rewritten for com.microsoft.MoE", w)
        r, gu, dn = static_dims(router, 2), static_dims(gate_up, 3), static_dims(down, 3)
        if r is None or gu is None or dn is None or None in r + gu + dn:
            return result.fail(f"MoE weights need static shapes: router {router.shape}, gate_up {gate_up.shape}, "
                               f"down {down.shape}", router)
        (d, e), (e1, d1, two_i), (e2, i, d2) = r, gu, dn
        if not (e == e1 == e2 and d == d1 == d2 and two_i == 2 * i):
            return result.fail(f"inconsistent MoE weights: router {r}, gate_up {gu}, down {dn} "
                               "(expected [D,E], [E,D,2I], [E,I,D])", gate_up)
        top_k = y.producer().attributes.get_int("top_k", 0)
        if not 0 < top_k <= e:
            return result.fail(f"top_k={top_k} is not in 1..{e}", y)
        return check_float(result, "MoE", x, router, gate_up, down)

    def rewrite(self, op, x, router, gate_up, down, y, **_):
        e, d, two_i = gate_up.shape
        i = two_i // 2
        top_k = y.producer().attributes.get_int("top_k")
        prefix = gate_up.name.rsplit(".", 1)[0]
        fc1 = derived_initializer(op, gate_up, f"{prefix}.moe_fc1", (e, two_i, d), interleave_gate_up)
        fc2 = derived_initializer(op, down, f"{prefix}.moe_fc2", (e, d, i), lambda w: w.transpose(0, 2, 1))
        s = Scoped(op, scope_of(y))
        logits = s.MatMul(x, router, _what="router")  # raw logits: the kernel softmaxes and renormalises
        return s.MoE(x, logits, fc1, None, fc2, k=top_k, activation_type="swiglu", normalize_routing_weights=1,
                     swiglu_fusion=1, _domain=ORT_DOMAIN)


moe_rules = pattern.RewriteRuleSet([MoEFusion.rule()])


def fuse_moe(model: ir.Model) -> int:
    """Replace every `granite_onnx.MoE` call with com.microsoft.MoE; return the count."""
    return apply(moe_rules, model)
