"""A stateful ONNX Runtime session over an exported model folder, driven with I/O binding.

`GraniteSession.step(input_ids, attention_mask, state)` runs one forward pass (a prefill chunk or one
decode token) and returns the logits and the next state. The state lives in OrtValues from step to step
(on the GPU under CUDA): only the logits — or, through `argmax_ids`, only the chosen ids — reach numpy.

Recurrent state (conv + SSM) is double-buffered: each step reads one buffer set and writes the other, so
no state tensor is allocated per token. K/V grows with the sequence in the portable graph.

Imports: onnxruntime and numpy only (never torch).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from granite_onnx.export import io
from granite_onnx.models.config import HybridConfig

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
GRANITE_CONFIG = "granite_config.json"


class RuntimeError_(RuntimeError):
    """A model folder or request the runtime cannot serve; the message says why and how to fix it."""


ModelLoadError = RuntimeError_


def import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "granite-onnx's runtime needs ONNX Runtime: pip install 'granite-onnx[cpu]' (the onnxruntime "
            "package), or 'granite-onnx[gpu]' (onnxruntime-gpu) for CUDA — never both") from e
    return ort


def _providers(ort: Any, provider: str) -> tuple[list[Any], str]:
    if provider == "cpu":
        return ["CPUExecutionProvider"], "cpu"
    if provider == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError_(
                "provider 'cuda' was asked for, but this ONNX Runtime has no CUDA execution provider "
                f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu instead of "
                "onnxruntime on a machine with an NVIDIA GPU, or use provider='cpu'")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"
    raise RuntimeError_(f"unknown provider {provider!r}; use 'cpu' or 'cuda'")


def read_folder_config(path: Path) -> tuple[HybridConfig, dict[str, Any]]:
    path = Path(path)
    if not path.is_dir():
        raise RuntimeError_(f"{path} is not a model folder; export one with `granite-onnx export ... --out DIR`")
    for f in (MODEL_FILE, GRANITE_CONFIG):
        if not (path / f).exists():
            raise RuntimeError_(f"{path} has no {f}: not a granite-onnx model folder (or a partial copy); "
                                "re-export it with `granite-onnx export`")
    if not (path / DATA_FILE).exists():
        raise RuntimeError_(f"{path} is missing its weights file {DATA_FILE}; copy the whole folder or re-export it")
    meta = json.loads((path / GRANITE_CONFIG).read_text())
    return HybridConfig.from_json_dict(meta["config"]), meta


@dataclass
class State:
    """The recurrent state of a batch: one OrtValue per past_* input, plus the sequence length so far."""

    batch: int
    values: dict[str, Any]
    past_len: int = 0
    spare: dict[str, Any] = field(default_factory=dict)  # the other half of the ping-pong buffers


class GraniteSession:
    def __init__(self, path: str | Path, *, provider: str = "cpu", threads: int | None = None,
                 optimization: str = "all") -> None:
        ort = import_ort()
        self.ort = ort
        self.path = Path(path)
        self.cfg, self.meta = read_folder_config(self.path)
        providers, self.device = _providers(ort, provider)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        so.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[optimization]
        so.log_severity_level = 3
        try:
            self.sess = ort.InferenceSession(str(self.path / MODEL_FILE), so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise RuntimeError_(f"ONNX Runtime could not load {self.path / MODEL_FILE}: {e}") from e
        self.specs = io.state_specs(self.cfg)
        self.logits_mode = self.meta.get("logits", "last")
        names = {i.name for i in self.sess.get_inputs()}
        missing = [n for n in io.input_names(self.cfg) if n not in names]
        if missing:
            raise RuntimeError_(f"{self.path / MODEL_FILE} lacks inputs {missing[:3]}: it does not follow the "
                                "granite-onnx state contract; re-export it")
        self._device_id = 0

    # ------------------------------------------------------------------ state
    def _zeros(self, shape: tuple[int, ...]) -> Any:
        v = self.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, self.device, self._device_id)
        v.update_inplace(np.zeros(shape, np.float32))  # the allocation is uninitialised
        return v

    def new_state(self, batch: int) -> State:
        values, spare = {}, {}
        for s in self.specs:
            values[s.past_name] = self._zeros(s.concrete_shape(batch, 0))
            if s.kind in ("conv_state", "recurrent_state"):
                spare[s.past_name] = self._zeros(s.concrete_shape(batch, 0))
        return State(batch, values, 0, spare)

    def state_to_numpy(self, state: State) -> dict[str, np.ndarray]:
        return {k: v.numpy().copy() for k, v in state.values.items()}

    def state_from_numpy(self, arrays: dict[str, np.ndarray], past_len: int) -> State:
        batch = next(iter(arrays.values())).shape[0]
        st = self.new_state(batch)
        for s in self.specs:
            a = np.ascontiguousarray(arrays[s.past_name], dtype=np.float32)
            if s.kind in ("key", "value"):
                st.values[s.past_name] = self.ort.OrtValue.ortvalue_from_numpy(a.copy(), self.device, self._device_id)
            else:
                st.values[s.past_name].update_inplace(a)
        st.past_len = past_len
        return st

    # ------------------------------------------------------------------- step
    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, state: State, *,
             logits_to_host: bool = True) -> tuple[Any, State]:
        """One forward pass over input_ids [B, T] with attention_mask [B, past+T].

        Returns (logits, state'): logits as numpy [B, kept, V] (or the OrtValue when logits_to_host is
        False). `state` is consumed: its ping-pong buffers now belong to the returned state.
        """
        b, t = input_ids.shape
        if attention_mask.shape != (b, state.past_len + t):
            raise RuntimeError_(f"attention_mask has shape {attention_mask.shape}, expected {(b, state.past_len + t)}")
        binding = self.sess.io_binding()
        binding.bind_cpu_input(io.INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input(io.ATTENTION_MASK, np.ascontiguousarray(attention_mask, dtype=np.int64))
        for name, v in state.values.items():
            binding.bind_ortvalue_input(name, v)
        binding.bind_output(io.LOGITS, self.device, self._device_id)
        out_names = [io.LOGITS]
        for s in self.specs:
            if s.past_name in state.spare:
                binding.bind_ortvalue_output(s.present_name, state.spare[s.past_name])
            else:
                binding.bind_output(s.present_name, self.device, self._device_id)
            out_names.append(s.present_name)
        self.sess.run_with_iobinding(binding)
        outs = binding.get_outputs()
        new_values, new_spare = {}, {}
        for s, v in zip(self.specs, outs[1:]):
            if s.past_name in state.spare:
                new_values[s.past_name] = state.spare[s.past_name]
                new_spare[s.past_name] = state.values[s.past_name]
            else:
                new_values[s.past_name] = v
        new_state = State(b, new_values, state.past_len + t, new_spare)
        logits = outs[0].numpy() if logits_to_host else outs[0]
        return logits, new_state

    def run_raw(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Plain `InferenceSession.run` with every output by name (validation)."""
        names = [o.name for o in self.sess.get_outputs()]
        return dict(zip(names, self.sess.run(names, feeds)))


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))
