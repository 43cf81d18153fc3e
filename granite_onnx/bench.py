"""`granite-onnx bench`: one or more exported folders of one model and HF transformers eager, side by side
in one process.

Typical use: a fused and a portable folder of the same model (`granite-onnx export ... --out X-fused` and
`... --portable --out X-portable`) against the HF eager reference, loaded once. Each measurement (each
prefill length, each decode batch size) times every runtime back to back — the folders in the order given,
then HF — so that load changes on a shared machine hit all of them alike.

Reports prefill time per prompt length, time to first token, decode tokens/s per batch size, the ratios
(each runtime against HF eager, and fused against portable when both graphs are given), per-step latency
p50/p99, the share of each decode step spent outside `run_with_iobinding` (the Python side: binding,
sampling, bookkeeping), memory (per runtime: the RSS its loading added, and the most the process RSS rose
above its level at the start of one of the runtime's measurements; the process peak RSS), and the decode
step's achieved GB/s next to this machine's measured memory bandwidth (a STREAM-style copy) and next to
the rate ONNX Runtime's MatMul reads a working set of the step's size (in cache or not), with the floor
that sets on each step and on each prefill, and so the most any runtime could beat HF by. Optional, on
the first folder only: a multi-turn case (time to first token with the state carried vs re-prefilling the
transcript) and a long prompt prefilled in chunks (peak RSS growth next to the K/V bytes). Warm-up runs are
timed apart and not counted.

Runtimes are named by label: a folder's graph kind ("fused", "portable" from granite_config.json), with the
folder's name added when two folders have the same kind ("fused (x-int4)"); HF transformers is "HF eager".
The JSON (`granite-onnx bench ... --json`, and what `bench()` returns):

    {
      "config": "small", "params": 20800000, "threads": 2, "spin": null,
      "prompt_len": 32, "new_tokens": 128, "rounds": 1,          # rounds: best of N interleaved rounds
      "runtimes": ["fused", "portable", "HF eager"],            # labels, in timing order
      "folders": [{"label": "fused", "dir": "/tmp/x-fused", "graph": "fused",
                   "weights": {...granite_config.json "weights"...}, "weight_bytes_per_param": 4.0,
                   "load_s": 0.21}, ...],                       # the first one also runs multi_turn / long
      "reference": {"label": "HF eager", "source": "small", "load_s": 1.3} | null,     # null with --no-hf
      "fused_vs_portable": {"fused": "fused", "portable": "portable"} | null,   # the pair compared, if any
      "warmup_s": {"fused": 0.01, "portable": 0.02, "HF eager": 0.05},
      "prefill": [{"tokens": 512,
                   "s": {"fused": 0.05, "portable": 0.09, "HF eager": 0.2},   # seconds, per runtime
                   "vs_hf": {"fused": 4.0, "portable": 2.2},   # HF seconds / runtime seconds (> 1: faster)
                   "fused_over_portable": 1.8,                 # portable s / fused s (null without a pair)
                   "gflop": 10.2, "gflop_s": {"fused": 110.0, ...}, "floor_s": 0.047,   # roofline keys
                   "ceiling_vs_hf": 3.3}, ...],               # HF s / floor s
      "decode": [{"batch": 1,
                  "runtimes": {"fused": {"tok_s": 900.0, "ttft_s": 0.004, "step_p50_ms": 1.1,
                                         "step_p99_ms": 1.6, "outside_run_share": 0.12,
                                         "outside_run_us": 130.0, "gb_s": 75.0,
                                         "roofline_gb_s": 41.0, "of_roofline": 0.7, "floor_ms": 1.1},
                               ...,
                               "HF eager": {... same keys, outside_run_* null ...}},
                  "vs_hf": {"fused": 5.1, "portable": 2.9},   # runtime tok/s / HF tok/s
                  "ceiling_vs_hf": {"fused": 9.8, ...},      # HF step time / the folder's floor
                  "fused_over_portable": 1.7}, ...],          # fused tok/s / portable tok/s
      "memory": {"fused": {"load_rss_mb": 70.0,          # the RSS its loading added
                           "load_peak_growth_mb": 71.0,  # the peak while loading, above the RSS before
                           "peak_growth_mb": 48.0},      # the most the peak rose above the RSS at the start
                 ..., "HF eager": {...}},                # of one of its measurements (warm-up included)
      "multi_turn": [{"turn": 1, "context_tokens": 32, "prefilled": 32, "ttft_s": ..,
                      "ttft_stateless_s": ..}, ...],          # with --turns > 0, first folder only
      "multi_turn_runtime": "fused",
      "long": {...long_prompt()..., "runtime": "fused"},      # with --long N, first folder only
      "machine_bandwidth_gb_s": 12.3,  # a numpy copy of 256 MiB: memory, past any cache
      "roofline": {"gemv_gb_s": {"43 MiB": 41.0, ...},   # ONNX Runtime's batch-1 MatMul per working set
                   "gemm_gflop_s": 216.0} | absent,      # its dense [512, h] × [h, 4h] MatMul; absent: --no-roofline
                                                         # (each measured right after the timings it is set against;
                                                         # "error": why the rest were skipped, if one could not run)
      "peak_rss_mb": 800.0,        # the process peak RSS (kept across the peak resets the memory figures use)
      "table": "..."               # what `granite-onnx bench` prints without --json
    }

Memory figures are null where the peak RSS cannot be reset (not Linux). The decode GB/s counts the weight
bytes one step must read (`bytes_per_decode_step`), at 4 bytes a parameter for fp32 folders and HF, and at
the folder's weight-file bytes per parameter for reduced-precision ones. The roofline keys (absent with
roofline=False) set them against what ONNX Runtime's own MatMul reaches here: see granite_onnx/roofline.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from granite_onnx.models.config import HybridConfig
from granite_onnx.roofline import bytes_per_decode_step, gemm_gflop_s, gemv_gb_s, prefill_flops

log = logging.getLogger(__name__)

HF_LABEL = "HF eager"


class BenchError(ValueError):
    """Bad bench input: folders of different models, a folder given twice, no reference."""


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
    kv = model.session.kv_nbytes(st)  # what the K/V buffers hold: under shared K/V, their capacity
    recurrent = model.session.recurrent_nbytes(st)  # one set of buffers in place, two alternating
    growth = (after.get("VmHWM", 0) - before.get("VmRSS", 0)) if exact and after else None
    return {"tokens": tokens, "chunk_size": chunk_size, "chunks": chunks[0], "seconds": dt, "tok_s": tokens / dt,
            "peak_rss_growth_mb": None if growth is None else growth / 2**20, "kv_mb": kv / 2**20,
            "recurrent_mb": recurrent / 2**20,
            "beyond_kv_mb": None if growth is None else (growth - kv) / 2**20,
            "rss_before_mb": before.get("VmRSS", 0) / 2**20, "kv_cache": "shared" if st.kv_cap else "grow"}


LOAD = " (load)"  # suffix of the memory segment key of a runtime's loading


class _Memory:
    """RSS bookkeeping for several runtimes in one process (Linux /proc; figures stay None elsewhere).

    `segment(key)` resets the peak RSS (VmHWM), runs its body, and keeps for `key` the most the peak rose
    above the RSS at the segment's start (the max over all of the key's segments) and the RSS its last
    segment added. Resetting VmHWM resets getrusage's ru_maxrss too, so the process peak is kept here,
    read before every reset."""

    def __init__(self) -> None:
        self.process_peak = 0
        self.growth: dict[str, int] = {}
        self.added: dict[str, int] = {}

    def note(self) -> dict[str, int]:
        s = _proc_status()
        self.process_peak = max(self.process_peak, s.get("VmHWM", 0))
        return s

    @contextmanager
    def segment(self, key: str) -> Iterator[None]:
        before = self.note()
        exact = bool(before) and _reset_peak_rss()
        try:
            yield
        finally:
            after = self.note()
            if before and after:
                self.added[key] = after["VmRSS"] - before["VmRSS"]
            if exact and after:
                self.growth[key] = max(self.growth.get(key, 0), after["VmHWM"] - before["VmRSS"])

    def growth_mb(self, key: str) -> float | None:
        return self.growth[key] / 2**20 if key in self.growth else None

    def added_mb(self, key: str) -> float | None:
        return self.added[key] / 2**20 if key in self.added else None

    def peak_mb(self) -> float:
        from granite_onnx.export.exporter import peak_rss_mb  # here, not at the top: importing bench stays torch-free

        self.note()
        return max(self.process_peak / 2**20, peak_rss_mb())


def _same_shape(cfg: HybridConfig) -> HybridConfig:
    return dataclasses.replace(cfg, name="")  # a preset's name or "custom": the same model either way


def check_same_model(dirs: Sequence[Path], cfgs: Sequence[HybridConfig]) -> None:
    """Raise BenchError unless every folder holds the same model configuration as the first."""
    for d, c in zip(dirs[1:], cfgs[1:]):
        if _same_shape(c) != _same_shape(cfgs[0]):
            fields = [f.name for f in dataclasses.fields(HybridConfig) if f.compare and f.name != "name"]
            diff = [f"{k} {getattr(cfgs[0], k)!r} vs {getattr(c, k)!r}" for k in fields
                    if getattr(cfgs[0], k) != getattr(c, k)]
            raise BenchError(f"{dirs[0]} and {d} hold different models ({'; '.join(diff[:4])}"
                             f"{'; …' if len(diff) > 4 else ''}): bench compares folders of one model — export "
                             "them from the same checkpoint or preset (e.g. once with --optimize, once with "
                             "--portable)")


def _source(d: Path) -> Any:
    """The export report's source (preset, seed, layers; or the HF folder), or None."""
    rep = d / "export_report.json"
    try:
        return json.loads(rep.read_text()).get("source") if rep.exists() else None
    except (OSError, ValueError):
        return None


