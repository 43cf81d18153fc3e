"""HybridConfig: the Granite 4.0 hyper-parameters, resolved once.

`HybridConfig.from_hf()` is the only place where HF attribute names are read; everything else in the
project reads this frozen dataclass. Presets cover every published Granite 4.0 shape (from
shared/data/granite-4.0-family.json, copied into `FAMILY`) plus small test shapes, and
`preset(name, layers=N)` keeps a shape's widths with fewer layers.

This module imports no torch (the runtime reads the config saved beside an exported model).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

MAMBA = "mamba"
ATTENTION = "attention"
_LAYER_TYPE_ALIASES = {
    "mamba": MAMBA,
    "linear_attention": MAMBA,
    "attention": ATTENTION,
    "full_attention": ATTENTION,
}


class ConfigError(ValueError):
    """A checkpoint config that granite-onnx cannot export; the message says what and how to fix it."""


@dataclass(frozen=True)
class HybridConfig:
    vocab_size: int
    hidden_size: int
    layer_types: tuple[str, ...]
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int  # per expert
    shared_intermediate_size: int  # shared expert, or the dense MLP when num_experts == 0
    num_experts: int
    num_experts_per_tok: int
    mamba_n_heads: int
    mamba_d_head: int
    mamba_d_state: int
    mamba_n_groups: int = 1
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    attention_bias: bool = False
    rms_norm_eps: float = 1e-5
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    logits_scaling: float = 1.0
    tie_word_embeddings: bool = True
    position_embedding_type: str = "nope"  # "nope" | "rope"
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    name: str = "custom"
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    # ------------------------------------------------------------------ derived
    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def conv_dim(self) -> int:
        return self.mamba_d_inner + 2 * self.mamba_n_groups * self.mamba_d_state

    @property
    def has_experts(self) -> bool:
        return self.num_experts > 0

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == ATTENTION)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def __post_init__(self) -> None:
        self.validate()

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(msg)

        for t in self.layer_types:
            if t not in (MAMBA, ATTENTION):
                fail(f"unknown layer type {t!r}; expected 'mamba'/'linear_attention' or "
                     "'attention'/'full_attention'")
        if not self.layer_types:
            fail("the model has no layers (num_hidden_layers = 0)")
        if ATTENTION in self.layer_types:
            if self.hidden_size % self.num_attention_heads:
                fail(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                     f"{self.num_attention_heads}")
            if self.num_attention_heads % self.num_key_value_heads:
                fail(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                     f"num_key_value_heads {self.num_key_value_heads}")
        if MAMBA in self.layer_types:
            if self.mamba_n_heads * self.mamba_d_head != self.mamba_d_inner:
                fail(f"mamba widths disagree: mamba_n_heads ({self.mamba_n_heads}) × mamba_d_head "
                     f"({self.mamba_d_head}) = {self.mamba_n_heads * self.mamba_d_head}, but "
                     f"mamba_expand × hidden_size = {self.mamba_d_inner}; fix config.json so they match")
            if self.mamba_n_heads % self.mamba_n_groups:
                fail(f"mamba_n_heads {self.mamba_n_heads} is not a multiple of mamba_n_groups "
                     f"{self.mamba_n_groups}")
            if self.mamba_d_conv < 2:
                fail(f"mamba_d_conv={self.mamba_d_conv} is not supported (needs ≥ 2)")
        if self.position_embedding_type not in ("nope", "rope"):
            fail(f"position_embedding_type {self.position_embedding_type!r} is not supported; "
                 "expected none/'nope' or 'rope'")
        if self.num_experts < 0 or (self.num_experts > 0 and not
                                    0 < self.num_experts_per_tok <= self.num_experts):
            fail(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_local_experts="
                 f"{self.num_experts}")

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf(cls, hf: Any, *, name: str = "custom") -> "HybridConfig":
        """From a transformers config object, a config.json dict, or a path to a folder/config.json.

        Accepts what transformers accepts: layer types 'mamba'/'attention' and
        'linear_attention'/'full_attention'; position embedding None/'nope'/'rope';
        num_local_experts = 0 for dense models.
        """
        if isinstance(hf, (str, Path)):
            p = Path(hf)
            p = p / "config.json" if p.is_dir() else p
            if not p.exists():
                raise ConfigError(f"{p} does not exist: a model folder needs a config.json "
                                  "(an HF checkpoint folder saved with save_pretrained)")
            try:
                d = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p} is not valid JSON ({e}); re-download or re-save the checkpoint") from e
        elif isinstance(hf, Mapping):
            d = dict(hf)
        else:
            d = hf.to_dict() if hasattr(hf, "to_dict") else dict(vars(hf))
            # A loaded transformers config has already normalised layer types.
            lt = getattr(hf, "layer_types", None)
            if lt is not None:
                d["layer_types"] = list(lt)
        mt = d.get("model_type")
        if mt != "granitemoehybrid":
            raise ConfigError(f"model_type {mt!r} is not supported: granite-onnx exports Granite 4.0 "
                              "hybrid checkpoints (model_type 'granitemoehybrid')")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {d['hidden_act']!r} is not supported (Granite uses 'silu')")
        n_layers = int(d["num_hidden_layers"])
        lt = d.get("layer_types") or d.get("layers_block_type") or ["mamba"] * n_layers
        try:
            layer_types = tuple(_LAYER_TYPE_ALIASES[t] for t in lt)
        except KeyError as e:
            raise ConfigError(f"unknown layer type {e.args[0]!r} in config.json") from None
        if len(layer_types) != n_layers:
            raise ConfigError(f"config.json lists {len(layer_types)} layer_types but "
                              f"num_hidden_layers={n_layers}")
        hidden = int(d["hidden_size"])
        expand = int(d.get("mamba_expand", 2))
        n_heads = int(d.get("mamba_n_heads", 128))
        d_head = d.get("mamba_d_head", "auto")
        d_head = (expand * hidden) // n_heads if d_head in ("auto", None) else int(d_head)
        pos = d.get("position_embedding_type") or "nope"
        rope = d.get("rope_parameters") or {}
        theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        if rope.get("rope_type", "default") not in ("default",) and pos == "rope":
            raise ConfigError(f"rope_type {rope.get('rope_type')!r} is not supported (only default RoPE)")
        tsl = d.get("time_step_limit") or (0.0, math.inf)
        n_exp = int(d.get("num_local_experts") or 0)
        eos = d.get("eos_token_id")
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            layer_types=layer_types,
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
            intermediate_size=int(d["intermediate_size"]),
            shared_intermediate_size=int(d.get("shared_intermediate_size", 1024)),
            num_experts=n_exp,
            num_experts_per_tok=int(d.get("num_experts_per_tok") or 0) if n_exp else 0,
            mamba_n_heads=n_heads,
            mamba_d_head=d_head,
            mamba_d_state=int(d.get("mamba_d_state", 256)),
            mamba_n_groups=int(d.get("mamba_n_groups", 1)),
            mamba_d_conv=int(d.get("mamba_d_conv", 4)),
            mamba_expand=expand,
            mamba_chunk_size=int(d.get("mamba_chunk_size", 256)),
            mamba_conv_bias=bool(d.get("mamba_conv_bias", True)),
            mamba_proj_bias=bool(d.get("mamba_proj_bias", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            embedding_multiplier=float(d.get("embedding_multiplier", 1.0)),
            residual_multiplier=float(d.get("residual_multiplier", 1.0)),
            attention_multiplier=float(d.get("attention_multiplier", 1.0)),
            logits_scaling=float(d.get("logits_scaling", 1.0)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            position_embedding_type=pos,
            rope_theta=theta,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            time_step_limit=(_float(tsl[0]), _float(tsl[1])),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id"),
            name=name,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict that transformers loads as GraniteMoeHybridConfig."""
        d: dict[str, Any] = {
            "model_type": "granitemoehybrid",
            "architectures": ["GraniteMoeHybridForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "layer_types": list(self.layer_types),
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": self.intermediate_size,
            "shared_intermediate_size": self.shared_intermediate_size,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "mamba_n_heads": self.mamba_n_heads,
            "mamba_d_head": self.mamba_d_head,
            "mamba_d_state": self.mamba_d_state,
            "mamba_n_groups": self.mamba_n_groups,
            "mamba_d_conv": self.mamba_d_conv,
            "mamba_expand": self.mamba_expand,
            "mamba_chunk_size": self.mamba_chunk_size,
            "mamba_conv_bias": self.mamba_conv_bias,
            "mamba_proj_bias": self.mamba_proj_bias,
            "attention_bias": self.attention_bias,
            "rms_norm_eps": self.rms_norm_eps,
            "embedding_multiplier": self.embedding_multiplier,
            "residual_multiplier": self.residual_multiplier,
            "attention_multiplier": self.attention_multiplier,
            "logits_scaling": self.logits_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "position_embedding_type": "rope" if self.position_embedding_type == "rope" else None,
            "max_position_embeddings": self.max_position_embeddings,
            "time_step_limit": [self.time_step_limit[0], self.time_step_limit[1]],
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        if self.position_embedding_type == "rope":
            d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        return d

    def to_json_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["time_step_limit"] = list(self.time_step_limit)
        return d

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any]) -> "HybridConfig":
        d = dict(d)
        d["layer_types"] = tuple(d["layer_types"])
        d["time_step_limit"] = tuple(d["time_step_limit"])
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = tuple(d["eos_token_id"])
        return cls(**d)

    def with_layers(self, n: int) -> "HybridConfig":
        """The same widths with `n` layers; attention layers keep their relative positions."""
        return dataclasses.replace(self, layer_types=_resample_layer_types(self.layer_types, n),
                                   name=f"{self.name}-{n}L")

    def num_parameters(self) -> int:
        h = self.hidden_size
        p = self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h
        for t in self.layer_types:
            p += 2 * h  # two norms
            if t == MAMBA:
                proj = self.mamba_d_inner + self.conv_dim + self.mamba_n_heads
                p += h * proj + (proj if self.mamba_proj_bias else 0)
                p += self.conv_dim * self.mamba_d_conv + (self.conv_dim if self.mamba_conv_bias else 0)
                p += 3 * self.mamba_n_heads + self.mamba_d_inner + self.mamba_d_inner * h
            else:
                kv = self.num_key_value_heads * self.head_dim
                p += h * h * 2 + 2 * h * kv
            p += 3 * h * self.shared_intermediate_size
            if self.num_experts:
                p += self.num_experts * h + self.num_experts * 3 * h * self.intermediate_size
        return p


