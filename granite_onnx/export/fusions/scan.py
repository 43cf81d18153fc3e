"""Mamba-2 mixer kernels → ONNX Runtime's recurrent contrib ops.

* `granite_onnx.CausalConv1d(x [B,C,T], past [B,C,K−1], weight [C,K], bias [C]) → y (SiLU'd), present`
  becomes `z = com.microsoft.CausalConvWithState(x, weight [C,1,K], bias, past, activation="none")`,
  `y = z · Sigmoid(z)`. The contrib op wants the depthwise weight in ONNX Conv layout [C, 1, K]; inputs
  and state stay channels-first, as ours are. Its CPU kernel (ORT 1.32) accepts any K (probed 1…16) and
  float32/16. Its own `activation="silu"` is a scalar std::exp per channel and position; outside it,
  ONNX Runtime fuses Sigmoid·Mul into QuickGelu, whose logistic is MLAS-vectorised: six conv layers of
  `small`, 1 / 4 tokens, 47 → 33 / 169 → 117 µs; three of tiny-4L widths over 512 tokens, 17.6 → 7.4 ms
  (outputs within 2e-6).

* `granite_onnx.SSMScan(x [B,T,H,P], dt [B,T,H], A [H], B [B,T,G,N], C [B,T,G,N], h0 [B,H,N,P])`
  is the recurrence  h_t = exp(dt_t·A)·h_{t−1} + (dt_t·x_t) ⊗ B_t ;  y_t = C_t · h_t  — i.e.
  `com.microsoft.LinearAttention(update_rule="gated", scale=1)` with, in its packed [B, T, heads·dim]
  layout:
      query = C                      [B, T, G·N]   q_num_heads  = G (one query per group: "inverse
                                                    GQA", each group's C serves its H/G heads)
      key   = dt·B, per head         [B, T, H·N]   kv_num_heads = H (the state is per head)
      value = x                      [B, T, H·P]
      decay = dt·A                   [B, T, H]     log-space, per-head scalar
      state = h0                     [B, H, N, P]  (= [B, H_kv, d_k, d_v]: our layout already)
  output [B, T, H·P] is reshaped back to [B, T, H, P]. D·x and the gated norm stay outside.
  dt scales the key rather than the value: (dt·B)⊗x = (dt·x)⊗B up to rounding, and dt·B broadcasts B
  over the heads in the same Mul that a dt·x would need anyway — no Expand of B to H heads, and x goes
  in as it is, so the reshapes of x to [B, T, H, P] and back cancel (static_shapes drops them; the
  layer computes D·x on the packed layout for that reason).
"""

from __future__ import annotations

from onnxscript.rewriter import pattern

import onnx_ir as ir

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


