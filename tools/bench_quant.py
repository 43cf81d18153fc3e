#!/usr/bin/env python
"""Size, decode speed and accuracy of every weight format of one model, side by side (BENCHMARKS.md).

    python tools/bench_quant.py export   --preset tiny-4L --dir /tmp/fmt   # one folder per format
    python tools/bench_quant.py size     --dir /tmp/fmt
    python tools/bench_quant.py speed    --dir /tmp/fmt --threads 2 --new-tokens 64 --rounds 3
    python tools/bench_quant.py accuracy --dir /tmp/fmt --reference tiny-4L --positions 256

`--model HF_DIR` instead of `--preset` exports a checkpoint (the trained default model); `accuracy`
then scores its held-out text with `--text-file`. Every step writes DIR/<step>.json and prints a
markdown table. `speed` runs each (format, round) in a fresh process so that peak RSS is per format,
and interleaves the formats round by round so that a busy machine slows them alike; the ratios are
to the fused float32 graph of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# name → ExportOptions overrides. All fused (--optimize) except where a format has nothing to fuse yet.
FORMATS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "fp16": {"precision": "fp16"},
    "bf16": {"precision": "bf16"},
    "int8": {"quant": "int8"},
    "int4": {"quant": "int4"},  # block 32, 8-bit tied embedding/LM head (the defaults)
    "int4-b64": {"quant": "int4", "block_size": 64},
    "int4-b128": {"quant": "int4", "block_size": 128},
    # the embedding/head study, all with a 4-bit embedding/head
    "int4-e4": {"quant": "int4", "embedding_bits": 4},
    "int4-e4-acc0": {"quant": "int4", "embedding_bits": 4, "accuracy_level": 0},
    "int4-e4-head": {"quant": "int4", "embedding_bits": 4, "embedding": "head"},
    "int4-float-embed": {"quant": "int4", "embedding": "float"},
    "int4-e4-b128": {"quant": "int4", "embedding_bits": 4, "block_size": 128},
    "fp8": {"precision": "fp16", "quant": "fp8"},
}


def cmd_export(a: argparse.Namespace) -> None:
    from granite_onnx.export.exporter import ExportOptions, export

    out: dict[str, Any] = {}
    for name in a.formats:
        folder = Path(a.dir) / name
        if folder.exists():
            print(f"[export] {name}: exists, kept", file=sys.stderr)
            continue
        t = time.perf_counter()
        opts = ExportOptions(optimize=True, parity_check=False, **FORMATS[name])
        rep = export(model=a.model, preset_name=a.preset, seed=a.seed, layers=a.layers, out=folder, options=opts,
                     progress=lambda s, n=name: print(f"[export {n}] {s}", file=sys.stderr, flush=True))
        out[name] = {"seconds": round(time.perf_counter() - t, 1), "peak_rss_mb": rep["peak_rss_mb"],
                     "fusion_counts": rep.get("fusion_counts"), "op_histogram": rep["op_histogram"]}
        # each export in this process raises ru_maxrss for the next: only the first is a clean figure
    _save(a.dir, "export", out)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))


def cmd_size(a: argparse.Namespace) -> None:
    rows = {}
    for name in _formats_in(a.dir, a.formats):
        folder = Path(a.dir) / name
        w = json.loads((folder / "granite_config.json").read_text()).get("weights", {})
        rows[name] = {"bytes": _size(folder), "weights": w}
    base = rows.get("fp32", {}).get("bytes")
    print("| format | model.onnx + data | vs fp32 |\n|---|---|---|")
    for name, r in rows.items():
        rel = f"{r['bytes'] / base:.3f}×" if base else "—"
        print(f"| {name} | {r['bytes'] / 2**20:,.1f} MiB | {rel} |")
    _save(a.dir, "size", rows)


def _decode_once(folder: str, threads: int, prompt_len: int, new_tokens: int) -> dict[str, Any]:
    """In a fresh process: load, prefill `prompt_len` tokens, time `new_tokens` greedy decode steps."""
    import numpy as np

    from granite_onnx.runtime.session import GraniteSession

    t0 = time.perf_counter()
    s = GraniteSession(folder, threads=threads)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    ids = rng.integers(0, s.cfg.vocab_size, (1, prompt_len))
    st = s.new_state(1)
    logits, st = s.step(ids, np.ones_like(ids), st)
    nxt = logits[:, -1].argmax(-1)
    for _ in range(4):  # warm-up, not counted
        nxt = s.decode(nxt, st).argmax(-1)
    t = time.perf_counter()
    for _ in range(new_tokens):
        nxt = s.decode(nxt, st).argmax(-1)
    dt = time.perf_counter() - t
    return {"tok_s": new_tokens / dt, "load_s": load_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _interleaved(folders: dict[str, str], threads: int, prompt_len: int, bursts: int, burst: int) -> dict[str, float]:
    """All formats loaded in one process, decoding in alternating bursts of `burst` tokens: each format
    sees the same machine load, so the ratios hold on a busy machine (tok/s over all its bursts)."""
    import numpy as np

    from granite_onnx.runtime.session import GraniteSession

    runs = {}
    for name, folder in folders.items():
        # no spinning: an idle session's spinning workers would steal the cores of the one decoding
        s = GraniteSession(folder, threads=threads, spin=False)
        ids = np.random.default_rng(0).integers(0, s.cfg.vocab_size, (1, prompt_len))
        st = s.new_state(1)
        logits, st = s.step(ids, np.ones_like(ids), st)
        nxt = logits[:, -1].argmax(-1)
        for _ in range(4):
            nxt = s.decode(nxt, st).argmax(-1)
        runs[name] = [s, st, nxt, 0.0]
    for _ in range(bursts):
        for r in runs.values():
            s, st, nxt = r[0], r[1], r[2]
            t = time.perf_counter()
            for _ in range(burst):
                nxt = s.decode(nxt, st).argmax(-1)
            r[2], r[3] = nxt, r[3] + time.perf_counter() - t
    return {name: bursts * burst / r[3] for name, r in runs.items()}


def cmd_speed(a: argparse.Namespace) -> None:
    if a.interleave:
        folders = {n: str(Path(a.dir) / n) for n in _formats_in(a.dir, a.formats)}
        toks = _interleaved(folders, a.threads, a.prompt_len, a.rounds, a.new_tokens)
        base = toks.get("fp32")
        print(f"| format | decode tok/s ({a.rounds} interleaved bursts of {a.new_tokens}) | vs fp32 fused |\n|---|---|---|")
        for name, v in toks.items():
            print(f"| {name} | {v:.1f} | {f'{v / base:.2f}×' if base else '—'} |")
        _save(a.dir, "speed_interleaved", {"threads": a.threads, "bursts": a.rounds, "burst_tokens": a.new_tokens,
                                           "host_load_avg": os.getloadavg(), "tok_s": toks})
        return
    from granite_onnx.export.precision import WeightFormat, provider_problem

    names = []
    for name in _formats_in(a.dir, a.formats):
        meta = json.loads((Path(a.dir) / name / "granite_config.json").read_text())
        if provider_problem(meta, "cpu"):
            print(f"[speed] {name}: skipped ({WeightFormat.from_meta(meta).describe()} needs CUDA)", file=sys.stderr)
            continue
        names.append(name)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(a.rounds):
        for name in names:
            cmd = [sys.executable, __file__, "_decode", str(Path(a.dir) / name), str(a.threads), str(a.prompt_len),
                   str(a.new_tokens)]
            res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            runs[name].append(res)
            print(f"[speed] round {r + 1} {name}: {res['tok_s']:.1f} tok/s, peak RSS {res['peak_rss_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
    out = {}
    for name, rs in runs.items():
        toks = sorted(x["tok_s"] for x in rs)
        out[name] = {"tok_s_median": toks[len(toks) // 2], "tok_s_all": [round(x, 2) for x in toks],
                     "peak_rss_mb": max(x["peak_rss_mb"] for x in rs), "load_s": min(x["load_s"] for x in rs)}
    base = out.get("fp32", {}).get("tok_s_median")
    print(f"| format | decode tok/s (median of {a.rounds}) | vs fp32 fused | peak RSS |\n|---|---|---|---|")
    for name, r in out.items():
        rel = f"{r['tok_s_median'] / base:.2f}×" if base else "—"
        print(f"| {name} | {r['tok_s_median']:.1f} | {rel} | {r['peak_rss_mb']:,.0f} MB |")
    _save(a.dir, "speed", {"threads": a.threads, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                           "rounds": a.rounds, "host_load_avg": os.getloadavg(), "results": out})


def cmd_accuracy(a: argparse.Namespace) -> None:
    import numpy as np

    from granite_onnx.export.accuracy import (OrtStepper, _reference_source, check_targets, compare_logits,
                                              encode_text, heldout_tokens, reference_logits)
    from granite_onnx.export.precision import WeightFormat, provider_problem

    names = _formats_in(a.dir, a.formats)
    first = Path(a.dir) / names[0]
    src = _reference_source(first, a.reference, a.seed, a.layers)
    if a.text_file:
        tokens = encode_text(first, Path(a.text_file).read_text())[: a.positions + 1]
        what = f"text {Path(a.text_file).name}"
    elif (held := heldout_tokens(a.reference)) is not None:
        tokens, what = held[: a.positions + 1], f"held-out split of {Path(a.reference).name}"
    else:
        tokens = np.random.default_rng(0).integers(0, src.cfg.vocab_size, a.positions + 1)
        what = "random tokens (seed 0)"
    t = time.perf_counter()
    ref = reference_logits(src, tokens[:-1])
    print(f"[accuracy] float32 torch reference: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    del src
    out = {}
    for name in names:
        meta = json.loads((Path(a.dir) / name / "granite_config.json").read_text())
        fmt = WeightFormat.from_meta(meta)
        if provider_problem(meta, "cpu"):
            print(f"[accuracy] {name}: skipped (needs CUDA)", file=sys.stderr)
            continue
        t = time.perf_counter()
        got = OrtStepper(Path(a.dir) / name, a.threads).teacher_forced(tokens[:-1])
        m = compare_logits(ref, got, tokens[1:])
        m.update(check_targets(fmt, m))
        m["seconds"] = round(time.perf_counter() - t, 1)
        out[name] = m
        print(f"[accuracy] {name}: top-1 {100 * m['top1_agreement']:.2f} %, KL {m['mean_kl']:.2e}, "
              f"ppl × {m['perplexity']['ratio']:.4f}", file=sys.stderr, flush=True)
    print(f"| format | top-1 agreement | mean KL (nats) | worst KL | perplexity (fp32 {next(iter(out.values()))['perplexity']['reference']:.2f}) | targets |\n"
          "|---|---|---|---|---|---|")
    for name, m in out.items():
        ok = ", ".join(f"{k} {'✓' if v else '✗'}" for k, v in m["checks"].items()) or "—"
        print(f"| {name} | {100 * m['top1_agreement']:.2f} % | {m['mean_kl']:.2e} | {m['max_kl']:.2e} | "
              f"{m['perplexity']['model']:.2f} (× {m['perplexity']['ratio']:.4f}) | {ok} |")
    prev = Path(a.dir) / "accuracy.json"
    if prev.exists():  # keep the formats this run did not score (same tokens only)
        old = json.loads(prev.read_text())
        if old.get("tokens") == what and old.get("positions") == a.positions:
            out = {**old["results"], **out}
    _save(a.dir, "accuracy", {"tokens": what, "positions": a.positions, "results": out})


def _formats_in(d: str, wanted: list[str]) -> list[str]:
    return [n for n in wanted if (Path(d) / n / "granite_config.json").exists()]


def _save(d: str, step: str, obj: Any) -> None:
    p = Path(d) / f"{step}.json"
    p.write_text(json.dumps(obj, indent=2))
    print(f"[{step}] wrote {p}", file=sys.stderr)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_decode":
        folder, threads, prompt_len, new_tokens = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(_decode_once(folder, threads, prompt_len, new_tokens)))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    for step, fn in (("export", cmd_export), ("size", cmd_size), ("speed", cmd_speed), ("accuracy", cmd_accuracy)):
        s = sub.add_parser(step)
        s.add_argument("--dir", required=True)
        s.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
        s.set_defaults(fn=fn)
        if step == "export":
            g = s.add_mutually_exclusive_group(required=True)
            g.add_argument("--preset")
            g.add_argument("--model")
        if step in ("export", "accuracy"):
            s.add_argument("--seed", type=int, default=None if step == "accuracy" else 0)
            s.add_argument("--layers", type=int, default=None)
        if step in ("speed", "accuracy"):
            s.add_argument("--threads", type=int, default=2)
        if step == "speed":
            s.add_argument("--prompt-len", type=int, default=32)
            s.add_argument("--new-tokens", type=int, default=64)
            s.add_argument("--rounds", type=int, default=3)
            s.add_argument("--interleave", action="store_true",
                           help="load every format in one process and alternate bursts of --new-tokens, --rounds times")
        if step == "accuracy":
            s.add_argument("--reference", required=True, help="preset name or HF checkpoint folder")
            s.add_argument("--positions", type=int, default=256)
            s.add_argument("--text-file", help="held-out text to score (tokenized with the folder's tokenizer)")
    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