def _float(v: Any) -> float:
    """A float from config.json; transformers ≥ 5 writes infinities as {"__float__": "Infinity"}."""
    if isinstance(v, Mapping) and "__float__" in v:
        v = v["__float__"]
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"expected a number in config.json, got {v!r}") from None


def _resample_layer_types(types: tuple[str, ...], n: int) -> tuple[str, ...]:
    if n <= 0:
        raise ConfigError(f"--layers must be ≥ 1, got {n}")
    if n == len(types):
        return types
    if all(t == ATTENTION for t in types) or ATTENTION not in types:
        return (types[0],) * n
    # Keep the attention fraction, at evenly spread positions (e.g. 40 layers with attention at
    # 5/15/25/35 → 4 layers with attention at layer 2).
    frac = types.count(ATTENTION) / len(types)
    n_attn = max(1, round(n * frac))
    out = [MAMBA] * n
    for k in range(n_attn):
        out[min(n - 1, int((k + 0.5) * n / n_attn))] = ATTENTION
    return tuple(out)


# ---------------------------------------------------------------------- presets
# Published shapes (shared/data/granite-4.0-family.json). attention_layers are 0-based.
_COMMON: dict[str, Any] = dict(
    rms_norm_eps=1e-5, embedding_multiplier=12.0, tie_word_embeddings=True, mamba_d_conv=4,
    mamba_expand=2, mamba_n_groups=1, mamba_d_state=128, mamba_chunk_size=256, mamba_conv_bias=True,
    mamba_proj_bias=False, attention_bias=False, vocab_size=100352, bos_token_id=100257,
    eos_token_id=100257, pad_token_id=100256, position_embedding_type="nope",
)

