"""`granite-onnx bench`: this runtime and HF transformers eager, side by side in one process.

Reports prefill time per prompt length, time to first token, decode tokens/s per batch size, the
ratios (ours / HF), per-step latency p50/p99, the share of each decode step spent outside
`run_with_iobinding` (the Python side: binding, sampling, bookkeeping), peak RSS, and the decode step's
achieved GB/s next to this machine's measured memory bandwidth (a STREAM-style copy). Optional: a
multi-turn case (time to first token with the state carried vs re-prefilling the transcript) and a
long prompt prefilled in chunks (peak RSS growth next to the K/V bytes). Warm-up runs are timed apart
and not counted.
"""

from __future__ import annotations

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

    from granite_onnx.models.weights import HFWeights, reference_source, save_hf_folder

    src = reference_source(model_dir, reference, seed, layers)
    ref = src.folder if isinstance(src, HFWeights) else save_hf_folder(src, tmp / "reference")
    return transformers.AutoModelForCausalLM.from_pretrained(str(ref), dtype=torch.float32).eval()


def _time(fn: Callable[[], Any], repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes (Linux); empty elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in f)
                    if k in ("VmRSS", "VmHWM")}
    except OSError:
        return {}


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) so that a later peak is the peak *of what follows*."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def decode_loop_timed(model: Any, ids: np.ndarray, new_tokens: int) -> dict[str, Any]:
    """Greedy prefill + `new_tokens` decode steps of one batch, the way `Model.generate` runs them.

    Returns time to first token, per-step latencies and the share of the decode loop's wall time spent
    outside `InferenceSession.run_with_iobinding` (binding, sampling, bookkeeping: the Python overhead).
    """
    from granite_onnx.runtime.config import GenerationConfig
    from granite_onnx.runtime.generate import TokenPicker

    pick = TokenPicker(GenerationConfig())
    t0 = time.perf_counter()
    logits, st = model.prefill([list(r) for r in ids])
    nxt = pick(logits)
    ttft = time.perf_counter() - t0
    run0 = st.run_s
    steps = np.empty(new_tokens)
    t_loop = time.perf_counter()
    for i in range(new_tokens):
        t = time.perf_counter()
        logits, st = model.decode_step(nxt, st)
        nxt = pick(logits)
        steps[i] = time.perf_counter() - t
    loop = time.perf_counter() - t_loop
    run = st.run_s - run0
    b = ids.shape[0]
    return {"batch": b, "ours_ttft_s": ttft, "ours_tok_s": b / float(np.median(steps)),
            "ours_step_p50_ms": float(np.percentile(steps, 50) * 1e3),
            "ours_step_p99_ms": float(np.percentile(steps, 99) * 1e3),
            "outside_run_share": max(0.0, 1.0 - run / loop), "outside_run_us": (loop - run) / new_tokens * 1e6}


def multi_turn(model: Any, turns: int, user_tokens: int, reply_tokens: int, seed: int = 0,
               repeats: int = 3) -> list[dict[str, Any]]:
    """A conversation at the token level: each turn brings `user_tokens` new ids and decodes
    `reply_tokens` greedily. Time to first token with the state carried (only the new ids are prefilled)
    next to a stateless server's (the whole transcript prefilled again) — per turn, best of `repeats`."""
    from granite_onnx.runtime.config import GenerationConfig
    from granite_onnx.runtime.generate import TokenPicker

    rng = np.random.default_rng(seed)
    pick = TokenPicker(GenerationConfig())
    vocab = model.cfg.vocab_size
    history: list[int] = []
    st, pending, rows = None, [], []
    for k in range(1, turns + 1):
        new = pending + list(map(int, rng.integers(3, vocab, user_tokens)))
        snap = model.snapshot(st) if st is not None else None
        ttft = float("inf")
        for _ in range(repeats):  # best of `repeats`, each from the same saved state (restoring is not timed)
            st = model.restore(snap) if snap is not None else None
            t0 = time.perf_counter()
            logits, st = model.prefill([new], state=st)
            tok = int(pick(logits)[0])
            ttft = min(ttft, time.perf_counter() - t0)
        history += new
        ttft_full = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            logits_full, _ = model.prefill([history])
            int(pick(logits_full)[0])
            ttft_full = min(ttft_full, time.perf_counter() - t0)
        reply = [tok]
        for _ in range(reply_tokens - 1):
            logits, st = model.decode_step(np.array([tok]), st)
            tok = int(pick(logits)[0])
            reply.append(tok)
        history += reply[:-1]
        pending = reply[-1:]
        rows.append({"turn": k, "context_tokens": len(history) - len(reply) + 1, "prefilled": len(new),
                     "ttft_s": ttft, "ttft_stateless_s": ttft_full})
    return rows


