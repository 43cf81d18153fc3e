"""Torch modules of one Granite hybrid decoder layer, with the recurrent state as plain inputs/outputs.

Each module's `forward` *is* its exported signature (see export/io.py for the names). Weights are laid
out for the exported graph (linear weights stored [in, out], so a MatMul needs no transpose); the
mapping from HF checkpoint names and layouts lives in models/weights.py.

MambaLayer.forward(hidden [B,T,D], mask [B,T] f32, conv_state [B,Cc,K−1], recurrent_state [B,H,N,P] f32)
    → hidden [B,T,D], conv_state, recurrent_state
AttentionLayer.forward(hidden [B,T,D], attention_mask [B,S] i64, position_ids [B,T] i64,
                       past_key [B,Hkv,P,d], past_value) → hidden, present_key [B,Hkv,S,d], present_value
(S = P + T.)  Both end with the MoE + shared MLP (or the dense MLP) block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from granite_onnx.models import kernels
from granite_onnx.models.config import ATTENTION, HybridConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, as HF does (exports as ONNX RMSNormalization)."""
    dtype = x.dtype
    scale = torch.ones(x.shape[-1]) if weight is None else weight.float()
    return F.rms_norm(x.float(), (x.shape[-1],), scale, eps).to(dtype)


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape), requires_grad=False)