def runtime_labels(dirs: Sequence[Path], graphs: Sequence[str | None]) -> list[str]:
    """A label per folder: its graph kind, plus the folder's name (or path) where kinds repeat."""
    kinds = [g or "onnx" for g in graphs]
    labels = [k if kinds.count(k) == 1 else f"{k} ({d.name})" for k, d in zip(kinds, dirs)]
    return [lab if labels.count(lab) == 1 else f"{k} ({d})" for lab, k, d in zip(labels, kinds, dirs)]


def _weight_bytes_per_param(d: Path, meta: dict[str, Any], cfg: HybridConfig) -> float:
    """4 for float32 weights; otherwise the weight file's bytes per parameter (scales, packed nibbles)."""
    from granite_onnx.runtime.session import DATA_FILE

    w = meta.get("weights") or {}
    if w.get("precision", "fp32") == "fp32" and w.get("quant", "none") == "none":
        return 4.0
    return (d / DATA_FILE).stat().st_size / cfg.num_parameters()


def hf_prefill(hf: Any, ids: np.ndarray) -> None:
    import torch

    with torch.no_grad():
        hf(input_ids=torch.from_numpy(ids), use_cache=True, logits_to_keep=1)


def _step_figures(batch: int, ttft: float, steps: np.ndarray) -> dict[str, Any]:
    return {"tok_s": batch / float(np.median(steps)), "ttft_s": ttft,
            "step_p50_ms": float(np.percentile(steps, 50) * 1e3), "step_p99_ms": float(np.percentile(steps, 99) * 1e3)}


