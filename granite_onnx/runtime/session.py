"""A stateful ONNX Runtime session over an exported model folder, driven with I/O binding.

`GraniteSession.step(input_ids, attention_mask, state)` runs one forward pass (a prefill chunk or one
decode token) and returns the logits and the next state. The state lives in OrtValues from step to step
(on the GPU under CUDA); only the logits reach numpy — on CPU as a view of the buffer ONNX Runtime wrote,
under CUDA as one [B, kept, V] copy (the graph has no argmax, so greedy decoding copies the last logits,
not only the ids; the ids go back as one [B, 1] int64 host buffer).

Per state, two `IOBinding`s are made once and reused: binding p reads recurrent buffer set p and writes
set 1−p, so the recurrent state (conv + SSM) is bound once, never per token. Two layouts, chosen by the
folder (granite_config.json "recurrent_state") and the provider:

* "pingpong": the two sets are separate buffers, so no step reads a buffer it writes (in-place state
  biased every step under CUDA graphs in onnxruntime-genai). Portable graphs (their scan reads the past
  state in several places), and every folder under CUDA unless asked otherwise.
* "inplace" (fused graphs on the CPU): each recurrent past input is read only by the contrib op that
  writes its present output (export/exporter.py `recurrent_state_mode` checks the graph), and ONNX
  Runtime's CPU kernels read it before writing — LinearAttention copies past into present and then
  updates present; CausalConvWithState reads each channel's window first. Both sets are then one buffer:
  half the recurrent memory, and a faster step — LinearAttention alone runs 2× (1 token) to 4.5×
  (4 tokens) faster updating its state where it lies than copying it into the other set; whole decode
  steps, paired A/B over 16–20 interleaved rounds: `small` 3–10 % at batch 1, 11–23 % at batch 4, 15 % at
  16; tiny-4L 4 %. Outputs are identical (bit for bit) — tests/runtime/test_recurrent_state.py checks
  that against alternating buffers with the installed ONNX Runtime, so a kernel that stops reading before
  it writes fails there first. A run that fails midway may leave this state partly advanced (the error
  says so).

K/V has two layouts, chosen by the folder (granite_config.json "kv_cache"):

* "shared" (fused graphs, where every attention layer is a GroupQueryAttention): each K/V tensor is one
  capacity buffer [B, kv_heads, capacity, head_dim], bound as both past_* input and present.* output.
  GroupQueryAttention then writes only the new positions in place (its past/present share-buffer mode:
  the past length it is given equals the present length it computes) and reads the first past+T
  columns that the attention mask counts. The buffers are bound once per state like the recurrent ones;
  a state that outgrows its capacity gets a larger buffer (×1.5, the used columns copied), and callers
  that know the final length (`reserve`: a prompt plus max_new_tokens) allocate it once, so K/V is held
  once, never twice.
* "grow" (portable graphs: past and new K/V are concatenated): the K/V outputs are fresh buffers one
  step longer than the inputs, bound every step.

Per decode step the Python side then binds only the attention mask (one array view) — plus, under
"grow", the K/V inputs and outputs; the token ids and the logits buffers are bound once and written in place.

Imports: onnxruntime and numpy only (never torch).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from granite_onnx.export import io
from granite_onnx.models.config import HybridConfig
from granite_onnx.runtime import state as hoststate

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
GRANITE_CONFIG = "granite_config.json"

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


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
    if not (path / MODEL_FILE).exists() and (path / "config.json").exists():
        raise RuntimeError_(f"{path} is a Hugging Face checkpoint, not an exported model folder; export it first: "
                            f"granite-onnx export --model {path} --out {path.name}-onnx --optimize")
    for f in (MODEL_FILE, GRANITE_CONFIG):
        if not (path / f).exists():
            raise RuntimeError_(f"{path} has no {f}: not a granite-onnx model folder (or a partial copy); "
                                "re-export it with `granite-onnx export`")
    if not (path / DATA_FILE).exists():
        raise RuntimeError_(f"{path} is missing its weights file {DATA_FILE}; copy the whole folder or re-export it")
    meta = json.loads((path / GRANITE_CONFIG).read_text())
    return HybridConfig.from_json_dict(meta["config"]), meta


class _Bindings:
    """The per-state binding cache: two IOBindings (alternating) and the buffers bound to them once."""

    def __init__(self, sess: GraniteSession, state: State) -> None:
        self.pair = (sess.raw.binding(), sess.raw.binding())
        for p, b in enumerate(self.pair):
            for name in sess.recurrent_names:
                sess.raw.bind_input(b, name, state.rec[p][name])
                sess.raw.bind_output(b, sess.present_of[name], state.rec[1 - p][name])
        if state.kv_cap is not None:
            self.bind_kv(sess, state)
        self.bound: list[dict[str, Any]] = [{}, {}]  # per binding: input/output name → the object bound now
        self.ids = np.zeros((state.batch, 1), np.int64)  # decode token ids, written in place each step
        self.mask = hoststate.MaskBuffer()
        self.logits: dict[int, tuple[Any, np.ndarray | None]] = {}  # kept positions → (OrtValue, host view)

    def bind_kv(self, sess: GraniteSession, state: State) -> None:
        """Shared K/V: each capacity buffer is both the past input and the present output, in both bindings."""
        for b in self.pair:
            for s in sess.kv_specs:
                sess.raw.bind_input(b, s.past_name, state.kv[s.past_name])
                sess.raw.bind_output(b, s.present_name, state.kv[s.past_name])


@dataclass(eq=False)
class State:
    """The device state of a batch of sequences: K/V and recurrent OrtValues plus where each row starts.

    `past_len` is the number of columns of K/V and attention mask so far; `pads[r]` of them are left
    padding for row r (mask 0), the rest are real tokens. A state is consumed by `step`, which updates
    it in place and returns it: take a `snapshot` to keep a copy.
    """

    batch: int
    kv: dict[str, Any]  # past K/V names → OrtValue [B, kv_heads, past_len or kv_cap, head_dim]
    rec: tuple[dict[str, Any], dict[str, Any]]  # the two recurrent buffer sets (one and the same when in place)
    past_len: int = 0
    pads: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    parity: int = 0  # rec[parity] holds the current recurrent state
    run_s: float = 0.0  # seconds spent inside InferenceSession.run_with_iobinding (overhead accounting)
    runs: int = 0
    kv_cap: int | None = None  # shared K/V: the columns each buffer holds (≥ past_len); None: growing K/V
    _io: _Bindings | None = None

    def __post_init__(self) -> None:
        if self.pads.shape != (self.batch,):
            self.pads = np.zeros(self.batch, np.int64)

    @property
    def values(self) -> dict[str, Any]:
        """Every past_* input of the next step → its OrtValue."""
        return {**self.kv, **self.rec[self.parity]}

    @property
    def lengths(self) -> np.ndarray:
        """Real (unpadded) tokens per row [B]."""
        return self.past_len - self.pads

    def mask(self, new_tokens: int) -> np.ndarray:
        """The attention mask [B, past_len + new_tokens] for the next step (a reused buffer's view)."""
        assert self._io is not None
        return self._io.mask.view(self.pads, self.past_len + new_tokens)


class _Host:
    """A CPU OrtValue over a numpy array it shares memory with; the array is kept alive here.

    K/V outputs are allocated this way on CPU, not by ONNX Runtime's allocator: they grow by a chunk
    every step, and freed blocks of the previous (smaller) size stay in ORT's arena, unusable for the
    next, so a long prefill's peak memory grew by about one more K/V cache. numpy's large blocks are
    mmapped and go back to the OS when the previous step's K/V is dropped.
    """

    __slots__ = ("ov", "arr")

    def __init__(self, ov: Any, arr: np.ndarray) -> None:
        self.ov, self.arr = ov, arr

    def numpy(self) -> np.ndarray:
        return self.arr

    def shape(self) -> list[int]:
        return list(self.arr.shape)


class _Raw:
    """The handful of ONNX Runtime calls a step makes, on the pybind objects under the public wrappers.

    `IOBinding.bind_ortvalue_input`, `run_with_iobinding` and `OrtValue.ortvalue_from_shape_and_type`
    re-check every call (session compatibility, WebGPU capture pins, device lookup): ~15 µs each here,
    which at ~15 binds a step is most of the Python side of a decode step. These are the same calls
    without the checks (our values always come from this session's own allocator). Should a future
    onnxruntime move the private attributes, `fast` is False and the public API is used instead.
    """

    def __init__(self, ort: Any, sess: Any, device: str, device_id: int) -> None:
        self.ort, self.sess = ort, sess
        c = getattr(getattr(ort, "capi", None), "onnxruntime_pybind11_state", None)
        self.fast = (c is not None and hasattr(sess, "_sess") and hasattr(sess.io_binding(), "_iobinding")
                     and hasattr(getattr(c, "OrtValue", None), "ortvalue_from_shape_and_type"))
        self.device, self.device_id = device, device_id
        self.C = c
        self.cdev = ort.OrtDevice.make(device, device_id)._get_c_device() if self.fast else None

    def binding(self) -> Any:
        b = self.sess.io_binding()
        return b._iobinding if self.fast else b

    def alloc(self, shape: list[int], dtype: Any) -> Any:
        if self.fast:
            return self.C.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.cdev)
        return self.ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device, self.device_id)

    def alloc_growing(self, shape: list[int], dtype: Any) -> Any:
        """A buffer of a size that changes every step (K/V): numpy-owned on CPU (see `_Host`)."""
        if self.device != "cpu":
            return self.alloc(shape, dtype)
        arr = np.empty(shape, dtype)
        if self.fast:
            return _Host(self.C.OrtValue.ortvalue_from_numpy(arr, self.cdev), arr)
        return _Host(self.ort.OrtValue.ortvalue_from_numpy(arr), arr)

    def bind_input(self, b: Any, name: str, v: Any) -> None:
        if isinstance(v, np.ndarray):
            b.bind_input(name, v) if self.fast else b.bind_cpu_input(name, v)  # by reference: keep v alive
        else:
            b.bind_ortvalue_input(name, v.ov if type(v) is _Host else v)

    def bind_output(self, b: Any, name: str, v: Any) -> None:
        b.bind_ortvalue_output(name, v.ov if type(v) is _Host else v)

    def run(self, b: Any) -> None:
        if self.fast:
            self.sess._sess.run_with_iobinding(b, None)
        else:
            self.sess.run_with_iobinding(b)