class FeedForward(nn.Module):
    """MoE (router, experts) + shared SwiGLU MLP; with num_experts = 0 just the dense MLP."""

    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        d, s = cfg.hidden_size, cfg.shared_intermediate_size
        self.top_k = cfg.num_experts_per_tok
        self.shared_in = _param(d, 2 * s)  # [gate | up]
        self.shared_out = _param(s, d)
        if cfg.has_experts:
            e, i = cfg.num_experts, cfg.intermediate_size
            self.router = _param(d, e)
            self.experts_gate_up = _param(e, d, 2 * i)  # [gate | up] along the last dim
            self.experts_down = _param(e, i, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = x @ self.shared_in
        g, u = gu.chunk(2, dim=-1)
        y = (F.silu(g) * u) @ self.shared_out
        if hasattr(self, "router"):
            flat = x.reshape(-1, x.shape[-1])
            m = kernels.call("MoE", [flat, self.router, self.experts_gate_up, self.experts_down],
                             {"top_k": self.top_k})
            y = y + m.reshape(x.shape)
        return y


class MambaMixer(nn.Module):
    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.cfg = cfg
        self.d_inner, self.conv_dim, self.heads = cfg.mamba_d_inner, cfg.conv_dim, cfg.mamba_n_heads
        proj = self.d_inner + self.conv_dim + self.heads
        self.in_proj = _param(d, proj)
        self.in_proj_bias = _param(proj) if cfg.mamba_proj_bias else None
        self.conv_weight = _param(self.conv_dim, cfg.mamba_d_conv)
        self.conv_bias = _param(self.conv_dim)  # zeros when the checkpoint has no conv bias
        self.dt_bias = _param(self.heads)
        self.A_log = _param(self.heads)
        self.D = _param(self.heads)
        self.norm = _param(self.d_inner)
        self.out_proj = _param(self.d_inner, d)
        self.out_proj_bias = _param(d) if cfg.mamba_proj_bias else None

    def forward(self, h: torch.Tensor, mask: torch.Tensor, conv_state: torch.Tensor,
                recurrent_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        b, t, _ = h.shape
        g, n, hd = cfg.mamba_n_groups, cfg.mamba_d_state, cfg.mamba_d_head
        m = mask[:, :, None].to(h.dtype)
        h = h * m  # padded positions contribute nothing (HF: apply_mask_to_padding_states)
        proj = h @ self.in_proj
        if self.in_proj_bias is not None:
            proj = proj + self.in_proj_bias
        gate, xbc, dt = proj.split([self.d_inner, self.conv_dim, self.heads], dim=-1)
        xbc, conv_state = kernels.call("CausalConv1d", [xbc.transpose(1, 2), conv_state, self.conv_weight,
                                                        self.conv_bias], {})
        xbc = xbc.transpose(1, 2) * m
        x, B, C = xbc.split([self.d_inner, g * n, g * n], dim=-1)
        dt = F.softplus((dt + self.dt_bias).float())
        lo, hi = cfg.time_step_limit
        if (lo, hi) != (0.0, float("inf")):
            # HF clamps dt in its chunked (multi-token) path only, not in single-token decode.
            multi = torch.ones_like(dt[:1, :, :1]).sum() > 1
            dt = torch.where(multi, dt.clamp(lo, hi), dt)
        dt = dt * m.float()  # dt = 0 on padding: the state passes through unchanged
        A = -torch.exp(self.A_log.float())
        x4 = x.reshape(b, t, self.heads, hd)
        y, recurrent_state = kernels.call(
            "SSMScan", [x4, dt, A, B.reshape(b, t, g, n), C.reshape(b, t, g, n), recurrent_state],
            {"chunk_size": cfg.mamba_chunk_size})
        # D·x on the packed [B, T, H·P] layout (D repeated over each head's P channels): the same products
        # as on [B, T, H, P], and the fused graph then needs no reshape of x or y around its scan kernel
        y = y.reshape(b, t, self.d_inner) + x.float() * self.D.float().repeat_interleave(hd)
        # gate *before* the norm (not GatedRMSNorm, which normalises first), in float32
        y = y * F.silu(gate.float())
        y = rms_norm(y.reshape(b, t, g, self.d_inner // g), None, cfg.rms_norm_eps).reshape(b, t, self.d_inner)
        y = self.norm * y.to(h.dtype)
        out = y @ self.out_proj
        if self.out_proj_bias is not None:
            out = out + self.out_proj_bias
        return out, conv_state, recurrent_state


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.q_proj = _param(d, cfg.num_attention_heads * hd)
        self.k_proj = _param(d, cfg.num_key_value_heads * hd)
        self.v_proj = _param(d, cfg.num_key_value_heads * hd)
        self.o_proj = _param(cfg.num_attention_heads * hd, d)
        if cfg.attention_bias:
            self.q_bias = _param(cfg.num_attention_heads * hd)
            self.k_bias = _param(cfg.num_key_value_heads * hd)
            self.v_bias = _param(cfg.num_key_value_heads * hd)
            self.o_bias = _param(d)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past_key: torch.Tensor, past_value: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        b, t, _ = h.shape
        hd = cfg.head_dim
        bias = cfg.attention_bias
        q = h @ self.q_proj + (self.q_bias if bias else 0)
        k = h @ self.k_proj + (self.k_bias if bias else 0)
        v = h @ self.v_proj + (self.v_bias if bias else 0)
        q = q.reshape(b, t, -1, hd).transpose(1, 2)
        k = k.reshape(b, t, -1, hd).transpose(1, 2)
        v = v.reshape(b, t, -1, hd).transpose(1, 2)
        if cfg.position_embedding_type == "rope":
            # computed in forward, not held as a buffer: layers are traced on the meta device, where a
            # buffer has no data to fold
            idx = torch.arange(0, hd, 2, dtype=torch.float32, device=position_ids.device)
            inv_freq = 1.0 / (cfg.rope_theta ** (idx / hd))
            freqs = position_ids[:, :, None].float() * inv_freq  # [B, T, d/2]
            emb = torch.cat([freqs, freqs], dim=-1)[:, None]
            cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        out, present_k, present_v = kernels.call(
            "Attention", [q, k, v, past_key, past_value, attention_mask], {"scale": cfg.attention_multiplier})
        out = out @ self.o_proj + (self.o_bias if bias else 0)
        return out, present_k, present_v


class DecoderLayer(nn.Module):
    """norm → mixer (mamba or attention) → residual·m → norm → MoE + shared MLP → residual·m."""

    def __init__(self, cfg: HybridConfig, kind: str) -> None:
        super().__init__()
        self.cfg, self.kind = cfg, kind
        self.input_norm = _param(cfg.hidden_size)
        self.post_norm = _param(cfg.hidden_size)
        if kind == ATTENTION:
            self.attn = SelfAttention(cfg)
        else:
            self.mamba = MambaMixer(cfg)
        self.ffn = FeedForward(cfg)

    def _ffn_block(self, residual: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        h = residual + mixed * cfg.residual_multiplier
        return h + self.ffn(rms_norm(h, self.post_norm, cfg.rms_norm_eps)) * cfg.residual_multiplier


class MambaDecoderLayer(DecoderLayer):
    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__(cfg, "mamba")

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, conv_state: torch.Tensor,
                recurrent_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = rms_norm(hidden, self.input_norm, self.cfg.rms_norm_eps)
        mixed, conv_state, recurrent_state = self.mamba(x, mask, conv_state, recurrent_state)
        return self._ffn_block(hidden, mixed), conv_state, recurrent_state


class AttentionDecoderLayer(DecoderLayer):
    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__(cfg, ATTENTION)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past_key: torch.Tensor, past_value: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = rms_norm(hidden, self.input_norm, self.cfg.rms_norm_eps)
        mixed, pk, pv = self.attn(x, attention_mask, position_ids, past_key, past_value)
        return self._ffn_block(hidden, mixed), pk, pv


def make_layer(cfg: HybridConfig, kind: str) -> DecoderLayer:
    return AttentionDecoderLayer(cfg) if kind == ATTENTION else MambaDecoderLayer(cfg)


def position_ids_from_mask(attention_mask: torch.Tensor, t: int) -> torch.Tensor:
    """Positions of the last `t` tokens: count of real tokens before each, left padding skipped."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, attention_mask.shape[1] - t:]


class TorchModel(nn.Module):
    """The whole model from our layer modules — the torch side of the ONNX graph, one layer at a time.

    Used by tests and the validator to check the layer modules against HF and to trace them; the ONNX
    graph itself is composed in export/compose.py.
    """

    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = _param(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(make_layer(cfg, k) for k in cfg.layer_types)
        self.final_norm = _param(cfg.hidden_size)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(cfg.vocab_size, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: list[torch.Tensor],
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        cfg = self.cfg
        t = input_ids.shape[1]
        h = F.embedding(input_ids, self.embed) * cfg.embedding_multiplier
        mask_new = attention_mask[:, attention_mask.shape[1] - t:].float()
        pos = position_ids_from_mask(attention_mask, t)
        present: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            a, b = past[2 * i], past[2 * i + 1]
            if layer.kind == ATTENTION:
                h, a, b = layer(h, attention_mask, pos, a, b)
            else:
                h, a, b = layer(h, mask_new, a, b)
            present += [a, b]
        h = rms_norm(h, self.final_norm, cfg.rms_norm_eps)
        head = self.embed if cfg.tie_word_embeddings else self.lm_head
        logits = (h @ head.T).float() / cfg.logits_scaling
        return logits, present