def hf_decode_timed(hf: Any, ids: np.ndarray, new_tokens: int) -> dict[str, Any]:
    """Greedy prefill + `new_tokens` decode steps with HF transformers (its own cache), figures as in
    `decode_loop_timed` (no `run` to measure the overhead against: outside_run_* are None)."""
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        out = hf(input_ids=torch.from_numpy(ids), use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        ttft = time.perf_counter() - t0
        cache = out.past_key_values
        steps = np.empty(new_tokens)
        for i in range(new_tokens):
            t = time.perf_counter()
            out = hf(input_ids=tok, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            steps[i] = time.perf_counter() - t
    return {**_step_figures(ids.shape[0], ttft, steps), "outside_run_share": None, "outside_run_us": None}


def _ort_decode_timed(model: Any, ids: np.ndarray, new_tokens: int) -> dict[str, Any]:
    r = decode_loop_timed(model, ids, new_tokens)
    return {"tok_s": r["ours_tok_s"], "ttft_s": r["ours_ttft_s"], "step_p50_ms": r["ours_step_p50_ms"],
            "step_p99_ms": r["ours_step_p99_ms"], "outside_run_share": r["outside_run_share"],
            "outside_run_us": r["outside_run_us"]}


def bench(model_dirs: str | Path | Sequence[str | Path], reference: str | None, *, seed: int | None = None,
          layers: int | None = None, threads: int = 2, prompt_len: int = 32, new_tokens: int = 128,
          batches: tuple[int, ...] = (1, 4, 16), prefill_lens: tuple[int, ...] = (512, 4096), skip_hf: bool = False,
          turns: int = 4, long: int = 0, chunk_size: int | None = None, spin: bool | None = None,
          rounds: int = 1, roofline: bool = True, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time every folder in `model_dirs` (one model: same config) and HF eager (from `reference`, an HF
    folder or a preset name; skipped with `skip_hf`) side by side; returns the dict described in the module
    docstring. `rounds` > 1 repeats each interleaved measurement and keeps every runtime's best (on a shared
    machine a burst of load hits one round, rarely all). `roofline`: measure the ceilings of
    granite_onnx.roofline (seconds; up to 1 GiB more memory for a large working set). Raises BenchError
    for folders of different models or a folder given twice."""
    from granite_onnx.runtime.generate import Model
    from granite_onnx.runtime.session import read_folder_config

    say = progress or (lambda s: log.info(s))
    dirs = [Path(model_dirs)] if isinstance(model_dirs, (str, Path)) else [Path(d) for d in model_dirs]
    if not dirs:
        raise BenchError("no model folder given")
    if rounds < 1:
        raise BenchError(f"rounds must be ≥ 1, got {rounds}")
    if not skip_hf and not reference:
        raise BenchError("timing HF eager needs --reference (an HF checkpoint folder or a preset name); "
                         "or pass --no-hf")
    seen: dict[Path, Path] = {}
    for d in dirs:
        if d.resolve() in seen:
            raise BenchError(f"{d} is given twice (as {seen[d.resolve()]} too): give each folder once")
        seen[d.resolve()] = d
    read = [read_folder_config(d) for d in dirs]
    check_same_model(dirs, [c for c, _ in read])
    sources = [_source(d) for d in dirs]
    if any(s != sources[0] for s in sources[1:]):
        say(f"warning: the folders were exported from different sources ({', '.join(map(str, sources))}): "
            f"same shape, maybe different weights; the HF reference is built from {dirs[0]}'s")
    cfg = read[0][0]
    labels = runtime_labels(dirs, [m.get("graph") for _, m in read])
    order = labels + ([] if skip_hf else [HF_LABEL])
    graph_of = {lab: m.get("graph") for lab, (_, m) in zip(labels, read)}
    fused = next((lab for lab in labels if graph_of[lab] == "fused"), None)
    portable = next((lab for lab in labels if graph_of[lab] == "portable"), None)
    pair = (fused, portable) if fused and portable else None
    mem = _Memory()
    rng = np.random.default_rng(0)
    res: dict[str, Any] = {
        "config": cfg.name, "params": cfg.num_parameters(), "threads": threads, "spin": spin,
        "prompt_len": prompt_len, "new_tokens": new_tokens, "rounds": rounds, "runtimes": order, "folders": [],
        "reference": None,
        "fused_vs_portable": None if pair is None else {"fused": pair[0], "portable": pair[1]},
        "prefill": [], "decode": []}
    if roofline:
        res["roofline"] = {"gemv_gb_s": {}, "gemm_gflop_s": None}
    models: dict[str, Any] = {}
    bpp: dict[str, float] = {HF_LABEL: 4.0}

    def load_folder(i: int) -> None:
        lab, d = labels[i], dirs[i]
        say(f"loading {lab}: {d}")
        t0 = time.perf_counter()
        with mem.segment(lab + LOAD):
            models[lab] = Model.load(d, threads=threads, spin=spin)
        dt = time.perf_counter() - t0
        bpp[lab] = _weight_bytes_per_param(d, read[i][1], cfg)
        res["folders"].append({"label": lab, "dir": str(d), "graph": read[i][1].get("graph"),
                               "weights": read[i][1].get("weights"), "weight_bytes_per_param": bpp[lab],
                               "load_s": dt})

    load_folder(0)
    if long > 0:  # first, in a process that has not yet allocated and freed anything large
        say(f"long prompt ({labels[0]}): {long} tokens in chunks of {chunk_size or 'the attention budget'}")
        mem.note()  # long_prompt resets the peak RSS: keep the process peak so far
        res["long"] = long_prompt(models[labels[0]], long, chunk_size, say)
        res["long"]["runtime"] = labels[0]
    for i in range(1, len(dirs)):
        load_folder(i)

    hf = None
    with tempfile.TemporaryDirectory() if not skip_hf else nullcontext("") as tmp:  # the HF checkpoint, if any
        if not skip_hf:
            import torch

            torch.set_num_threads(threads)
            say("loading the HF reference")
            t0 = time.perf_counter()
            with mem.segment(HF_LABEL + LOAD):
                hf = load_reference(dirs[0], str(reference), seed, layers, Path(tmp))
            res["reference"] = {"label": HF_LABEL, "source": str(reference), "load_s": time.perf_counter() - t0}

        def prefill(lab: str, ids: np.ndarray) -> None:
            if lab == HF_LABEL:
                hf_prefill(hf, ids)
            else:
                models[lab].prefill([list(r) for r in ids])

        def decode(lab: str, ids: np.ndarray, n: int) -> dict[str, Any]:
            return hf_decode_timed(hf, ids, n) if lab == HF_LABEL else _ort_decode_timed(models[lab], ids, n)

        def ratios(values: dict[str, float], faster_is_smaller: bool) -> tuple[dict[str, float], float | None]:
            def r(a: str, b: str) -> float:  # how many times faster a is than b
                return values[b] / values[a] if faster_is_smaller else values[a] / values[b]

            vs_hf = {lab: r(lab, HF_LABEL) for lab in labels} if HF_LABEL in values else {}
            return vs_hf, (r(*pair) if pair else None)

        warm = rng.integers(0, cfg.vocab_size, (1, 8))
        res["warmup_s"] = {}
        for lab in order:
            with mem.segment(lab):
                res["warmup_s"][lab] = _time(lambda: prefill(lab, warm))  # noqa: B023 (called at once)

        for n in prefill_lens:
            ids = rng.integers(0, cfg.vocab_size, (1, n))
            say(f"prefill {n} tokens: {', '.join(order)}")
            secs: dict[str, float] = {}
            for _ in range(rounds):
                for lab in order:
                    with mem.segment(lab):
                        t = _time(lambda: prefill(lab, ids))  # noqa: B023
                    secs[lab] = min(t, secs.get(lab, t))
            vs_hf, fp = ratios(secs, faster_is_smaller=True)
            res["prefill"].append({"tokens": n, "s": secs, "vs_hf": vs_hf, "fused_over_portable": fp})

        def measure_roofline(what: str, fn: Callable[[], None]) -> None:
            """A roofline measurement that cannot run (no space for its weights file, say) drops the roofline
            for the rest of the run, with a warning: the timings already taken are kept."""
            if "error" in res["roofline"]:
                return
            say(f"roofline: {what}")
            try:
                fn()
            except (OSError, MemoryError) as e:
                res["roofline"]["error"] = f"{type(e).__name__}: {e}"
                say(f"warning: roofline skipped from here on ({res['roofline']['error']}); "
                    "the timings are unaffected (--no-roofline avoids it)")

        def gemm_roofline() -> None:
            res["roofline"]["gemm_gflop_s"] = gflops = gemm_gflop_s(cfg.hidden_size, threads)
            for p in res["prefill"]:
                prefill_roofline(p, cfg, gflops)

        if roofline and res["prefill"]:  # measured now, in the conditions the prefills just ran in
            measure_roofline("ONNX Runtime's dense MatMul rate", gemm_roofline)

        for b in batches:
            say(f"decode batch {b}: {new_tokens} new tokens after {prompt_len}: {', '.join(order)}")
            ids = rng.integers(0, cfg.vocab_size, (b, prompt_len))
            rows: dict[str, dict[str, Any]] = {}
            for _ in range(rounds):
                for lab in order:  # each: its warm-up at this batch size (not counted), then the timed run
                    with mem.segment(lab):
                        decode(lab, ids[:, : min(prompt_len, 8)], 4)
                        row = decode(lab, ids, new_tokens)
                    row["gb_s"] = bytes_per_decode_step(cfg, b, bpp[lab]) / (b / row["tok_s"]) / 1e9
                    if lab not in rows or row["tok_s"] > rows[lab]["tok_s"]:
                        rows[lab] = row
            vs_hf, fp = ratios({lab: r["tok_s"] for lab, r in rows.items()}, faster_is_smaller=False)
            res["decode"].append({"batch": b, "runtimes": rows, "vs_hf": vs_hf, "fused_over_portable": fp})
            if roofline:
                measure_roofline(f"ONNX Runtime's batch-1 MatMul over the working set of a batch-{b} step",
                                 lambda: decode_roofline(res["decode"][-1], cfg, bpp, threads,  # noqa: B023
                                                         res["roofline"]["gemv_gb_s"]))

        if turns > 0:
            say(f"multi-turn ({labels[0]}): {turns} turns of {prompt_len} new tokens and {new_tokens}-token replies")
            res["multi_turn"] = multi_turn(models[labels[0]], turns, prompt_len, new_tokens)
            res["multi_turn_runtime"] = labels[0]
    res["memory"] = {lab: {"load_rss_mb": mem.added_mb(lab + LOAD), "load_peak_growth_mb": mem.growth_mb(lab + LOAD),
                           "peak_growth_mb": mem.growth_mb(lab)} for lab in order}
    res["peak_rss_mb"] = mem.peak_mb()  # before the bandwidth test's own 512 MB
    res["machine_bandwidth_gb_s"] = measure_bandwidth_gbs()
    res["table"] = format_table(res)
    return res


def prefill_roofline(p: dict[str, Any], cfg: HybridConfig, gflops: float) -> None:
    """Adds to a prefill entry: "gflop" (granite_onnx.roofline.prefill_flops), "gflop_s" per runtime,
    "floor_s" (the FLOPs at `gflops`, ONNX Runtime's dense MatMul rate) and "ceiling_vs_hf" (HF s / floor)."""
    p["gflop"] = prefill_flops(cfg, p["tokens"]) / 1e9
    p["gflop_s"] = {lab: p["gflop"] / s for lab, s in p["s"].items()}
    p["floor_s"] = p["gflop"] / gflops
    p["ceiling_vs_hf"] = p["s"][HF_LABEL] / p["floor_s"] if HF_LABEL in p["s"] else None


def decode_roofline(d: dict[str, Any], cfg: HybridConfig, bpp: dict[str, float], threads: int,
                    rates: dict[str, float]) -> None:
    """Measures ONNX Runtime's batch-1 MatMul over each runtime's working set at this batch (recorded in
    `rates` by size) and adds to each row "roofline_gb_s", "of_roofline" (the row's gb_s over it) and
    "floor_ms" (the step's bytes over it); to the batch entry "ceiling_vs_hf" per folder (HF's step time over
    the folder's floor)."""
    measured: dict[int, float] = {}
    for lab, row in d["runtimes"].items():
        nbytes = bytes_per_decode_step(cfg, d["batch"], bpp[lab])
        mib = int(min(nbytes, 1 << 30) // (1 << 20))  # runtimes with the same working set share a measurement
        if mib not in measured:
            measured[mib] = rates[f"{mib} MiB"] = gemv_gb_s(nbytes, cfg.hidden_size, threads, head=cfg.vocab_size)
        row["roofline_gb_s"] = measured[mib]
        row["of_roofline"] = row["gb_s"] / measured[mib]
        row["floor_ms"] = nbytes / measured[mib] / 1e6
    hf = d["runtimes"].get(HF_LABEL)
    d["ceiling_vs_hf"] = {} if hf is None else {
        lab: d["batch"] / hf["tok_s"] * 1e3 / row["floor_ms"] for lab, row in d["runtimes"].items() if lab != HF_LABEL}


def _f(x: Any, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def format_table(r: dict[str, Any]) -> str:
    labels = [f["label"] for f in r["folders"]]
    order = r["runtimes"]
    w = max(len(lab) for lab in order + ["fused/portable"])
    pair = r.get("fused_vs_portable")
    lines = [f"{r['config']}: {r['params'] / 1e6:.1f}M params, {r['threads']} threads"
             + ("" if r.get("spin") is None else f", spinning {'on' if r['spin'] else 'off'}")
             + "; every runtime timed back to back per measurement"
             + (f", best of {r['rounds']} rounds" if r.get("rounds", 1) > 1 else "")]
    for f in r["folders"]:
        lines.append(f"  {f['label']:<{w}}  {f['dir']}  (load {f['load_s']:.2f} s)")
    if r.get("reference"):
        lines.append(f"  {HF_LABEL:<{w}}  transformers fp32 from {r['reference']['source']}  "
                     f"(load {r['reference']['load_s']:.2f} s)")
    lines.append("  warm-up, not counted (s): " + ", ".join(f"{lab} {s:.4f}" for lab, s in r["warmup_s"].items()))

    if r["prefill"]:
        cols = [f"{lab} (s)" for lab in order] + ([f"{lab} ×HF" for lab in labels] if HF_LABEL in order else [])
        cols += ["fused/portable"] if pair else []
        widths = [max(len(c), 9) for c in cols]
        lines += ["", f"{'prefill':<17}" + "  ".join(f"{c:>{cw}}" for c, cw in zip(cols, widths))]
        for p in r["prefill"]:
            vals = [format(p["s"][lab], ".4f") for lab in order]
            vals += [f"{p['vs_hf'][lab]:.2f}×" for lab in labels] if HF_LABEL in order else []
            vals += [f"{p['fused_over_portable']:.2f}×"] if pair else []
            lines.append(f"  {p['tokens']:6d} tokens  " + "  ".join(f"{v:>{cw}}" for v, cw in zip(vals, widths)))
        if r.get("roofline", {}).get("gemm_gflop_s"):
            lines.append(f"  roofline: ONNX Runtime's dense MatMul {r['roofline']['gemm_gflop_s']:.0f} GFLOP/s")
            for p in r["prefill"]:
                rates = ", ".join(f"{lab} {v:.0f}" for lab, v in p["gflop_s"].items())
                ceiling = "" if p["ceiling_vs_hf"] is None else f" → at most {p['ceiling_vs_hf']:.2f}× HF"
                lines.append(f"  {p['tokens']:6d} tokens  {p['gflop']:.3g} GFLOP, floor {p['floor_s']:.3g} s"
                             f"{ceiling}; GFLOP/s: {rates}")

    if r["decode"]:
        lines += ["", f"decode: {r['new_tokens']} new tokens after {r['prompt_len']}, greedy; ×HF = tok/s ratio; "
                      f"GB/s = weight bytes read per step / step time (machine copy bandwidth "
                      f"{r['machine_bandwidth_gb_s']:.1f} GB/s)",
                  f"  batch  {'runtime':<{w}}     tok/s      ×HF   TTFT (s)   p50/p99 step (ms)    outside run"
                  "     GB/s" + ("  roofline GB/s, %  floor (ms)" if any(
                      "roofline_gb_s" in x for d in r["decode"] for x in d["runtimes"].values()) else "")]
        for d in r["decode"]:
            for i, lab in enumerate(order):
                x = d["runtimes"][lab]
                out = ("—" if x["outside_run_share"] is None
                       else f"{100 * x['outside_run_share']:5.1f}% {x['outside_run_us']:5.0f}µs")
                ratio = f"{d['vs_hf'][lab]:.2f}×" if lab in d["vs_hf"] else "—"
                lines.append(f"  {'b=' + str(d['batch']) if i == 0 else '':<5}  {lab:<{w}} {x['tok_s']:9.1f} "
                             f"{ratio:>8} {x['ttft_s']:10.4f}   {x['step_p50_ms']:8.2f}/{x['step_p99_ms']:<8.2f}  "
                             f"{out:>13} {x['gb_s']:8.2f}"
                             + (f"  {x['roofline_gb_s']:13.1f} {100 * x['of_roofline']:3.0f}% {x['floor_ms']:11.3f}"
                                if "roofline_gb_s" in x else ""))
            if d.get("ceiling_vs_hf"):
                lines.append(f"  {'':<5}  {'ceiling ×HF':<{w}} " + ", ".join(
                    f"{lab} {v:.2f}× (HF step / {lab} floor)" for lab, v in d["ceiling_vs_hf"].items()))
            if pair:
                lines.append(f"  {'':<5}  {'fused/portable':<{w}} {d['fused_over_portable']:8.2f}×")

    if r.get("roofline", {}).get("error"):
        lines += ["", f"roofline skipped from one measurement on: {r['roofline']['error']}"]
    mem = r.get("memory") or {}
    if mem:
        lines += ["", f"{'memory (MB)':<{w + 2}}  load: RSS added  load: peak growth  peak growth while timed"]
        for lab in order:
            m = mem[lab]
            lines.append(f"  {lab:<{w}}  {_f(m['load_rss_mb'], '15.1f')}  {_f(m['load_peak_growth_mb'], '17.1f')}  "
                         f"{_f(m['peak_growth_mb'], '23.1f')}")
    lines.append(f"  process peak RSS {r['peak_rss_mb']:.0f} MB")

    if r.get("multi_turn"):
        head = f"multi-turn ({r.get('multi_turn_runtime', labels[0])})"
        lines += ["", f"{head}   context   prefilled   TTFT carried state (s)   TTFT stateless re-prefill (s)"]
        for t in r["multi_turn"]:
            lines.append(f"{'  turn ' + str(t['turn']):<{len(head)}} {t['context_tokens']:9d} {t['prefilled']:11d}   "
                         f"{t['ttft_s']:22.4f}   {t['ttft_stateless_s']:29.4f}")
    if r.get("long"):
        g = r["long"]
        size = g["chunk_size"] or "≤ the attention budget"
        lines += ["", f"long prompt ({g.get('runtime', labels[0])})  {g['tokens']} tokens in {g['chunks']} chunks "
                      f"of {size}: {g['seconds']:.1f} s ({g['tok_s']:.0f} tok/s); peak RSS growth "
                      f"{_f(g['peak_rss_growth_mb'], '.1f')} MB = K/V {g['kv_mb']:.1f} MB "
                      f"({g.get('kv_cache', 'grow')}) + {_f(g['beyond_kv_mb'], '.1f')} MB (recurrent state {g['recurrent_mb']:.1f} MB, fixed)"]
    return "\n".join(lines)