def long_prompt(model: Any, tokens: int, chunk_size: int | None, progress: Callable[[str], None] | None = None,
                seed: int = 0) -> dict[str, Any]:
    """Prefill `tokens` random ids in chunks (None: sized to the model's attention budget); time, peak RSS
    growth during the prefill, and the K/V bytes at the end (the part of the state that grows)."""
    rng = np.random.default_rng(seed)
    ids = list(map(int, rng.integers(3, model.cfg.vocab_size, tokens)))
    first = model.chunk_length(0, tokens, 1, chunk_size)
    model.prefill([ids[:first]], chunk_size=chunk_size)  # warm-up: kernels, arenas, one chunk's workspace
    say = progress or (lambda s: None)
    last = [0.0]
    chunks = [0]

    def report(done: int, total: int) -> None:
        chunks[0] += 1
        if time.perf_counter() - last[0] > 5 or done == total:
            last[0] = time.perf_counter()
            say(f"long prompt: {done}/{total} tokens")

    before = _proc_status()
    exact = _reset_peak_rss()
    t0 = time.perf_counter()
    _, st = model.prefill([ids], chunk_size=chunk_size, progress=report)
    dt = time.perf_counter() - t0
    after = _proc_status()
    kv = sum(int(np.prod(s.concrete_shape(1, st.past_len))) * np.dtype(model.session.dtypes[s.past_name]).itemsize
             for s in model.session.kv_specs)
    recurrent = sum(int(np.prod(s.concrete_shape(1, 0))) * np.dtype(model.session.dtypes[s.past_name]).itemsize
                    for s in model.session.specs if s.kind not in ("key", "value"))
    growth = (after.get("VmHWM", 0) - before.get("VmRSS", 0)) if exact and after else None
    return {"tokens": tokens, "chunk_size": chunk_size, "chunks": chunks[0], "seconds": dt, "tok_s": tokens / dt,
            "peak_rss_growth_mb": None if growth is None else growth / 2**20, "kv_mb": kv / 2**20,
            "recurrent_mb": 2 * recurrent / 2**20,  # two buffers (ping-pong)
            "beyond_kv_mb": None if growth is None else (growth - kv) / 2**20,
            "rss_before_mb": before.get("VmRSS", 0) / 2**20}


