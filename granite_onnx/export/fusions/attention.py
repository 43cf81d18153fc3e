"""Causal GQA over past K/V → `com.microsoft.GroupQueryAttention(do_rotary=0)`.

`granite_onnx.Attention(q [B,Hq,T,d], k, v [B,Hkv,T,d], past_k, past_v [B,Hkv,P,d], mask [B,P+T] int64)`
→ `out [B,T,Hq·d], present_k, present_v [B,Hkv,P+T,d]`, any RoPE already applied to q/k.

What the contrib op needs (probed against a numpy oracle on ORT 1.32 CPU):
* q/k/v packed as [B, T, heads·d]; past/present stay BNSH [B, Hkv, S, d] — present = concat(past, new).
* `seqlens_k` = P+T−1 and `total_sequence_length` = P+T (int32). GQA assumes each row's cache holds
  its valid tokens at rows [0, seqlens_k]; our cache is *left*-padded, so every row is given the full
  length and the padding keys are removed by an additive `attention_bias` [B, 1, T, P+T] (0 for real
  tokens, the dtype's lowest value for padding — the same "min" the portable kernel uses). The bias
  must have T rows; the CPU kernel refuses a broadcast [B, 1, 1, P+T] when T > 1.
  Cost: the bias is B·T·(P+T) elements, built once per step and shared by every attention layer
  (T is read from `input_ids`, so cleanup merges the per-layer copies): trivial in decode, 64 MB per row for a 512-token chunk at
  32k context — still H_q times smaller than the portable kernel's score matrix.
* `query_seqlens` = T for every row: without it the kernel refuses batch > 1 with T > 1 and P > 0
  ("batch_size must be 1 when sequence_length > 1 and past context is given"), i.e. chunked prefill.
* Packed QKV: when q, k and v are plain projections of one input (`MatMul(h, W)` → [b, t, heads, d] →
  BNSH, no RoPE, no bias), one MatMul with the three weights side by side feeds GroupQueryAttention's
  packed query [B, T, (Hq + 2·Hkv)·d] (key and value absent): two fewer MatMul launches per layer,
  the same dot products. The merged weight is a lazy initializer.

Equality with the portable graph: output rows of real tokens, and all of present K/V, agree to
float rounding. Rows of *padding* queries differ: no key is visible to them, and the portable kernel
then averages V over all keys (softmax of equal minima) while GQA averages over the causal prefix.
Those rows are never read by a real token (attention masks padding keys, Mamba zeroes padded inputs,
the MoE is per-token), so real logits and every state a later step reads are unchanged; only the
logits of padding positions and K/V rows at padding positions of *later* attention layers differ.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from granite_onnx.export import io
from granite_onnx.export.fusions._common import (
    ORT_DOMAIN,
    PORTABLE_DOMAIN,
    Scoped,
    apply,
    check_float,
    concat_initializer,
    scope_of,
    static_dims,
)

_INT_MASK_TYPES = (ir.DataType.INT64, ir.DataType.INT32)


def _graph_input(value: ir.Value, name: str) -> ir.Value | None:
    """The main-graph input called `name`, found from `value`'s graph, or None."""
    graph = value.graph if value.graph is not None else (value.producer().graph if value.producer() else None)
    return next((v for v in graph.inputs if v.name == name), None) if graph is not None else None


