"""Weights, one layer at a time: from a local HF folder (safetensors, single or sharded) or seeded random.

A `WeightSource` hands out the embedding, the final norm, the LM head and each decoder layer's tensors in
*our* layout (the parameter names of models/layers.py, linear weights [in, out]); never the whole model
at once, so exporting a 7B checkpoint needs about one layer of memory.

HF checkpoint names (as `save_pretrained` writes them) → ours, for layer i (prefix model.layers.{i}.):
    input_layernorm.weight                 → input_norm          post_attention_layernorm.weight → post_norm
    mamba.in_proj.weight [P, D]            → mamba.in_proj [D, P] (transposed)
    mamba.conv1d.weight [C, 1, K]          → mamba.conv_weight [C, K]
    mamba.{conv1d.bias, dt_bias, A_log, D, norm.weight} → mamba.{conv_bias, dt_bias, A_log, D, norm}
    mamba.out_proj.weight [D, d_inner]     → mamba.out_proj [d_inner, D]
    self_attn.{q,k,v,o}_proj.weight        → attn.{q,k,v,o}_proj (transposed)
    block_sparse_moe.router.layer.weight [E, D]        → ffn.router [D, E]
    block_sparse_moe.input_linear.weight [E, 2I, D]    → ffn.experts_gate_up [E, D, 2I]
    block_sparse_moe.output_linear.weight [E, D, I]    → ffn.experts_down [E, I, D]
    shared_mlp.input_linear.weight [2S, D] → ffn.shared_in [D, 2S]; output_linear [D, S] → ffn.shared_out [S, D]
(transformers' in-memory names `router.weight`, `experts.gate_up_proj`, `experts.down_proj` are accepted too.)
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from granite_onnx.models.config import ATTENTION, HybridConfig

log = logging.getLogger(__name__)


class WeightsError(ValueError):
    """A checkpoint whose tensors are missing, misnamed or misshapen; the message names the tensor."""


# our name → (HF names, accepted in order; transform from HF layout to ours)
_T = Callable[[torch.Tensor], torch.Tensor]
_ID: _T = lambda t: t  # noqa: E731
_TR: _T = lambda t: t.transpose(-1, -2)  # noqa: E731


def _layer_map(cfg: HybridConfig, kind: str) -> dict[str, tuple[tuple[str, ...], _T]]:
    m: dict[str, tuple[tuple[str, ...], _T]] = {
        "input_norm": (("input_layernorm.weight",), _ID),
        "post_norm": (("post_attention_layernorm.weight",), _ID),
        "ffn.shared_in": (("shared_mlp.input_linear.weight",), _TR),
        "ffn.shared_out": (("shared_mlp.output_linear.weight",), _TR),
    }
    if cfg.has_experts:
        m["ffn.router"] = (("block_sparse_moe.router.layer.weight", "block_sparse_moe.router.weight"), _TR)
        m["ffn.experts_gate_up"] = (("block_sparse_moe.input_linear.weight",
                                     "block_sparse_moe.experts.gate_up_proj"), _TR)
        m["ffn.experts_down"] = (("block_sparse_moe.output_linear.weight",
                                  "block_sparse_moe.experts.down_proj"), _TR)
    if kind == ATTENTION:
        for p in "qkvo":
            m[f"attn.{p}_proj"] = ((f"self_attn.{p}_proj.weight",), _TR)
            if cfg.attention_bias:
                m[f"attn.{p}_bias"] = ((f"self_attn.{p}_proj.bias",), _ID)
    else:
        m.update({
            "mamba.in_proj": (("mamba.in_proj.weight",), _TR),
            "mamba.conv_weight": (("mamba.conv1d.weight",), lambda t: t[:, 0, :]),
            "mamba.dt_bias": (("mamba.dt_bias",), _ID),
            "mamba.A_log": (("mamba.A_log",), _ID),
            "mamba.D": (("mamba.D",), _ID),
            "mamba.norm": (("mamba.norm.weight",), _ID),
            "mamba.out_proj": (("mamba.out_proj.weight",), _TR),
        })
        if cfg.mamba_conv_bias:
            m["mamba.conv_bias"] = (("mamba.conv1d.bias",), _ID)
        if cfg.mamba_proj_bias:
            m["mamba.in_proj_bias"] = (("mamba.in_proj.bias",), _ID)
            m["mamba.out_proj_bias"] = (("mamba.out_proj.bias",), _ID)
    return m


def layer_shapes(cfg: HybridConfig, kind: str) -> dict[str, tuple[int, ...]]:
    """Our layout's shape of every tensor of one layer (from the torch module itself)."""
    from granite_onnx.models.layers import make_layer

    with torch.device("meta"):
        layer = make_layer(cfg, kind)
    return {k: tuple(v.shape) for k, v in layer.named_parameters()}