FAMILY: dict[str, dict[str, Any]] = {
    "granite-4.0-h-tiny": dict(hidden_size=1536, n_layers=40, attn=[5, 15, 25, 35], num_attention_heads=12,
                               num_key_value_heads=4, intermediate_size=512, shared_intermediate_size=1024,
                               num_experts=64, num_experts_per_tok=6, mamba_n_heads=48, mamba_d_head=64,
                               attention_multiplier=0.0078125, residual_multiplier=0.22, logits_scaling=6.0,
                               max_position_embeddings=131072),
    "granite-4.0-tiny-preview": dict(hidden_size=1536, n_layers=40, attn=[5, 15, 25, 35], num_attention_heads=12,
                                     num_key_value_heads=4, intermediate_size=512, shared_intermediate_size=1024,
                                     num_experts=62, num_experts_per_tok=6, mamba_n_heads=48, mamba_d_head=64,
                                     attention_multiplier=0.0078125, residual_multiplier=0.22, logits_scaling=6.0,
                                     vocab_size=49160, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                     max_position_embeddings=131072),
    "granite-4.0-h-small": dict(hidden_size=4096, n_layers=40, attn=[5, 15, 25, 35], num_attention_heads=32,
                                num_key_value_heads=8, intermediate_size=768, shared_intermediate_size=1536,
                                num_experts=72, num_experts_per_tok=10, mamba_n_heads=128, mamba_d_head=64,
                                attention_multiplier=0.0078125, residual_multiplier=0.22, logits_scaling=16.0,
                                max_position_embeddings=131072),
    "granite-4.0-h-micro": dict(hidden_size=2048, n_layers=40, attn=[5, 15, 25, 35], num_attention_heads=32,
                                num_key_value_heads=8, intermediate_size=8192, shared_intermediate_size=8192,
                                num_experts=0, num_experts_per_tok=0, mamba_n_heads=64, mamba_d_head=64,
                                attention_multiplier=0.015625, residual_multiplier=0.22, logits_scaling=8.0,
                                max_position_embeddings=131072),
    "granite-4.0-h-1b": dict(hidden_size=1536, n_layers=40, attn=[5, 15, 25, 35], num_attention_heads=12,
                             num_key_value_heads=4, intermediate_size=4096, shared_intermediate_size=4096,
                             num_experts=0, num_experts_per_tok=0, mamba_n_heads=48, mamba_d_head=64,
                             attention_multiplier=0.0078125, residual_multiplier=0.22, logits_scaling=6.0,
                             max_position_embeddings=131072),
    "granite-4.0-h-350m": dict(hidden_size=768, n_layers=32, attn=[10, 13, 17, 27], num_attention_heads=12,
                               num_key_value_heads=4, intermediate_size=2048, shared_intermediate_size=2048,
                               num_experts=0, num_experts_per_tok=0, mamba_n_heads=48, mamba_d_head=32,
                               attention_multiplier=0.015625, residual_multiplier=0.246, logits_scaling=3.0,
                               max_position_embeddings=32768),
    "granite-4.0-micro": dict(hidden_size=2560, n_layers=40, attn="all", num_attention_heads=40,
                              num_key_value_heads=8, intermediate_size=8192, shared_intermediate_size=8192,
                              num_experts=0, num_experts_per_tok=0, mamba_n_heads=80, mamba_d_head=64,
                              attention_multiplier=0.015625, residual_multiplier=0.22, logits_scaling=10.0,
                              position_embedding_type="rope", rope_theta=1e7, max_position_embeddings=131072),
    "granite-4.0-1b": dict(hidden_size=2048, n_layers=40, attn="all", num_attention_heads=16,
                           num_key_value_heads=4, intermediate_size=4096, shared_intermediate_size=4096,
                           num_experts=0, num_experts_per_tok=0, mamba_n_heads=64, mamba_d_head=64,
                           attention_multiplier=0.0078125, residual_multiplier=0.22, logits_scaling=8.0,
                           position_embedding_type="rope", rope_theta=1e7, max_position_embeddings=131072),
}