def bench(model_dir: str | Path, reference: str, *, seed: int | None = None, layers: int | None = None,
          threads: int = 2, prompt_len: int = 32, new_tokens: int = 32, batches: tuple[int, ...] = (1, 4, 16),
          prefill_lens: tuple[int, ...] = (512,), skip_hf: bool = False, turns: int = 4, long: int = 0,
          chunk_size: int | None = None, spin: bool | None = None,
          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    from granite_onnx.runtime.generate import Model

    say = progress or (lambda s: log.info(s))
    model_dir = Path(model_dir)
    model = Model.load(model_dir, threads=threads, spin=spin)
    cfg = model.cfg
    rng = np.random.default_rng(0)
    res: dict[str, Any] = {"model": str(model_dir), "graph": model.session.meta.get("graph"), "threads": threads,
                           "spin": spin, "params": cfg.num_parameters(), "prefill": [], "decode": []}
    if long > 0:  # first, in a process that has not yet allocated and freed anything large
        say(f"long prompt: {long} tokens in chunks of {chunk_size or 'the attention budget'}")
        res["long"] = long_prompt(model, long, chunk_size, say)
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
        decode_loop_timed(model, ids[:, : min(prompt_len, 8)], 4)  # warm-up of this batch size
        row = decode_loop_timed(model, ids, new_tokens)
        if hf is not None:
            import torch

            with torch.no_grad():
                warm_out = hf(input_ids=torch.from_numpy(ids[:, :8]), use_cache=True, logits_to_keep=1)
                for _ in range(4):  # warm-up decode steps of this batch size, not timed
                    warm_out = hf(input_ids=warm_out.logits[:, -1:].argmax(-1),
                                  past_key_values=warm_out.past_key_values, use_cache=True)
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
        row["ours_gb_s"] = bytes_per_decode_step(cfg, b) / (b / row["ours_tok_s"]) / 1e9
        res["decode"].append(row)
    if turns > 0:
        say(f"multi-turn: {turns} turns of {prompt_len} new tokens and {new_tokens}-token replies")
        res["multi_turn"] = multi_turn(model, turns, prompt_len, new_tokens)
    res["machine_bandwidth_gb_s"] = measure_bandwidth_gbs()
    res["peak_rss_mb"] = peak_rss_mb()
    res["table"] = format_table(res)
    tmpdir.cleanup()
    return res


def format_table(r: dict[str, Any]) -> str:
    def f(x: Any, fmt: str) -> str:
        return "—" if x is None else format(x, fmt)

    lines = [f"model {r['model']} ({r['graph']} graph, {r['params'] / 1e6:.1f}M params), {r['threads']} threads"
             + ("" if r.get("spin") is None else f", spinning {'on' if r['spin'] else 'off'}"),
             "", "prefill            ours (s)    HF eager (s)   speedup"]
    for p in r["prefill"]:
        lines.append(f"  {p['tokens']:6d} tokens   {p['ours_s']:9.4f}   {f(p['hf_s'], '12.4f')}   "
                     f"{f(p['speedup'], '6.2f')}×")
    lines += ["", "decode   ours tok/s  HF tok/s  speedup  TTFT ours/HF (s)   p50/p99 step (ms)   outside run   GB/s"]
    for d in r["decode"]:
        lines.append(f"  b={d['batch']:<3d} {d['ours_tok_s']:10.1f} {f(d.get('hf_tok_s'), '9.1f')}  "
                     f"{f(d.get('speedup'), '6.2f')}×  {d['ours_ttft_s']:.4f}/{f(d.get('hf_ttft_s'), '.4f')}"
                     f"   {d['ours_step_p50_ms']:7.2f}/{d['ours_step_p99_ms']:<7.2f}"
                     f"   {100 * d['outside_run_share']:5.1f}% {d['outside_run_us']:5.0f}µs   {d['ours_gb_s']:.2f}")
    if r.get("multi_turn"):
        lines += ["", "multi-turn   context   prefilled   TTFT carried state (s)   TTFT stateless re-prefill (s)"]
        for t in r["multi_turn"]:
            lines.append(f"  turn {t['turn']:<3d} {t['context_tokens']:8d} {t['prefilled']:10d}   "
                         f"{t['ttft_s']:22.4f}   {t['ttft_stateless_s']:29.4f}")
    if r.get("long"):
        g = r["long"]
        size = g["chunk_size"] or "≤ the attention budget"
        lines += ["", f"long prompt  {g['tokens']} tokens in {g['chunks']} chunks of {size}: {g['seconds']:.1f} s "
                      f"({g['tok_s']:.0f} tok/s); peak RSS growth {f(g['peak_rss_growth_mb'], '.1f')} MB = K/V "
                      f"{g['kv_mb']:.1f} MB + {f(g['beyond_kv_mb'], '.1f')} MB (recurrent state "
                      f"{g['recurrent_mb']:.1f} MB, fixed)"]
    lines += ["", f"machine copy bandwidth {r['machine_bandwidth_gb_s']:.1f} GB/s; peak RSS {r['peak_rss_mb']:.0f} MB"]
    return "\n".join(lines)
