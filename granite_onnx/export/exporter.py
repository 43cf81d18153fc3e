"""Export a checkpoint (HF folder or preset) to a self-contained model folder, atomically.

The folder holds: model.onnx + model.onnx.data, genai_config.json (onnxruntime-genai's layout plus layer
types), granite_config.json (our config, read by the runtime), the tokenizer files when the source has
them, and export_report.json (versions, config, op histogram, timings, peak memory, parity summary).
`ExportOptions.precision/quant/block_size` choose the weight format (export/precision.py); it is
checked against the model before anything is written, and recorded in granite_config.json ("weights")
and the report.

Everything is written into a hidden sibling folder that is renamed into place only when complete, so a
crash or a full disk never leaves a half-written model that loads.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import platform
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import onnx

from granite_onnx.export import io
from granite_onnx.export.folder import ExportError, atomic_folder, check_destination
from granite_onnx.export.compose import DATA_FILE, compose
from granite_onnx.export.precision import FormatError, WeightFormat, cpu_note, needs_cuda
from granite_onnx.models.config import HybridConfig
from granite_onnx.models.weights import HFWeights, RandomWeights, WeightSource

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
GRANITE_CONFIG = "granite_config.json"
GENAI_CONFIG = "genai_config.json"
REPORT = "export_report.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


@dataclass
class ExportOptions:
    logits: str = "last"  # 'last': only the last position's logits (prefill never builds [seq, vocab])
    optimize: bool = False  # fuse into ONNX Runtime kernels (export/fusions); the CLI turns it on by default
    overwrite: bool = False
    parity_check: bool = True  # a short ORT-vs-torch check recorded in the report (small models only)
    precision: str = "fp32"  # compute dtype: fp32 | fp16 | bf16 (export/precision.py)
    quant: str = "none"  # weight storage: none | int8 | int4 | fp8
    block_size: int = 0  # quantization block along the input features (0: the quant's default)
    embedding: str = "shared"  # tied embedding/LM head when quantized: shared | head | float
    accuracy_level: int | None = None  # MatMulNBits/QMoE accuracy_level (None: the measured default)
    embedding_bits: int = 0  # bits of the quantized embedding/LM head (0: 8, see WeightFormat.embed_bits)

    def weight_format(self) -> WeightFormat:
        """The validated WeightFormat; ExportError (saying how to fix it) for a bad combination."""
        try:
            return WeightFormat(precision=self.precision, quant=self.quant, block_size=self.block_size,
                                embedding=self.embedding, accuracy_level=self.accuracy_level,
                                embedding_bits=self.embedding_bits)
        except FormatError as e:
            raise ExportError(str(e)) from None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _versions() -> dict[str, str]:
    import onnxruntime
    import torch
    import transformers

    import onnx_ir
    import onnxscript

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__,
            "onnx_ir": onnx_ir.__version__}


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    c = collections.Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph.node)
    return dict(sorted(c.items()))


def genai_config(cfg: HybridConfig, *, context_length: int | None = None) -> dict[str, Any]:
    ctx = context_length or cfg.max_position_embeddings
    eos = list(cfg.eos_token_ids)
    return {
        "model": {
            "type": "granitemoehybrid",
            "bos_token_id": cfg.bos_token_id if cfg.bos_token_id is not None else 0,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or [0]),
            "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else 0,
            "vocab_size": cfg.vocab_size,
            "context_length": ctx,
            "decoder": {
                "filename": MODEL_FILE,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "num_attention_heads": cfg.num_attention_heads,
                "num_key_value_heads": cfg.num_key_value_heads,
                "num_hidden_layers": cfg.num_layers,
                # onnxruntime-genai 0.18 treats a layer as attention only when its type is
                # "full_attention" (HF's name since transformers 5.13); any other name, "attention"
                # included, is recurrent, and it then asks for past_key_values.{i}.conv_state.
                "layer_types": ["full_attention" if t == io.ATTENTION else "linear_attention" for t in cfg.layer_types],
                **io.genai_io_names(),
            },
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": min(ctx, 4096), "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def open_weights(model: str | Path | None, preset_name: str | None, seed: int, layers: int | None) -> WeightSource:
    from granite_onnx.models.config import ConfigError, preset

    if (model is None) == (preset_name is None):
        raise ExportError("give exactly one of --model HF_DIR or --preset NAME")
    if model is not None:
        p = Path(model)
        if not p.is_dir():
            raise ExportError(f"{p} is not a folder; --model takes a local HF checkpoint folder "
                              "(config.json + *.safetensors)")
        if not (p / "config.json").exists():
            raise ExportError(f"{p} has no config.json; --model takes a local HF checkpoint folder "
                              "(config.json + *.safetensors)")
        if layers is not None:
            raise ExportError("--layers applies to presets only; a checkpoint keeps its own layers")
        try:
            return HFWeights(p)
        except ConfigError as e:
            raise ExportError(f"{p}/config.json: {e}") from e
    return RandomWeights(preset(preset_name, layers=layers), seed)  # type: ignore[arg-type]


def _check_disk(parent: Path, need: int) -> None:
    free = shutil.disk_usage(parent).free
    if free < need:
        raise ExportError(f"not enough disk space in {parent}: the export needs about {need / 2**30:.2f} GiB, "
                          f"{free / 2**30:.2f} GiB free; free some space or choose another --out")


def _parity(folder: Path, src: WeightSource, logits: str) -> dict[str, Any]:
    """ORT on the written folder vs our torch modules (float32) on a short prefill.

    For a reduced-precision or quantized folder the differences measure that format's error, not a
    bug: `granite-onnx validate --reference` reports its accuracy (top-1, KL, perplexity).
    """
    import numpy as np
    import onnxruntime as ort
    import torch

    from granite_onnx.models.weights import load_torch_model

    cfg = src.cfg
    model = load_torch_model(src)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(folder / MODEL_FILE), so, providers=["CPUExecutionProvider"])
    dtypes = {i.name: np.float16 if i.type == "tensor(float16)" else np.float32 for i in sess.get_inputs()}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (1, 9))
    mask = np.ones_like(ids)
    feeds: dict[str, Any] = {io.INPUT_IDS: ids, io.ATTENTION_MASK: mask}
    for s in io.state_specs(cfg):
        feeds[s.past_name] = np.zeros(s.concrete_shape(1, 0), dtypes[s.past_name])
    outs = sess.run(None, feeds)
    with torch.no_grad():
        ref, pres = model(torch.from_numpy(ids), torch.from_numpy(mask),
                          [torch.zeros(s.concrete_shape(1, 0)) for s in io.state_specs(cfg)])
    ref = ref[:, -1:] if logits == "last" else ref
    diffs = {io.LOGITS: float(np.abs(outs[0] - ref.numpy()).max())}
    for name, o, r in zip(io.output_names(cfg)[1:], outs[1:], pres):
        diffs[name] = float(np.abs(o.astype(np.float32) - r.numpy()).max())
    return {"max_abs_diff": diffs, "worst": max(diffs.values()), "tokens": int(ids.shape[1])}



def kv_cache_mode(cfg: HybridConfig, fusion_counts: dict[str, int] | None) -> str:
    """"shared" when every attention layer became GroupQueryAttention (past and present K/V may then be
    one capacity buffer, see runtime/session.py), else "grow" (the portable kernel concatenates them)."""
    attention_layers = sum(t == "attention" for t in cfg.layer_types)
    fused = (fusion_counts or {}).get("attention", 0)
    return "shared" if attention_layers and fused == attention_layers else "grow"

# ONNX Runtime contrib ops that read their past state (input 3) only before writing their present state
# (output 1), so one buffer may be both: LinearAttention copies the past into the present first, then
# updates it; CausalConvWithState reads each channel's window before writing that channel's state.
_IN_PLACE_STATE_OPS = {("com.microsoft", "LinearAttention"), ("com.microsoft", "CausalConvWithState")}


def recurrent_state_mode(model: onnx.ModelProto, cfg: HybridConfig) -> str:
    """"inplace" when every recurrent past input (conv and SSM state) is read by one node only — the
    contrib op that also writes the matching present output — besides nodes that read its shape alone, so
    the runtime may bind one buffer as both (see runtime/session.py); else "pingpong" (a portable graph's
    scan reads its past state in several places, a float16 graph casts it first: the present must be
    another buffer)."""
    specs = [s for s in io.state_specs(cfg) if s.kind in ("conv_state", "recurrent_state")]
    if not specs:
        return "pingpong"
    nodes = list(model.graph.node)
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in nodes for a in n.attribute):
        return "pingpong"  # a subgraph may read a past input too: not worth proving otherwise
    for s in specs:  # Shape/Size read the dims only, which no step changes
        readers = [n for n in nodes if s.past_name in n.input
                   and not (n.domain in ("", "ai.onnx") and n.op_type in ("Shape", "Size"))]
        if len(readers) != 1:
            return "pingpong"
        n = readers[0]
        if ((n.domain, n.op_type) not in _IN_PLACE_STATE_OPS or list(n.input).count(s.past_name) != 1
                or len(n.input) < 4 or n.input[3] != s.past_name or len(n.output) < 2
                or n.output[1] != s.present_name):
            return "pingpong"
    return "inplace"


def state_layout(cfg: HybridConfig, fusion_counts: dict[str, int] | None, graph: onnx.ModelProto) -> dict[str, str]:
    """granite_config.json's "kv_cache" and "recurrent_state": how the runtime may hold this graph's state."""
    return {"kv_cache": kv_cache_mode(cfg, fusion_counts), "recurrent_state": recurrent_state_mode(graph, cfg)}


def export(*, model: str | Path | None = None, preset_name: str | None = None, seed: int = 0,
           layers: int | None = None, out: str | Path, options: ExportOptions | None = None,
           progress: Callable[[str], None] | None = None, source: WeightSource | None = None) -> dict[str, Any]:
    """Export to `out` and return the export report (also written as export_report.json).

    `source` (instead of `model`/`preset_name`): any WeightSource, e.g. RandomWeights over a modified
    preset config (tools/memory_context.py exports Tiny widths with every layer attention that way).
    """
    opts = options or ExportOptions()
    say = progress or (lambda s: log.info(s))
    fmt = opts.weight_format()
    out = Path(out)
    check_destination(out, opts.overwrite)
    t0 = time.perf_counter()
    src = source if source is not None else open_weights(model, preset_name, seed, layers)
    cfg = src.cfg
    from granite_onnx.export.quantize import check_model, estimate_bytes

    try:
        check_model(cfg, fmt)  # before anything is written: a bad block size leaves no folder behind
    except FormatError as e:
        raise ExportError(str(e)) from None
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    _check_disk(parent, int(estimate_bytes(cfg, fmt) * 1.05) + (64 << 20))
    cuda_only = needs_cuda(fmt)
    if cuda_only:
        say(f"note: this model will need CUDA — {cuda_only}; it is written anyway, and the CPU runtime will "
            "refuse it")
    elif cpu_note(fmt):
        say(f"note: {cpu_note(fmt)}")
    with atomic_folder(out, overwrite=opts.overwrite) as tmp:
        say(f"exporting {cfg.name}: {cfg.num_layers} layers ({', '.join(cfg.layer_types)}), "
            f"{cfg.num_parameters() / 1e6:.1f}M parameters, weights {fmt.describe()}")
        res = compose(cfg, src, tmp / DATA_FILE, logits=opts.logits, progress=say, fmt=fmt)
        onnx.save(res.model, str(tmp / MODEL_FILE))
        report: dict[str, Any] = {
            "source": str(model) if model is not None else
            {"preset": preset_name, "seed": seed, "layers": layers} if source is None else {"custom": src.cfg.name},
            "versions": _versions(),
            "config": cfg.to_json_dict(),
            "num_parameters": cfg.num_parameters(),
            "logits": opts.logits,
            "graph": "portable",
            "weights": fmt.to_json(),
            "needs_cuda": cuda_only,
            "op_histogram": op_histogram(res.model),
            "timings_s": {k: round(v, 3) for k, v in res.timings.items()},
        }
        del res
        if opts.optimize:
            from granite_onnx.export.fusions import fuse_model_file

            say("fusing into ONNX Runtime kernels")
            t = time.perf_counter()
            fused_dir = parent / f".{out.name}.fused-{os.getpid()}"
            fused_dir.mkdir()
            try:
                counts = fuse_model_file(tmp / MODEL_FILE, fused_dir / MODEL_FILE)
                for f in (MODEL_FILE, DATA_FILE):
                    os.replace(fused_dir / f, tmp / f)
            finally:
                shutil.rmtree(fused_dir, ignore_errors=True)
            report["graph"] = "fused"
            report["fusion_counts"] = counts
            report["timings_s"]["fuse_s"] = round(time.perf_counter() - t, 3)
        graph = onnx.load(str(tmp / MODEL_FILE), load_external_data=False)  # as saved, fused or not; no weights
        if opts.optimize:
            report["op_histogram_portable"], report["op_histogram"] = report["op_histogram"], op_histogram(graph)
        (tmp / GRANITE_CONFIG).write_text(json.dumps({"config": cfg.to_json_dict(), "logits": opts.logits,
                                                      "graph": report["graph"], "weights": fmt.to_json(),
                                                      **state_layout(cfg, report.get("fusion_counts"), graph)},
                                                     indent=2))
        (tmp / GENAI_CONFIG).write_text(json.dumps(genai_config(cfg), indent=2))
        copied = []
        if model is not None:
            for f in TOKENIZER_FILES:
                if (Path(model) / f).exists():
                    shutil.copy2(Path(model) / f, tmp / f)
                    copied.append(f)
        report["tokenizer_files"] = copied
        if cuda_only:
            report["parity"] = {"skipped": f"needs CUDA: {cuda_only}"}
        elif opts.parity_check and cfg.num_parameters() < 400e6:
            say("checking parity (ONNX Runtime vs the torch layer modules)")
            report["parity"] = _parity(tmp, src, opts.logits)
        else:
            report["parity"] = {"skipped": "model too large for the in-export check; run granite-onnx validate"}
        report["timings_s"]["total_s"] = round(time.perf_counter() - t0, 3)
        report["peak_rss_mb"] = round(peak_rss_mb(), 1)
        report["size_bytes"] = sum(p.stat().st_size for p in tmp.iterdir())
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
    say(f"wrote {out} ({report['size_bytes'] / 2**20:.1f} MiB) in {report['timings_s']['total_s']:.1f} s, "
        f"peak RSS {report['peak_rss_mb']:.0f} MB")
    return report
