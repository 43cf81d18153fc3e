"""The four compute kernels of a Granite hybrid layer, as plain torch functions.

Each kernel is what one ONNX node computes in the exported graph: while exporting, the layer modules
emit a single `granite_onnx.<Kernel>` node (a custom-domain op) and the exporter attaches an ONNX
local *function* with the body traced from the torch function below, so the portable model holds
only standard ops, and the graph optimizer can swap each function call for ONNX Runtime's contrib
kernel with a one-node pattern (export/fusions/).

| kernel        | inputs → outputs                                                                      |
|---------------|---------------------------------------------------------------------------------------|
| CausalConv1d  | x [B, C, T], past [B, C, K−1], weight [C, K], bias [C] → y [B, C, T], present [B, C, K−1] |
| SSMScan       | x [B, T, H, P], dt [B, T, H], A [H], B [B, T, G, N], C [B, T, G, N], h0 [B, H, N, P]     |
|               |   → y [B, T, H, P], h [B, H, N, P]   (float32; dt already softplus'ed, A = −exp(A_log)) |
| MoE           | x [N, D], router [D, E], gate_up [E, D, 2I], down [E, I, D] → y [N, D]                 |
| Attention     | q [B, Hq, T, d], k/v [B, Hkv, T, d], past_k/v [B, Hkv, P, d], mask [B, P+T] (int64)   |
|               |   → out [B, T, Hq·d], present_k/v [B, Hkv, P+T, d]                                     |

Sequential, unoptimised oracles for the scan and the MoE live in models/reference.py.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

DOMAIN = "granite_onnx"


# ------------------------------------------------------------------------------ conv
def causal_conv1d(x: torch.Tensor, past: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv + SiLU with a carried window of the last K−1 inputs."""
    k = weight.shape[-1]
    full = torch.cat([past, x], dim=-1)  # [B, C, K−1+T]
    y = F.conv1d(full, weight.unsqueeze(1), bias, groups=weight.shape[0])  # [B, C, T]
    present = full[:, :, full.shape[-1] - (k - 1):]
    return F.silu(y), present


# ------------------------------------------------------------------------------ scan
def _segsum(a: torch.Tensor) -> torch.Tensor:
    """a [..., L] → [..., L, L] with out[..., i, j] = sum(a[j+1..i]) for j ≤ i, −inf above."""
    L = a.shape[-1]
    cs = torch.cumsum(a, dim=-1)
    seg = cs[..., :, None] - cs[..., None, :]
    mask = torch.ones(L, L, dtype=torch.bool, device=a.device).tril()
    return seg.masked_fill(~mask, -math.inf)