class CausalConvFusion(pattern.RewriteRuleClassBase):
    """CausalConv1d call → CausalConvWithState(activation="none") · Sigmoid of it (SiLU)."""

    def pattern(self, op, x, past, weight, bias):
        return op.CausalConv1d(x, past, weight, bias, _domain=PORTABLE_DOMAIN, _outputs=["y", "present"])

    def check(self, op, x, past, weight, bias, y, present, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        w = static_dims(weight, 2)
        if w is None or None in w:
            return result.fail(f"conv weight {weight.name} must be [channels, kernel] with static dims, "
                               f"got {weight.shape}", weight)
        channels, k = w
        p = static_dims(past, 3)
        if p is not None and p[1:] != (channels, k - 1):
            return result.fail(f"conv state {past.name} {past.shape} does not hold K−1 = {k - 1} columns "
                               f"of {channels} channels", past)
        if static_dims(x, 3) is None:
            return result.fail(f"conv input {x.name} is not rank 3 [B, C, T] (shape {x.shape})", x)
        return check_float(result, "CausalConvWithState", x, past, weight, bias)

    def rewrite(self, op, x, past, weight, bias, y, **_):
        s = Scoped(op, scope_of(y))
        channels, k = weight.shape
        if weight.const_value is not None:
            w3 = derived_initializer(op, weight, f"{weight.name}.depthwise", (channels, 1, k),
                                     lambda w: w.reshape(channels, 1, k))
        else:
            w3 = s.Unsqueeze(weight, s.ints([1]), _what="weight")
        z, present = s.CausalConvWithState(x, w3, bias, past, activation="none", _domain=ORT_DOMAIN, _outputs=2)
        return s.Mul(z, s.Sigmoid(z, _what="silu_gate"), _what="silu"), present


class SSMScanFusion(pattern.RewriteRuleClassBase):
    """SSMScan call → LinearAttention(update_rule="gated", scale=1)."""

    def pattern(self, op, x, dt, A, B, C, h0):
        return op.SSMScan(x, dt, A, B, C, h0, _domain=PORTABLE_DOMAIN, _allow_other_attributes=True,
                          _outputs=["y", "h"])

    def check(self, op, x, dt, A, B, C, h0, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        xs, bs, cs, hs = static_dims(x, 4), static_dims(B, 4), static_dims(C, 4), static_dims(h0, 4)
        if xs is None or bs is None or cs is None or None in xs[2:] or None in bs[2:]:
            return result.fail(f"SSMScan needs static heads/head_dim/groups/d_state: x {x.shape}, B {B.shape}, "
                               f"C {C.shape}; run shape inference first", x)
        heads, head_dim = xs[2:]
        groups, d_state = bs[2:]
        if cs[2:] != (groups, d_state):
            return result.fail(f"C {C.shape} and B {B.shape} differ in groups/d_state", C)
        if heads % groups:
            return result.fail(f"{heads} heads are not a multiple of {groups} groups", B)
        if hs is not None and hs[1:] != (heads, d_state, head_dim):
            return result.fail(f"state {h0.name} {h0.shape} is not [B, {heads}, {d_state}, {head_dim}]", h0)
        return check_float(result, "LinearAttention", x, dt, A, B, C, h0)

    def rewrite(self, op, x, dt, A, B, C, h0, y, **_):
        heads, head_dim = x.shape[2], x.shape[3]
        groups, d_state = B.shape[2], B.shape[3]
        rep = heads // groups
        s = Scoped(op, scope_of(y))
        value = s.Reshape(x, s.ints([0, 0, heads * head_dim]), _what="value")
        decay = s.Mul(dt, A, _what="decay")  # log-space: the kernel applies exp(dt·A)
        if groups == 1:  # dt [B,T,H,1] · B [B,T,1,N] → [B,T,H,N]
            key = s.Mul(s.Unsqueeze(dt, s.ints([-1]), _what="dt"), B, _what="dt_key")
        else:  # group g serves heads g·rep … g·rep+rep−1 (repeat_interleave, as HF): [B,T,G,rep,1] · [B,T,G,1,N]
            key = s.Mul(s.Reshape(dt, s.ints([0, 0, groups, rep, 1]), _what="dt"),
                        s.Unsqueeze(B, s.ints([3]), _what="key_heads"), _what="dt_key")
        key = s.Reshape(key, s.ints([0, 0, heads * d_state]), _what="key")
        query = s.Reshape(C, s.ints([0, 0, groups * d_state]), _what="query")
        out, state = s.LinearAttention(query, key, value, h0, decay, update_rule="gated", scale=1.0,
                                       q_num_heads=groups, kv_num_heads=heads, _domain=ORT_DOMAIN, _outputs=2)
        return s.Reshape(out, s.ints([0, 0, heads, head_dim]), _what="y"), state


causal_conv_rules = pattern.RewriteRuleSet([CausalConvFusion.rule()])
ssm_scan_rules = pattern.RewriteRuleSet([SSMScanFusion.rule()])


def fuse_causal_conv(model: ir.Model) -> int:
    """Replace every `granite_onnx.CausalConv1d` call with CausalConvWithState; return the count."""
    return apply(causal_conv_rules, model)


def fuse_ssm_scan(model: ir.Model) -> int:
    """Replace every `granite_onnx.SSMScan` call with LinearAttention(gated); return the count."""
    return apply(ssm_scan_rules, model)


def fuse_scan(model: ir.Model) -> int:
    """Both Mamba-2 fusions; return how many call nodes were replaced in all."""
    return fuse_causal_conv(model) + fuse_ssm_scan(model)