class GraniteSession:
    def __init__(self, path: str | Path, *, provider: str = "cpu", threads: int | None = None,
                 optimization: str = "all", spin: bool | None = None, kv_cache: str | None = None,
                 recurrent_state: str | None = None) -> None:
        """`spin`: let ONNX Runtime's idle worker threads spin between runs (its default, None). On a
        machine whose cores are shared (more runnable threads than cores), False is often faster: the
        spinning workers otherwise take the core the next step's Python needs.

        `kv_cache`: "shared" (one capacity buffer per K/V tensor, past and present alike) or "grow"
        (past and present separate, one column longer each step); None takes the folder's own
        (granite_config.json "kv_cache": "shared" where every attention layer is GroupQueryAttention).

        `recurrent_state`: "inplace" (one buffer per conv/SSM state, read and written by the same step) or
        "pingpong" (two, alternating); None takes the folder's own on the CPU (granite_config.json
        "recurrent_state": "inplace" for fused graphs) and "pingpong" under CUDA."""
        ort = import_ort()
        self.ort = ort
        self.path = Path(path)
        self.cfg, self.meta = read_folder_config(self.path)
        # what the weights take on disk (and so, near enough, in memory): sizes the prefill workspace
        self.weight_bytes = sum(f.stat().st_size for f in (self.path / MODEL_FILE, self.path / DATA_FILE))
        providers, self.device = _providers(ort, provider)
        from granite_onnx.export.precision import provider_problem  # torch-free, onnx-free

        why = provider_problem(self.meta, self.device)
        if why:  # e.g. bf16 or fp8 weights on the CPU: refuse before ONNX Runtime's NOT_IMPLEMENTED
            raise RuntimeError_(why)
        if optimization not in ("all", "basic", "none"):
            raise RuntimeError_(f"unknown optimization level {optimization!r}; use 'all', 'basic' or 'none'")
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
        if spin is not None:
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        try:
            self.sess = ort.InferenceSession(str(self.path / MODEL_FILE), so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise RuntimeError_(f"ONNX Runtime could not load {self.path / MODEL_FILE}: {e}") from e
        if self.device == "cuda" and "CUDAExecutionProvider" not in self.sess.get_providers():
            raise RuntimeError_("ONNX Runtime fell back to the CPU although 'cuda' was asked for (no usable GPU or "
                                "CUDA/cuDNN libraries not found); check `nvidia-smi` and the onnxruntime-gpu "
                                "install, or use provider='cpu'")
        self.specs = io.state_specs(self.cfg)
        self.logits_mode = self.meta.get("logits", "last")
        inputs = {i.name: i for i in self.sess.get_inputs()}
        missing = [n for n in io.input_names(self.cfg) if n not in inputs]
        if missing:
            raise RuntimeError_(f"{self.path / MODEL_FILE} lacks inputs {missing[:3]}: it does not follow the "
                                "granite-onnx state contract; re-export it")
        self.dtypes = {s.past_name: _NP_TYPES.get(inputs[s.past_name].type, np.float32) for s in self.specs}
        self.kv_specs = [s for s in self.specs if s.kind in ("key", "value")]
        self.recurrent_names = [s.past_name for s in self.specs if s.kind in ("conv_state", "recurrent_state")]
        self.present_of = {s.past_name: s.present_name for s in self.specs}
        self.vocab_size = self.cfg.vocab_size
        folder_kv = self.meta.get("kv_cache", "grow")
        if kv_cache not in (None, "shared", "grow"):
            raise RuntimeError_(f"unknown kv_cache {kv_cache!r}; use 'shared', 'grow' or None (the folder's)")
        if kv_cache == "shared" and folder_kv != "shared":
            raise RuntimeError_(f"{self.path} cannot share past and present K/V: its attention is not "
                                "GroupQueryAttention (a portable graph concatenates them); use kv_cache='grow', "
                                "or export it fused (granite-onnx optimize)")
        self.kv_shared = bool(self.kv_specs) and (kv_cache or folder_kv) == "shared"
        folder_rec = self.meta.get("recurrent_state", "pingpong")
        if recurrent_state not in (None, "inplace", "pingpong"):
            raise RuntimeError_(f"unknown recurrent_state {recurrent_state!r}; use 'inplace', 'pingpong' or None "
                                "(the folder's)")
        if recurrent_state == "inplace" and folder_rec != "inplace":
            raise RuntimeError_(f"{self.path} cannot update its recurrent state in place: its graph reads a past "
                                "conv/SSM state outside the op that writes it (a portable graph, or a folder "
                                "exported before granite_config.json recorded it); use recurrent_state="
                                "'pingpong', or export it fused again")
        self.rec_inplace = (recurrent_state or (folder_rec if self.device == "cpu" else "pingpong")) == "inplace"
        self._device_id = 0
        self.raw = _Raw(ort, self.sess, self.device, self._device_id)
        cfg = self.cfg
        self._kv_dims = (cfg.num_key_value_heads, cfg.head_dim)

    # ------------------------------------------------------------------ state
    def _alloc(self, name: str, shape: tuple[int, ...] | list[int]) -> Any:
        return self.raw.alloc(list(shape), self.dtypes[name])

    def _from_numpy(self, name: str, a: np.ndarray) -> Any:
        """A new OrtValue of this session's allocator holding a copy of `a` (the array is not kept)."""
        v = self._alloc(name, a.shape)
        v.update_inplace(np.ascontiguousarray(a, dtype=self.dtypes[name]))
        return v

    def _spare(self, name: str, live: Any, shape: tuple[int, ...]) -> Any:
        """The second recurrent buffer of `name`: `live` itself when the state is updated in place, else a
        buffer of its own (written by the next step before any step reads it)."""
        return live if self.rec_inplace else self._alloc(name, shape)

    def new_state(self, batch: int, pads: np.ndarray | None = None, capacity: int = 0) -> State:
        """Zero state for `batch` fresh sequences; `pads` [B] = left padding the first prefill will have;
        `capacity`: K/V columns to allocate now under shared K/V (more are added when needed)."""
        cap = _round_cap(capacity) if self.kv_shared else None
        kv, live, spare = {}, {}, {}
        for s in self.specs:
            if s.kind in ("key", "value"):
                kv[s.past_name] = self._kv_buffer(s, batch, cap or 0)
            else:
                shape = s.concrete_shape(batch, 0)
                live[s.past_name] = self._from_numpy(s.past_name, np.zeros(shape, self.dtypes[s.past_name]))
                spare[s.past_name] = self._spare(s.past_name, live[s.past_name], shape)
        st = State(batch, kv, (live, spare), kv_cap=cap)
        st._io = _Bindings(self, st)
        if pads is not None:
            st.pads = np.asarray(pads, np.int64).copy()
        return st

    def _kv_buffer(self, spec: io.StateSpec, batch: int, columns: int, used: np.ndarray | None = None) -> Any:
        """A K/V buffer [B, kv_heads, columns, head_dim] whose first columns hold `used` (a host array)."""
        shape = list(spec.concrete_shape(batch, columns))
        v = self.raw.alloc_growing(shape, self.dtypes[spec.past_name])
        if used is None or not used.shape[2]:
            return v
        if type(v) is _Host:
            v.arr[:, :, :used.shape[2]] = used
        else:  # device memory: written whole, through the host (rare: `reserve` sizes a generation up front)
            full = np.zeros(shape, self.dtypes[spec.past_name])
            full[:, :, :used.shape[2]] = used
            v.update_inplace(full)
        return v

    def reserve(self, state: State, columns: int) -> None:
        """Make `state` hold at least `columns` K/V columns (past + what is coming) without reallocating
        later; a no-op under growing K/V. A longer run still works: the buffers are grown on demand."""
        if state.kv_cap is not None and columns > state.kv_cap:
            self._grow_kv(state, _round_cap(columns))

    def _grow_kv(self, st: State, cap: int) -> None:
        """Move the used K/V columns of `st` into buffers of `cap` columns and bind those instead."""
        assert st.kv_cap is not None and cap >= st.past_len
        st.kv = {s.past_name: self._kv_buffer(s, st.batch, cap, st.kv[s.past_name].numpy()[:, :, :st.past_len])
                 for s in self.kv_specs}
        st.kv_cap = cap
        if st._io is not None:
            st._io.bind_kv(self, st)

    def kv_nbytes(self, state: State) -> int:
        """Bytes of K/V memory `state` holds (its capacity under shared K/V)."""
        cols = state.past_len if state.kv_cap is None else state.kv_cap
        return sum(int(np.prod(s.concrete_shape(state.batch, cols))) * np.dtype(self.dtypes[s.past_name]).itemsize
                   for s in self.kv_specs)

    def recurrent_nbytes(self, state: State) -> int:
        """Bytes of conv/SSM state memory `state` holds: one set of buffers in place, two alternating."""
        seen: set[int] = set()
        total = 0
        for half in state.rec:
            for name, v in half.items():
                if id(v) not in seen:
                    seen.add(id(v))
                    total += int(np.prod(v.shape())) * np.dtype(self.dtypes[name]).itemsize
        return total

    def state_to_numpy(self, state: State) -> dict[str, np.ndarray]:
        """Host copies of every past_* tensor (K/V: its past_len used columns; the current recurrent half)."""
        out = {}
        for k, v in state.values.items():
            a = v.numpy()
            if state.kv_cap is not None and k in state.kv:
                a = a[:, :, :state.past_len]
            out[k] = np.array(a, copy=True)
        return out

    def state_from_numpy(self, arrays: dict[str, np.ndarray], past_len: int,
                         pads: np.ndarray | None = None, capacity: int = 0) -> State:
        """A device state holding copies of `arrays` (by past name), as `state_to_numpy` returns them;
        `capacity`: K/V columns to allocate under shared K/V (at least past_len)."""
        missing = [s.past_name for s in self.specs if s.past_name not in arrays]
        if missing:
            raise RuntimeError_(f"state arrays lack {missing[:3]}: they were not taken from this model")
        batch = int(np.asarray(arrays[self.specs[0].past_name]).shape[0])
        cap = _round_cap(max(capacity, past_len)) if self.kv_shared else None
        kv, live, spare = {}, {}, {}
        for s in self.specs:
            a = np.asarray(arrays[s.past_name])
            want = s.concrete_shape(batch, past_len)
            if a.shape != want:
                raise RuntimeError_(f"state tensor {s.past_name} has shape {a.shape}, this model needs {want} "
                                    f"(batch {batch}, past length {past_len}): it was taken from another model")
            if s.kind in ("key", "value"):
                kv[s.past_name] = self._kv_buffer(s, batch, past_len if cap is None else cap, a)
            else:
                live[s.past_name] = self._from_numpy(s.past_name, a)
                spare[s.past_name] = self._spare(s.past_name, live[s.past_name], a.shape)
        st = State(batch, kv, (live, spare), past_len, kv_cap=cap)
        st._io = _Bindings(self, st)
        if pads is not None:
            st.pads = np.asarray(pads, np.int64).copy()
        return st

    # ------------------------------------------------------------------- step
    def _logits_buffer(self, st: State, kept: int) -> tuple[Any, np.ndarray | None]:
        assert st._io is not None
        buf = st._io.logits.get(kept)
        if buf is None:
            ov = self.raw.alloc([st.batch, kept, self.vocab_size], np.float32)
            # on CPU .numpy() is a view of the buffer ONNX Runtime writes; under CUDA it is a copy per call
            buf = (ov, ov.numpy() if self.device == "cpu" else None)
            if kept == 1:  # the decode shape is kept for the whole generation; prefill chunks are not
                st._io.logits[kept] = buf
        return buf

    def _bind(self, binding: Any, bound: dict[str, Any], name: str, value: Any, output: bool = False) -> None:
        """Bind unless `value` is what is bound already; `bound` also keeps bound arrays alive."""
        if bound.get(name) is value:
            return
        (self.raw.bind_output if output else self.raw.bind_input)(binding, name, value)
        bound[name] = value

    def _run(self, st: State, ids: np.ndarray, mask: np.ndarray) -> tuple[Any, np.ndarray | None]:
        """Bind and run one step over ids [B, T] (mask [B, past+T]); advances `st` in place."""
        assert st._io is not None
        t = ids.shape[1]
        binding = st._io.pair[st.parity]
        bound = st._io.bound[st.parity]
        raw = self.raw
        self._bind(binding, bound, io.INPUT_IDS, ids)
        raw.bind_input(binding, io.ATTENTION_MASK, mask)  # its shape changes every step: always rebind
        bound[io.ATTENTION_MASK] = mask
        kept = t if self.logits_mode == "all" else 1
        logits_ov, host = self._logits_buffer(st, kept)
        self._bind(binding, bound, io.LOGITS, logits_ov, output=True)
        total = st.past_len + t
        if st.kv_cap is None:
            shape = [st.batch, self._kv_dims[0], total, self._kv_dims[1]]
            new_kv = {}
            for s in self.kv_specs:
                raw.bind_input(binding, s.past_name, st.kv[s.past_name])
                out = raw.alloc_growing(shape, self.dtypes[s.past_name])
                raw.bind_output(binding, s.present_name, out)
                new_kv[s.past_name] = out
        else:
            if total > st.kv_cap:
                self._grow_kv(st, _round_cap(max(total, st.kv_cap + st.kv_cap // 2)))
            new_kv = st.kv
        t0 = time.perf_counter()
        try:
            raw.run(binding)
        except Exception as e:  # ORT's own exception types; the state is unchanged unless updated in place
            hint = (" (this state's conv/SSM state is updated in place and may be partly advanced: continue "
                    "from a snapshot taken before)") if self.rec_inplace else ""
            raise RuntimeError_(f"ONNX Runtime failed on a step of {st.batch}×{t} tokens after {st.past_len}: "
                                f"{e}{hint}") from e
        st.run_s += time.perf_counter() - t0
        st.runs += 1
        st.kv = new_kv
        st.parity ^= 1
        st.past_len = total
        return logits_ov, host

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, state: State, *,
             logits_to_host: bool = True, copy: bool = True) -> tuple[Any, State]:
        """One forward pass over input_ids [B, T] with attention_mask [B, past+T].

        Returns (logits [B, kept, V], state'): numpy by default (a copy; `copy=False` returns the reused
        buffer's view, valid until the next step of this state), or the OrtValue with logits_to_host=False.
        `state` is consumed: it is advanced in place and returned.
        """
        b, t = input_ids.shape
        if b != state.batch:
            raise RuntimeError_(f"input_ids has batch {b}, the state holds {state.batch} rows")
        if attention_mask.shape != (b, state.past_len + t):
            raise RuntimeError_(f"attention_mask has shape {attention_mask.shape}, expected {(b, state.past_len + t)}")
        if state._io is None:
            state._io = _Bindings(self, state)
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if ids is input_ids:
            ids = ids.copy()  # bound by reference and kept bound: the caller may change its array
        ov, host = self._run(state, ids, np.ascontiguousarray(attention_mask, dtype=np.int64))
        if not logits_to_host:
            return ov, state
        out = host if host is not None else ov.numpy()
        return (out.copy() if copy and host is not None else out), state

    def decode(self, next_ids: np.ndarray, state: State) -> np.ndarray:
        """One decode step: next_ids [B] (all rows real) → last logits [B, V].

        The hot loop: the ids go into the bound [B, 1] buffer, the mask is a view of a reused buffer, and
        on CPU the logits are a view of the bound output (valid until this state's next step).
        """
        io_ = state._io
        assert io_ is not None
        io_.ids[:, 0] = next_ids
        ov, host = self._run(state, io_.ids, io_.mask.view(state.pads, state.past_len + 1))
        return (host if host is not None else ov.numpy())[:, -1, :]

    def run_raw(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Plain `InferenceSession.run` with every output by name (validation)."""
        names = [o.name for o in self.sess.get_outputs()]
        return dict(zip(names, self.sess.run(names, feeds)))


KV_ALIGN = 64  # shared K/V capacities are multiples of this many columns


def _round_cap(n: int) -> int:
    return -(-max(n, 1) // KV_ALIGN) * KV_ALIGN


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))