class WeightSource:
    """Base: subclasses provide `_load_layer(i)`, `embed()`, `final_norm()`, `lm_head()`."""

    cfg: HybridConfig

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Every parameter of layer i, in our layout and names, shapes checked."""
        kind = self.cfg.layer_types[i]
        tensors = self._load_layer(i)
        expected = layer_shapes(self.cfg, kind)
        if "mamba.conv_bias" in expected and "mamba.conv_bias" not in tensors:
            tensors["mamba.conv_bias"] = torch.zeros(expected["mamba.conv_bias"])
        for name, shape in expected.items():
            if name not in tensors:
                raise WeightsError(f"layer {i} ({kind}): tensor {name} is missing")
            if tuple(tensors[name].shape) != shape:
                raise WeightsError(f"layer {i} ({kind}): tensor {name} has shape "
                                   f"{tuple(tensors[name].shape)}, expected {shape}")
        return {k: tensors[k].float().contiguous() for k in expected}

    def _load_layer(self, i: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def embed(self) -> torch.Tensor:
        raise NotImplementedError

    def final_norm(self) -> torch.Tensor:
        raise NotImplementedError

    def lm_head(self) -> torch.Tensor | None:
        """[vocab, hidden], or None when tied to the embedding."""
        raise NotImplementedError

    def hf_state_dict(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The whole model as HF checkpoint tensors (for writing a reference folder), layer by layer."""
        yield "model.embed_tokens.weight", self.embed()
        yield "model.norm.weight", self.final_norm()
        head = self.lm_head()
        if head is not None:
            yield "lm_head.weight", head
        for i, kind in enumerate(self.cfg.layer_types):
            ours = self.layer(i)
            for name, (hf_names, fwd) in _layer_map(self.cfg, kind).items():
                t = ours[name]
                hf_name = hf_names[0]
                if name == "mamba.conv_weight":
                    t = t[:, None, :]
                elif fwd is _TR:
                    t = t.transpose(-1, -2)
                yield f"model.layers.{i}.{hf_name}", t.contiguous()