def ssm_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             h0: torch.Tensor, *, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 selective scan, chunked SSD form (Dao & Gu 2024, `ssd_minimal`).

    Recurrence per head: h_t = exp(dt_t·A)·h_t−1 + (dt_t·x_t) ⊗ B_t ;  y_t = C_t · h_t.
    The sequence is cut into chunks of min(T, chunk_size); padded positions get dt = 0, which leaves
    the state unchanged, so the final state is exact.
    """
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    rep = h // g
    L = torch.sym_min(t, chunk_size)
    pad = (L - t % L) % L
    x, dt, B, C = (x.float(), dt.float(), B.float(), C.float())
    Bh = B.repeat_interleave(rep, dim=2)  # [b, t, h, n]
    Ch = C.repeat_interleave(rep, dim=2)
    xdt = x * dt[..., None]
    a = dt * A.float()  # [b, t, h], log-decay per step
    xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
    a = F.pad(a, (0, 0, 0, pad))
    Bh = F.pad(Bh, (0, 0, 0, 0, 0, pad))
    Ch = F.pad(Ch, (0, 0, 0, 0, 0, pad))
    c = (t + pad) // L
    xdt = xdt.reshape(b, c, L, h, p)
    Bh = Bh.reshape(b, c, L, h, n)
    Ch = Ch.reshape(b, c, L, h, n)
    a = a.reshape(b, c, L, h).permute(0, 3, 1, 2)  # [b, h, c, L]
    a_cum = torch.cumsum(a, dim=-1)

    # 1. within-chunk outputs (the "attention-like" diagonal blocks)
    decay = torch.exp(_segsum(a))  # [b, h, c, L, L]
    scores = torch.einsum("bclhn,bcshn->bhcls", Ch, Bh) * decay
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)

    # 2. state contributed by each chunk, at its end
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b, h, c, L]
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchnp", Bh, decay_to_end, xdt)

    # 3. states at chunk boundaries (recurrence across chunks, in closed form)
    states = torch.cat([h0.float()[:, None], chunk_states], dim=1)  # [b, c+1, h, n, p]
    chunk_decay = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    new_states = torch.einsum("bhzc,bchnp->bzhnp", chunk_decay, states)
    states, h_final = new_states[:, :-1], new_states[:, -1]

    # 4. contribution of the carried state to each position
    y_off = torch.einsum("bclhn,bchnp,bhcl->bclhp", Ch, states, torch.exp(a_cum))
    y = (y_diag + y_off).reshape(b, c * L, h, p)[:, :t]
    return y, h_final


# ------------------------------------------------------------------------------- MoE
def moe(x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, *,
        top_k: int) -> torch.Tensor:
    """Granite MoE: top-k of the float32 router logits, softmax over those k, SwiGLU experts.

    Portable form: every expert runs on every token and the routing weights (zero outside the top-k)
    select; exact, and the fused graph replaces it with ONNX Runtime's sparse MoE kernel.
    """
    inter = down.shape[1]
    logits = (x @ router).float()  # [N, E]
    top_v, top_i = torch.topk(logits, top_k, dim=-1)
    w = torch.softmax(top_v, dim=-1).to(x.dtype)  # [N, k]
    dense_w = torch.zeros_like(logits, dtype=x.dtype).scatter(1, top_i, w)  # [N, E]
    # ONNX's Einsum has no bfloat16 before opset 28 (we export 23): bf16 experts multiply in float32.
    ct = torch.float32 if x.dtype == torch.bfloat16 else x.dtype
    gu = torch.einsum("nd,edf->enf", x.to(ct), gate_up.to(ct))  # [E, N, 2I]
    act = F.silu(gu[..., :inter]) * gu[..., inter:]
    out = torch.einsum("enf,efd->end", act, down.to(ct))  # [E, N, D]
    return torch.einsum("end,ne->nd", out, dense_w.to(ct)).to(x.dtype)


# ------------------------------------------------------------------------- attention
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
              mask: torch.Tensor, *, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal grouped-query attention over past + new keys; `mask` [B, P+T] marks real tokens."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    present_k = torch.cat([past_k, k], dim=2)
    present_v = torch.cat([past_v, v], dim=2)
    total = present_k.shape[2]
    kk = present_k.repeat_interleave(hq // hkv, dim=1)
    vv = present_v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.matmul(q, kk.transpose(2, 3)) * scale  # [B, Hq, T, S]
    # causal: query i (absolute position P+i) sees keys j ≤ P+i; padding keys are never seen
    qpos = torch.arange(t, device=q.device)[:, None] + (total - t)
    kpos = torch.arange(total, device=q.device)[None, :]
    allowed = (kpos <= qpos)[None, None] & (mask[:, None, None, :] > 0)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs, vv)  # [B, Hq, T, d]
    return out.transpose(1, 2).reshape(b, t, hq * d), present_k, present_v


# --------------------------------------------------------------- export-time dispatch
KERNELS: dict[str, Callable[..., Any]] = {
    "CausalConv1d": causal_conv1d,
    "SSMScan": ssm_scan,
    "MoE": moe,
    "Attention": attention,
}


def call(name: str, inputs: Sequence[torch.Tensor], attrs: dict[str, Any],
         ) -> Any:
    """Run kernel `name` eagerly, or — while torch.onnx exports — emit one `granite_onnx.<name>` node.

    The node's outputs take dtypes and shapes from an eager run on fake/meta tensors, so the trace
    records the right symbolic shapes; the exporter later attaches the function body.
    """
    fn = KERNELS[name]
    if not torch.onnx.is_in_onnx_export():
        return fn(*inputs, **attrs)
    specs = _OUTPUTS[name](*inputs)
    res = torch.onnx.ops.symbolic_multi_out(
        f"{DOMAIN}::{name}", list(inputs), attrs=attrs,
        dtypes=[d for d, _ in specs], shapes=[s for _, s in specs], version=1,
    )
    # The op's fake outputs are always CPU tensors. Traced on the meta device (trace.py), that device
    # mismatch makes torch.export's non-strict mode fail, and torch.onnx then silently retries in
    # strict (dynamo) mode, where is_in_onnx_export() is False: the call nodes vanish into plain ops.
    # A same-device copy is free in the graph (the ONNX translation drops it).
    dev = inputs[0].device
    res = [r.to(dev) if r.device != dev else r for r in res]
    return tuple(res) if len(specs) > 1 else res[0]


def _attention_outputs(q, k, v, past_k, past_v, mask):  # type: ignore[no-untyped-def]
    b, hq, t, d = q.shape
    present = (b, k.shape[1], past_k.shape[2] + t, d)
    return [(q.dtype, (b, t, hq * d)), (k.dtype, present), (v.dtype, present)]


# (dtype, shape) of each kernel's outputs, from its inputs: used to type the node while exporting.
_OUTPUTS: dict[str, Callable[..., list[tuple[torch.dtype, Any]]]] = {
    "CausalConv1d": lambda x, past, w, b: [(x.dtype, x.shape), (past.dtype, past.shape)],
    "SSMScan": lambda x, dt, A, B, C, h0: [(torch.float32, x.shape), (torch.float32, h0.shape)],
    "MoE": lambda x, *w: [(x.dtype, x.shape)],
    "Attention": _attention_outputs,
}
