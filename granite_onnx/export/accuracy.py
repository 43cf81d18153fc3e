"""Accuracy of a reduced-precision or quantized model folder against the float32 PyTorch model.

`accuracy_report(model_dir, reference, positions=256, text=None)` teacher-forces one token sequence
through both models and compares the next-token distributions at every position:

* top-1 agreement — the fraction of positions where both models' argmax agree;
* mean KL(p_fp32 ‖ p_model) in nats over the positions (and the worst position);
* perplexity of both models on the sequence's next tokens, and their ratio.

The sequence is `text` when given (tokenized with the folder's tokenizer.json); else the reference's
held-out split when it has one (the default model: `heldout_tokens`); else seeded random token ids
(random-weight presets, where perplexity means little but top-1 and KL still measure the format's error). The ONNX model runs on ONNX Runtime with its state in the dtypes
the graph declares; a folder exported with `logits="last"` is stepped one token at a time (its decode
path), one with `logits="all"` runs in one pass. The reference is our float32 torch model
(models/layers.TorchModel: equal to HF transformers to 1e-4, tests/test_parity.py) over the same
weights: the preset and seed the folder was exported from, or the HF checkpoint folder.

Targets (issue 5), reported next to the figures: fp16/bf16 top-1 ≥ 99.5 %; int8 top-1 ≥ 99 % and mean
KL ≤ 1e-3; int4 top-1 ≥ 95 % and perplexity within +5 % of fp32.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from granite_onnx.export import io
from granite_onnx.export.precision import WeightFormat, provider_problem

log = logging.getLogger(__name__)

TARGETS: dict[str, dict[str, float]] = {
    "fp16": {"top1_min": 0.995},
    "bf16": {"top1_min": 0.995},
    "int8": {"top1_min": 0.99, "mean_kl_max": 1e-3},
    "int4": {"top1_min": 0.95, "ppl_ratio_max": 1.05},
}

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare_logits(ref: np.ndarray, got: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """Metrics for logits [P, V] of the reference and the model at P positions whose next tokens are `targets`."""
    lr, lg = _log_softmax(ref), _log_softmax(got)
    kl = (np.exp(lr) * (lr - lg)).sum(-1)  # KL(p_ref ‖ p_model) per position
    idx = np.arange(len(targets))
    nll_ref, nll_got = -lr[idx, targets], -lg[idx, targets]
    ppl_ref, ppl_got = float(np.exp(nll_ref.mean())), float(np.exp(nll_got.mean()))
    return {
        "positions": int(len(targets)),
        "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "max_abs_logit_diff": float(np.abs(ref - got).max()),
        "perplexity": {"model": ppl_got, "reference": ppl_ref, "ratio": ppl_got / ppl_ref},
    }


def check_targets(fmt: WeightFormat, metrics: dict[str, Any]) -> dict[str, Any]:
    """Which issue-5 targets apply to `fmt` and whether `metrics` meet them."""
    key = fmt.quant if fmt.quant in ("int8", "int4") else fmt.precision
    t = TARGETS.get(key, {})
    checks = {}
    if "top1_min" in t:
        checks["top1"] = metrics["top1_agreement"] >= t["top1_min"]
    if "mean_kl_max" in t:
        checks["mean_kl"] = metrics["mean_kl"] <= t["mean_kl_max"]
    if "ppl_ratio_max" in t:
        checks["perplexity"] = metrics["perplexity"]["ratio"] <= t["ppl_ratio_max"]
    return {"targets": t, "checks": checks, "meets_targets": all(checks.values())}


class OrtStepper:
    """A plain ONNX Runtime session over a model folder, state kept in numpy in the graph's dtypes."""

    def __init__(self, model_dir: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        meta = json.loads((model_dir / "granite_config.json").read_text())
        why = provider_problem(meta, "cpu")
        if why:
            raise RuntimeError(why)
        from granite_onnx.models.config import HybridConfig

        self.cfg = HybridConfig.from_json_dict(meta["config"])
        self.logits_mode = meta.get("logits", "last")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(model_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
        self.dtypes = {i.name: _NP.get(i.type, np.float32) for i in self.sess.get_inputs()}
        self.out_names = [o.name for o in self.sess.get_outputs()]

    def run(self, ids: np.ndarray, state: dict[str, np.ndarray], past: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """ids [1, T] after `past` tokens → logits [1, kept, V] (float32), next state."""
        feeds = {io.INPUT_IDS: ids.astype(np.int64), io.ATTENTION_MASK: np.ones((1, past + ids.shape[1]), np.int64)}
        feeds.update(state)
        outs = dict(zip(self.out_names, self.sess.run(self.out_names, feeds)))
        nxt = {s.past_name: outs[s.present_name] for s in io.state_specs(self.cfg)}
        return outs[io.LOGITS], nxt

    def zero_state(self) -> dict[str, np.ndarray]:
        return {s.past_name: np.zeros(s.concrete_shape(1, 0), self.dtypes[s.past_name]) for s in io.state_specs(self.cfg)}

    def teacher_forced(self, tokens: np.ndarray) -> np.ndarray:
        """Logits [P, V] at every position of tokens [P] (the model's prediction of the next token)."""
        state = self.zero_state()
        if self.logits_mode == "all":
            logits, _ = self.run(tokens[None], state, 0)
            return logits[0].astype(np.float32)
        rows = []
        for t in range(len(tokens)):
            logits, state = self.run(tokens[None, t:t + 1], state, t)
            rows.append(logits[0, -1].astype(np.float32))
        return np.stack(rows)


def _reference_source(model_dir: Path, reference: str | Path, seed: int | None, layers: int | None) -> Any:
    from granite_onnx.models.weights import reference_source

    return reference_source(model_dir, reference, seed, layers)


def reference_logits(src: Any, tokens: np.ndarray) -> np.ndarray:
    """Float32 torch logits [P, V] over tokens [P] in one teacher-forced pass."""
    import torch

    from granite_onnx.models.weights import load_torch_model

    model = load_torch_model(src)
    past = [torch.zeros(s.concrete_shape(1, 0)) for s in io.state_specs(src.cfg)]
    ids = torch.from_numpy(tokens[None].astype(np.int64))
    with torch.no_grad():
        logits, _ = model(ids, torch.ones_like(ids), past)
    return logits[0].float().numpy()


def encode_text(model_dir: Path, text: str) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = model_dir / "tokenizer.json"
    if not tok.exists():
        raise ValueError(f"{model_dir} has no tokenizer.json, so --text cannot be tokenized")
    return np.asarray(Tokenizer.from_file(str(tok)).encode(text).ids, np.int64)


def heldout_tokens(folder: str | Path) -> np.ndarray | None:
    """The held-out token stream of a model trained by tools/train_default.py (the shipped default model).

    Its training_log.json names the held-out stdlib files; like training, each file's tokens are followed
    by <|end_of_text|>. None when `folder` has no such log, or the files are not on this machine.
    """
    folder = Path(folder)
    log_path, tok_path = folder / "training_log.json", folder / "tokenizer.json"
    if not (log_path.exists() and tok_path.exists()):
        return None
    data = json.loads(log_path.read_text()).get("data", {})
    root, files = Path(data.get("stdlib", "")), data.get("heldout_files") or []
    if not files or not all((root / f).exists() for f in files):
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    eos = tok.token_to_id("<|end_of_text|>")
    texts = [(root / f).read_text(encoding="utf-8", errors="replace") for f in files]
    pieces = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        pieces += [np.asarray(enc.ids, np.int64), np.asarray([eos], np.int64)]
    return np.concatenate(pieces)


def accuracy_report(model_dir: str | Path, reference: str | Path, positions: int = 256, text: str | None = None,
                    *, seed: int | None = None, layers: int | None = None, threads: int | None = None,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Compare the folder's next-token distributions with the float32 PyTorch model's; see the module doc.

    `reference`: the HF checkpoint folder, or the preset name the folder was exported from (its seed and
    layer count come from export_report.json unless given). `text`: held-out text to score (needs the
    folder's tokenizer); without it, `positions + 1` seeded random tokens.
    """
    say = progress or (lambda s: log.info(s))
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "granite_config.json").read_text())
    fmt = WeightFormat.from_meta(meta)
    if positions < 1:
        raise ValueError(f"positions must be ≥ 1, got {positions}")
    src = _reference_source(model_dir, reference, seed, layers)
    if text is not None:
        tokens = encode_text(model_dir, text)
        if len(tokens) < positions + 1:
            raise ValueError(f"the text has {len(tokens)} tokens; {positions + 1} are needed for {positions} positions")
        tokens, source = tokens[: positions + 1], "text"
    elif (held := heldout_tokens(reference)) is not None and len(held) > positions:
        tokens, source = held[: positions + 1], f"held-out split of {Path(reference).name}"
    else:
        tokens = np.random.default_rng(0).integers(0, src.cfg.vocab_size, positions + 1)
        source = "random tokens (seed 0)"
    t0 = time.perf_counter()
    say(f"running {model_dir.name} ({fmt.describe()}) over {positions} teacher-forced positions")
    got = OrtStepper(model_dir, threads).teacher_forced(tokens[:-1])
    t_onnx = time.perf_counter() - t0
    say("running the float32 PyTorch reference")
    ref = reference_logits(src, tokens[:-1])
    metrics = compare_logits(ref, got, tokens[1:])
    report = {"model_dir": str(model_dir), "reference": str(reference), "weights": fmt.to_json(),
              "tokens": source, **metrics, "onnx_seconds": round(t_onnx, 2)}
    report.update(check_targets(fmt, metrics))
    return report


def format_accuracy(rep: dict[str, Any]) -> str:
    """The report as a few lines for the CLI."""
    w = rep["weights"]
    fmt = w["precision"] + ("" if w["quant"] == "none" else f" {w['quant']} block {w['block_size']}")
    p = rep["perplexity"]
    lines = [f"accuracy of {rep['model_dir']} ({fmt}) vs float32 PyTorch, {rep['positions']} teacher-forced "
             f"positions ({rep['tokens']}):",
             f"  top-1 agreement  {100 * rep['top1_agreement']:.2f} %",
             f"  mean KL          {rep['mean_kl']:.2e} nats (worst position {rep['max_kl']:.2e})",
             f"  perplexity       {p['model']:.3f} vs {p['reference']:.3f} (× {p['ratio']:.4f})"]
    for name, ok in rep.get("checks", {}).items():
        lines.append(f"  {'✓' if ok else '✗'} target {name}: {rep['targets']}")
    return "\n".join(lines)


def dequantized_source(src: Any, fmt: WeightFormat) -> Any:
    """`src` with every weight the format quantizes replaced by what the quantized kernels multiply by.

    The float32 torch model over these weights is the exact oracle of a quantized folder: the graph must
    equal it to float rounding wherever the kernels keep float activations (int4 QMoE; MatMulNBits at
    accuracy_level 0). Only int formats with the shared embedding are supported.
    """
    import torch

    from granite_onnx.export.quantize import (LINEAR_WEIGHTS, dequantize_experts, dequantize_linear, quantize_experts,
                                              quantize_linear)
    from granite_onnx.models.weights import WeightSource

    if fmt.quant not in ("int8", "int4") or fmt.embedding != "shared":
        raise ValueError("dequantized_source covers int8/int4 with the shared embedding only")
    bits, bs = fmt.bits, fmt.block_size

    def lin(w: torch.Tensor, nbits: int = bits) -> torch.Tensor:
        return torch.from_numpy(dequantize_linear(quantize_linear(w.numpy(), nbits, bs)))

    class Dequantized(WeightSource):
        def __init__(self) -> None:
            self.cfg = src.cfg

        def _load_layer(self, i: int) -> dict[str, torch.Tensor]:
            w = dict(src.layer(i))
            for name in LINEAR_WEIGHTS:
                if name in w:
                    w[name] = lin(w[name])
            if "ffn.experts_gate_up" in w:
                gu, dn = dequantize_experts(quantize_experts(w["ffn.experts_gate_up"].numpy(),
                                                             w["ffn.experts_down"].numpy(), bits, bs))
                w["ffn.experts_gate_up"], w["ffn.experts_down"] = torch.from_numpy(gu), torch.from_numpy(dn)
            return w

        def embed(self) -> torch.Tensor:  # quantized only when tied: an untied model gathers a float embedding
            e = src.embed()
            return lin(e.T.contiguous(), fmt.embed_bits).T.contiguous() if src.lm_head() is None else e

        def final_norm(self) -> torch.Tensor:
            return src.final_norm()

        def lm_head(self) -> torch.Tensor | None:
            head = src.lm_head()
            return None if head is None else lin(head.T.contiguous(), fmt.embed_bits).T.contiguous()

    return Dequantized()