# Small shapes for tests and benchmarks. Odd multipliers and eps so that a dropped field cannot pass
# by matching a default.
SMALL: dict[str, dict[str, Any]] = {
    # The benchmark 'small' shape: hidden 256, 8 layers with attention at 3 and 7, 8 experts top-2,
    # 8 mamba heads × 64, d_state 64.
    "small": dict(hidden_size=256, n_layers=8, attn=[3, 7], num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=256, shared_intermediate_size=512, num_experts=8, num_experts_per_tok=2,
                  mamba_n_heads=8, mamba_d_head=64, mamba_d_state=64, mamba_chunk_size=64,
                  attention_multiplier=0.0625, residual_multiplier=0.22, logits_scaling=4.0,
                  embedding_multiplier=12.0, vocab_size=8000, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                  max_position_embeddings=65536),
    # Parity-test shape: tiny, odd values everywhere.
    "test": dict(hidden_size=64, n_layers=4, attn=[1], num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=48, shared_intermediate_size=80, num_experts=6, num_experts_per_tok=2,
                 mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, mamba_chunk_size=16,
                 rms_norm_eps=1e-3, attention_multiplier=0.37, residual_multiplier=0.61, logits_scaling=2.7,
                 embedding_multiplier=3.3, vocab_size=509, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                 max_position_embeddings=4096),
}
# Granite-Tiny widths with 4 layers (attention at 2): the shape-realistic benchmark model.
ALIASES = {"tiny-4L": ("granite-4.0-tiny-preview", 4)}


def preset_names() -> list[str]:
    return sorted(FAMILY) + sorted(SMALL) + sorted(ALIASES)


def preset(name: str, *, layers: int | None = None) -> HybridConfig:
    """A preset config; `layers` keeps the widths with fewer (or more) layers."""
    if name in ALIASES:
        base, n = ALIASES[name]
        return dataclasses.replace(preset(base, layers=layers or n), name=name)
    table = FAMILY if name in FAMILY else SMALL if name in SMALL else None
    if table is None:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    spec = dict(_COMMON)
    if table is SMALL:
        spec.update(rms_norm_eps=1e-5)
    spec.update(table[name])
    n = spec.pop("n_layers")
    attn = spec.pop("attn")
    types = tuple(ATTENTION if attn == "all" or i in attn else MAMBA for i in range(n))
    cfg = HybridConfig(layer_types=types, name=name, **spec)
    return cfg.with_layers(layers) if layers and layers != n else cfg