class HFWeights(WeightSource):
    """Tensors read lazily from model.safetensors or model.safetensors.index.json shards."""

    def __init__(self, folder: str | Path, cfg: HybridConfig | None = None) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        self.cfg = cfg or HybridConfig.from_hf(self.folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.exists():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise WeightsError(f"{index} is not a valid safetensors index ({e})") from e
            files = sorted(set(wm.values()))
        elif single.exists():
            files, wm = ["model.safetensors"], None
        else:
            raise WeightsError(f"{self.folder} has no model.safetensors or model.safetensors.index.json; "
                               "save the checkpoint with save_pretrained(safe_serialization=True)")
        self._handles = {}
        self._where: dict[str, str] = {}
        for f in files:
            p = self.folder / f
            if not p.exists():
                raise WeightsError(f"shard {p} listed in the index is missing")
            try:
                h = safe_open(str(p), "pt")
            except Exception as e:  # safetensors raises its own error types
                raise WeightsError(f"{p} is not a readable safetensors file ({e}); re-save the checkpoint") from e
            self._handles[f] = h
            for k in h.keys():
                self._where[k] = f
        if wm is not None:
            for k, f in wm.items():
                if self._where.get(k) != f:
                    raise WeightsError(f"index lists {k} in {f}, but that shard does not hold it")

    def _get(self, name: str) -> torch.Tensor:
        f = self._where.get(name)
        if f is None:
            raise WeightsError(f"tensor {name} is missing from the checkpoint in {self.folder}")
        return self._handles[f].get_tensor(name)

    def _get_any(self, names: tuple[str, ...], what: str) -> torch.Tensor:
        for n in names:
            if n in self._where:
                return self._get(n)
        raise WeightsError(f"tensor {names[0]} ({what}) is missing from the checkpoint in {self.folder}")

    def _load_layer(self, i: int) -> dict[str, torch.Tensor]:
        kind = self.cfg.layer_types[i]
        out = {}
        for name, (hf_names, fn) in _layer_map(self.cfg, kind).items():
            full = tuple(f"model.layers.{i}.{n}" for n in hf_names)
            t = self._get_any(full, f"layer {i} {kind}")
            expected = _hf_shape(self.cfg, kind, name)
            if expected is not None and tuple(t.shape) != expected:
                raise WeightsError(f"tensor {full[0]} has shape {tuple(t.shape)}, expected {expected} "
                                   "from config.json")
            out[name] = fn(t)
        return out

    def embed(self) -> torch.Tensor:
        t = self._get("model.embed_tokens.weight").float()
        exp = (self.cfg.vocab_size, self.cfg.hidden_size)
        if tuple(t.shape) != exp:
            raise WeightsError(f"tensor model.embed_tokens.weight has shape {tuple(t.shape)}, expected {exp}")
        return t

    def final_norm(self) -> torch.Tensor:
        return self._get("model.norm.weight").float()

    def lm_head(self) -> torch.Tensor | None:
        if self.cfg.tie_word_embeddings:
            return None
        return self._get("lm_head.weight").float()


def _hf_shape(cfg: HybridConfig, kind: str, ours: str) -> tuple[int, ...] | None:
    shape = layer_shapes(cfg, kind).get(ours)
    if shape is None:
        return None
    if ours == "mamba.conv_weight":
        return (shape[0], 1, shape[1])
    fn = _layer_map(cfg, kind)[ours][1]
    return tuple(shape[:-2]) + (shape[-1], shape[-2]) if fn is _TR else shape


class RandomWeights(WeightSource):
    """Seeded random weights at the config's shapes. Layer i depends only on (seed, i), so exporting
    one layer at a time or the whole model gives the same numbers."""

    def __init__(self, cfg: HybridConfig, seed: int = 0) -> None:
        self.cfg, self.seed = cfg, seed

    def _gen(self, part: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 100_003 + part)

    def _load_layer(self, i: int) -> dict[str, torch.Tensor]:
        g = self._gen(i + 1)
        out = {}
        d = self.cfg.hidden_size
        for name, shape in layer_shapes(self.cfg, self.cfg.layer_types[i]).items():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("input_norm", "post_norm", "norm"):
                t = 1.0 + 0.1 * torch.randn(shape, generator=g)
            elif leaf == "A_log":
                t = torch.log(torch.linspace(1.0, 16.0, shape[0])) + 0.1 * torch.rand(shape, generator=g)
            elif leaf == "D":
                t = 1.0 + 0.1 * torch.randn(shape, generator=g)
            elif leaf == "dt_bias":  # softplus⁻¹ of dt in [1e-3, 1e-1], Mamba-2's init
                dt = torch.exp(torch.rand(shape, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
                t = dt + torch.log(-torch.expm1(-dt))
            elif leaf.endswith("bias"):
                t = 0.02 * torch.randn(shape, generator=g)
            elif leaf == "conv_weight":
                t = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
            else:  # projections: fan-in scaled so activations stay O(1) through the layers
                fan_in = shape[-2]
                t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
            out[name] = t
        del d
        return out

    def embed(self) -> torch.Tensor:
        return torch.randn(self.cfg.vocab_size, self.cfg.hidden_size, generator=self._gen(0)) * 0.5

    def final_norm(self) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(self.cfg.hidden_size, generator=self._gen(10_000))

    def lm_head(self) -> torch.Tensor | None:
        if self.cfg.tie_word_embeddings:
            return None
        return torch.randn(self.cfg.vocab_size, self.cfg.hidden_size, generator=self._gen(10_001)) * 0.5


def open_source(model: str | Path | None = None, *, preset_name: str | None = None, seed: int = 0,
                layers: int | None = None) -> WeightSource:
    """HF folder or preset (+ seed, + layer override) → a WeightSource."""
    from granite_onnx.models.config import preset

    if model is not None:
        src = HFWeights(model)
        if layers is not None:
            raise WeightsError("--layers applies to presets only; a checkpoint keeps its layers")
        return src
    assert preset_name is not None
    return RandomWeights(preset(preset_name, layers=layers), seed)


def reference_source(model_dir: str | Path, reference: str | Path, seed: int | None = None,
                     layers: int | None = None) -> WeightSource:
    """The float32 weights an exported folder is compared with: an HF checkpoint folder, or a preset name
    whose seed and layer count default to those in the folder's export_report.json."""
    from granite_onnx.models.config import preset

    ref = Path(reference)
    if ref.is_dir():
        return HFWeights(ref)
    info: dict = {}
    rep = Path(model_dir) / "export_report.json"
    if rep.exists():
        s = json.loads(rep.read_text()).get("source")
        info = s if isinstance(s, dict) else {}
    seed = seed if seed is not None else int(info.get("seed", 0))
    layers = layers if layers is not None else info.get("layers")
    return RandomWeights(preset(str(reference), layers=layers), seed)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def load_torch_model(src: WeightSource):  # type: ignore[no-untyped-def]
    """Our TorchModel with all weights loaded (small models: tests and validation)."""
    from granite_onnx.models.layers import TorchModel

    model = TorchModel(src.cfg)
    model.embed.data = src.embed()
    model.final_norm.data = src.final_norm()
    head = src.lm_head()
    if head is not None:
        model.lm_head.data = head
    for i, layer in enumerate(model.layers):
        layer.load_state_dict(src.layer(i), strict=True)
    return model.eval()


def save_hf_folder(src: WeightSource, folder: str | Path) -> Path:
    """Write an HF checkpoint folder (config.json + model.safetensors) for `src` — used to build the
    transformers reference for a preset."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(src.cfg.to_hf_dict(), indent=2))
    save_file(dict(src.hf_state_dict()), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
