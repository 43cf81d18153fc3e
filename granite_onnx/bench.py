"""`granite-onnx bench`: this runtime and HF transformers eager, side by side in one process.

Reports prefill time per prompt length, time to first token, decode tokens/s per batch size, the
ratios (ours / HF), peak RSS, and the decode step's achieved GB/s next to this machine's measured
memory bandwidth (a STREAM-style copy). Warm-up runs are timed apart and not counted.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from granite_onnx.export.exporter import peak_rss_mb
from granite_onnx.models.config import HybridConfig

log = logging.getLogger(__name__)


def measure_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth (read + write bytes / s) of a large numpy array, best of `repeats`."""
    a = np.ones(mb * 2**20 // 8)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9


def bytes_per_decode_step(cfg: HybridConfig, batch: int, dtype_bytes: int = 4) -> int:
    """Weight bytes one decode step must read: everything but the experts, plus the experts that the
    batch's tokens can route to (at most all of them)."""
    total = cfg.num_parameters()
    if cfg.num_experts:
        per_layer = cfg.num_experts * 3 * cfg.hidden_size * cfg.intermediate_size
        experts = per_layer * cfg.num_layers
        touched = min(1.0, batch * cfg.num_experts_per_tok / cfg.num_experts)
        total = total - experts + int(experts * touched)
    # the tied embedding is gathered, not read whole — but the LM head reads it whole: count it once
    return total * dtype_bytes


def load_reference(model_dir: Path, reference: str, seed: int | None, layers: int | None, tmp: Path) -> Any:
    """HF transformers model from a folder, or from the preset the model folder was exported from."""
    import torch
    import transformers

    from granite_onnx.models.config import preset
    from granite_onnx.models.weights import RandomWeights, save_hf_folder

    ref = Path(reference)
    if not ref.is_dir():
        src_info = {}
        rep = model_dir / "export_report.json"
        if rep.exists():
            src_info = json.loads(rep.read_text()).get("source") or {}
            src_info = src_info if isinstance(src_info, dict) else {}
        seed = seed if seed is not None else int(src_info.get("seed", 0))
        layers = layers if layers is not None else src_info.get("layers")
        ref = save_hf_folder(RandomWeights(preset(reference, layers=layers), seed), tmp / "reference")
    return transformers.AutoModelForCausalLM.from_pretrained(str(ref), dtype=torch.float32).eval()


def _time(fn: Callable[[], Any], repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench(model_dir: str | Path, reference: str, *, seed: int | None = None, layers: int | None = None,
          threads: int = 2, prompt_len: int = 32, new_tokens: int = 32, batches: tuple[int, ...] = (1,),
          prefill_lens: tuple[int, ...] = (512,), skip_hf: bool = False,
          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    from granite_onnx.runtime.generate import Model

    say = progress or (lambda s: log.info(s))
    model_dir = Path(model_dir)
    model = Model.load(model_dir, threads=threads)
    cfg = model.cfg
    rng = np.random.default_rng(0)
    res: dict[str, Any] = {"model": str(model_dir), "graph": model.session.meta.get("graph"), "threads": threads,
                           "params": cfg.num_parameters(), "prefill": [], "decode": []}
    hf = None
    tmpdir = tempfile.TemporaryDirectory()
    if not skip_hf:
        import torch

        torch.set_num_threads(threads)
        say("loading the HF reference")
        hf = load_reference(model_dir, reference, seed, layers, Path(tmpdir.name))

    def ours_prefill(ids: np.ndarray) -> None:
        model.prefill([list(r) for r in ids])

    def hf_prefill(ids: np.ndarray) -> None:
        import torch

        with torch.no_grad():
            hf(input_ids=torch.from_numpy(ids), use_cache=True, logits_to_keep=1)

    warm = rng.integers(0, cfg.vocab_size, (1, 8))
    t_warm_ours = _time(lambda: ours_prefill(warm))
    t_warm_hf = _time(lambda: hf_prefill(warm)) if hf is not None else None
    res["warmup_s"] = {"ours": round(t_warm_ours, 4), "hf": None if t_warm_hf is None else round(t_warm_hf, 4)}
    for n in prefill_lens:
        ids = rng.integers(0, cfg.vocab_size, (1, n))
        say(f"prefill {n} tokens")
        t_ours = _time(lambda: ours_prefill(ids))
        t_hf = _time(lambda: hf_prefill(ids)) if hf is not None else None
        res["prefill"].append({"tokens": n, "ours_s": t_ours, "hf_s": t_hf,
                               "speedup": None if t_hf is None else t_hf / t_ours})

    for b in batches:
        say(f"decode batch {b}: {new_tokens} new tokens after {prompt_len}")
        ids = rng.integers(0, cfg.vocab_size, (b, prompt_len))
        # ours: prefill + greedy decode loop, timed per step
        t0 = time.perf_counter()
        logits, st, mask = model.prefill([list(r) for r in ids])
        nxt = logits.argmax(-1)
        ttft = time.perf_counter() - t0
        steps = []
        for _ in range(new_tokens):
            t = time.perf_counter()
            logits, st, mask = model.decode_step(nxt, st, mask)
            nxt = logits.argmax(-1)
            steps.append(time.perf_counter() - t)
        steps_a = np.array(steps)
        row: dict[str, Any] = {
            "batch": b, "ours_ttft_s": ttft, "ours_tok_s": b / float(np.median(steps_a)),
            "ours_step_p50_ms": float(np.percentile(steps_a, 50) * 1e3),
            "ours_step_p99_ms": float(np.percentile(steps_a, 99) * 1e3),
        }
        if hf is not None:
            import torch

            with torch.no_grad():
                t0 = time.perf_counter()
                out = hf(input_ids=torch.from_numpy(ids), use_cache=True, logits_to_keep=1)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                row["hf_ttft_s"] = time.perf_counter() - t0
                cache = out.past_key_values
                hsteps = []
                for _ in range(new_tokens):
                    t = time.perf_counter()
                    out = hf(input_ids=tok, past_key_values=cache, use_cache=True)
                    cache = out.past_key_values
                    tok = out.logits[:, -1].argmax(-1, keepdim=True)
                    hsteps.append(time.perf_counter() - t)
            row["hf_tok_s"] = b / float(np.median(hsteps))
            row["speedup"] = row["ours_tok_s"] / row["hf_tok_s"]
        row["ours_gb_s"] = bytes_per_decode_step(cfg, b) / float(np.median(steps_a)) / 1e9
        res["decode"].append(row)
    res["machine_bandwidth_gb_s"] = measure_bandwidth_gbs()
    res["peak_rss_mb"] = peak_rss_mb()
    res["table"] = format_table(res)
    tmpdir.cleanup()
    return res


def format_table(r: dict[str, Any]) -> str:
    def f(x: Any, fmt: str) -> str:
        return "—" if x is None else format(x, fmt)

    lines = [f"model {r['model']} ({r['graph']} graph, {r['params'] / 1e6:.1f}M params), {r['threads']} threads",
             "", "prefill            ours (s)    HF eager (s)   speedup"]
    for p in r["prefill"]:
        lines.append(f"  {p['tokens']:6d} tokens   {p['ours_s']:9.4f}   {f(p['hf_s'], '12.4f')}   "
                     f"{f(p['speedup'], '6.2f')}×")
    lines += ["", "decode   ours tok/s  HF tok/s  speedup  TTFT ours/HF (s)   p50/p99 step (ms)   GB/s"]
    for d in r["decode"]:
        lines.append(f"  b={d['batch']:<3d} {d['ours_tok_s']:10.1f} {f(d.get('hf_tok_s'), '9.1f')}  "
                     f"{f(d.get('speedup'), '6.2f')}×  {d['ours_ttft_s']:.4f}/{f(d.get('hf_ttft_s'), '.4f')}"
                     f"   {d['ours_step_p50_ms']:.2f}/{d['ours_step_p99_ms']:.2f}   {d['ours_gb_s']:.2f}")
    lines += ["", f"machine copy bandwidth {r['machine_bandwidth_gb_s']:.1f} GB/s; peak RSS {r['peak_rss_mb']:.0f} MB"]
    return "\n".join(lines)