def _heads(q: ir.Value, k: ir.Value, v: ir.Value, past_key: ir.Value, past_value: ir.Value, out: ir.Value,
           ) -> tuple[int, int, int] | None:
    """(query heads, key/value heads, head_dim) from whichever shapes are static, or None.

    The traced q/k/v come from Reshape(…, [b, t, −1, d]), so their head dims are often symbolic;
    the state inputs [B, Hkv, P, d] and the output [B, T, Hq·d] always carry them.
    """
    def first(*candidates: int | None) -> int | None:
        return next((c for c in candidates if c is not None), None)

    qs, ks, vs = static_dims(q, 4) or (None,) * 4, static_dims(k, 4) or (None,) * 4, static_dims(v, 4) or (None,) * 4
    pk, pv = static_dims(past_key, 4) or (None,) * 4, static_dims(past_value, 4) or (None,) * 4
    os_ = static_dims(out, 3) or (None,) * 3
    d = first(qs[3], ks[3], vs[3], pk[3], pv[3])
    hkv = first(ks[1], vs[1], pk[1], pv[1])
    hq = first(qs[1], os_[2] // d if os_[2] is not None and d else None)
    if d is None or hkv is None or hq is None:
        return None
    for dim, want in ((ks[3], d), (vs[3], d), (pk[3], d), (pv[3], d), (vs[1], hkv), (pk[1], hkv), (pv[1], hkv)):
        if dim is not None and dim != want:
            return None  # inconsistent: GroupQueryAttention needs one head_dim and one kv head count
    if os_[2] is not None and os_[2] != hq * d:
        return None
    return hq, hkv, d


def _projection(x: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """(h, W) when `x` = Transpose[0,2,1,3](Reshape(MatMul(h, W))) with W a 2-D initializer and every
    intermediate read once — a head split of a plain projection (no RoPE, no bias) — else None."""
    node = x.producer()
    if node is None or node.op_type != "Transpose" or list(node.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return None
    chain = [node]
    for op_type in ("Reshape", "MatMul"):
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
        if node is None or node.op_type != op_type or node.domain != "":
            return None
        chain.append(node)
    if any(len(n.outputs[0].uses()) != 1 or n.outputs[0].is_graph_output() for n in chain):
        return None
    h, w = node.inputs
    if w is None or w.const_value is None or static_dims(w, 2) is None or len(w.uses()) != 1:
        return None
    return h, w


def _packed_qkv(op: pattern.RewriterContext, weights: list[ir.Value]) -> ir.Value:
    """Lazy initializer [Wq | Wk | Wv] along the output axis."""
    return concat_initializer(op, f"{weights[0].name}.qkv", weights)


class AttentionFusion(pattern.RewriteRuleClassBase):
    """Attention call → GroupQueryAttention with seqlens/bias derived from the mask."""

    def pattern(self, op, q, k, v, past_key, past_value, mask):
        return op.Attention(q, k, v, past_key, past_value, mask, _domain=PORTABLE_DOMAIN,
                            _allow_other_attributes=True, _outputs=["out", "present_key", "present_value"])

    def check(self, op, q, k, v, past_key, past_value, mask, out, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        dims = _heads(q, k, v, past_key, past_value, out)
        if dims is None:
            return result.fail(f"attention needs static heads and head_dim: q {q.shape}, k {k.shape}, "
                               f"past_key {past_key.shape}, out {out.shape}; run shape inference first", q)
        hq, hkv, _ = dims
        if hq % hkv:
            return result.fail(f"{hq} query heads are not a multiple of {hkv} key/value heads", q)
        if "scale" not in out.producer().attributes:
            return result.fail("the Attention call has no scale attribute", out)
        if mask.dtype not in _INT_MASK_TYPES or static_dims(mask, 2) is None:
            return result.fail(f"mask {mask.name} must be an int [batch, total] tensor, got {mask.dtype} {mask.shape}",
                               mask)
        return check_float(result, "GroupQueryAttention", q, k, v, past_key, past_value)

    def rewrite(self, op, q, k, v, past_key, past_value, mask, out, **_):
        hq, hkv, d = _heads(q, k, v, past_key, past_value, out)  # type: ignore[misc]
        scale = out.producer().attributes.get_float("scale")
        s = Scoped(op, scope_of(out))

        def packed(x: ir.Value, heads: int, what: str) -> ir.Value:  # [B, H, T, d] → [B, T, H·d]
            return s.Reshape(s.Transpose(x, perm=[0, 2, 1, 3], _what=what), s.ints([0, 0, heads * d]), _what=what)

        batch = s.Shape(mask, start=0, end=1, _what="batch")  # [1] int64
        total = s.Shape(mask, start=1, end=2, _what="total")  # P + T
        # before any node below reads q/k/v (their single reader is what _projection checks)
        projections = [_projection(x) for x in (q, k, v)]
        if all(projections) and len({p[0] for p in projections}) == 1 and \
                len({p[1].const_value.dtype for p in projections}) == 1:
            # GQA's packed-QKV form; the three projections and their head splits fall out with cleanup
            query = s.MatMul(projections[0][0], _packed_qkv(op, [p[1] for p in projections]), _what="qkv")
            key = value = None
        else:
            query, key, value = packed(q, hq, "query"), packed(k, hkv, "key"), packed(v, hkv, "value")
        # T from the graph's input_ids when there is one, so that every attention layer builds the same
        # bias (cleanup then keeps one); else from the packed query (not q, so q's transposes cancel)
        ids = _graph_input(mask, io.INPUT_IDS)
        new = s.Shape(ids if ids is not None else query, start=1, end=2, _what="new")  # T
        i32 = ir.DataType.INT32
        # Every row holds P+T cache rows (left padding included): the bias, not seqlens, hides padding.
        seqlens_k = s.Cast(s.Expand(s.Sub(total, s.ints([1])), batch, _what="seqlens_k"), to=i32, _what="seqlens_k")
        total_len = s.Cast(s.Squeeze(total, s.ints([0])), to=i32, _what="total_sequence_length")
        query_seqlens = s.Cast(s.Expand(new, batch, _what="query_seqlens"), to=i32, _what="query_seqlens")
        dtype = q.dtype
        lowest = s.scalar(np.finfo(dtype.numpy()).min, dtype, what="lowest")
        zero = s.scalar(0, dtype, what="zero")
        padding = s.Equal(mask, s.scalar(0, mask.dtype, what="mask_zero"), _what="padding")
        bias = s.Unsqueeze(s.Where(padding, lowest, zero, _what="bias"), s.ints([1, 2]), _what="bias")  # [B,1,1,S]
        bias = s.Expand(bias, s.Concat(batch, s.ints([1]), new, total, axis=0, _what="bias_shape"), _what="bias")
        return s.GroupQueryAttention(
            query, key, value, past_key, past_value,
            seqlens_k, total_len, None, None, None, bias, None, None, None, None, None, query_seqlens,
            num_heads=hq, kv_num_heads=hkv, scale=scale, do_rotary=0, _domain=ORT_DOMAIN, _outputs=3)


attention_rules = pattern.RewriteRuleSet([AttentionFusion.rule()])


def fuse_attention(model: ir.Model) -> int:
    """Replace every `granite_onnx.Attention` call with GroupQueryAttention; return the count."""
    return apply(attention_rules, model)
