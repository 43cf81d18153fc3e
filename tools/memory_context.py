#!/usr/bin/env python
"""Memory against context length: the hybrid vs the same widths with every layer attention (BENCHMARKS.md).

    python tools/memory_context.py export  --dir /tmp/memctx                  # tiny-4L + all-attention, int4
    python tools/memory_context.py measure --dir /tmp/memctx --contexts 1024 4096 16384 65536
    python tools/memory_context.py report  --dir /tmp/memctx --plot docs/memory_vs_context.png

`measure` runs each (model, context) in a fresh process: it loads the model, gives it a state holding
`context` tokens of K/V (random values: memory does not depend on them) and the recurrent state, and
decodes 8 tokens; it records the RSS after loading, the peak RSS, and the state's bytes. For contexts up
to 4096 it also prefills that many real tokens (chunks of 512) and records that peak, which checks the
shortcut and shows the prefill workspace. `report` fits RSS = base + k · state bytes to the measurements
and projects the 40-layer granite-4.0-h-tiny (attention at 4 layers) against a 40-layer all-attention
model of the same widths, by formula.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODELS = ("hybrid", "attention")


def state_bytes(cfg: Any, context: int, batch: int = 1, dtype_bytes: int = 4) -> dict[str, int]:
    """Bytes of the decode state at `context` tokens, by kind (the SSM state is float32 at any precision)."""
    from granite_onnx.export import io

    out = {"kv": 0, "conv": 0, "ssm": 0}
    for s in io.state_specs(cfg):
        n = 1
        for d in s.concrete_shape(batch, context):
            n *= d
        kind = {"key": "kv", "value": "kv", "conv_state": "conv", "recurrent_state": "ssm"}[s.kind]
        out[kind] += n * (4 if s.float32_always else dtype_bytes)
    return out


def cmd_export(a: argparse.Namespace) -> None:
    from granite_onnx.export.exporter import ExportOptions, export
    from granite_onnx.models.config import ATTENTION, preset
    from granite_onnx.models.weights import RandomWeights

    hybrid = preset("tiny-4L")
    attn = dataclasses.replace(hybrid, layer_types=(ATTENTION,) * hybrid.num_layers, name="tiny-4L-all-attention")
    for name, cfg in (("hybrid", hybrid), ("attention", attn)):
        out = Path(a.dir) / name
        if out.exists():
            continue
        export(source=RandomWeights(cfg, 0), out=out, options=ExportOptions(
            optimize=True, parity_check=False, quant=a.quant),
            progress=lambda s, n=name: print(f"[export {n}] {s}", file=sys.stderr, flush=True))


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _measure_once(folder: str, context: int, prefill: bool) -> dict[str, Any]:
    import numpy as np

    from granite_onnx.export import io
    from granite_onnx.runtime.session import GraniteSession

    s = GraniteSession(folder, threads=2)
    loaded = _rss_mb()
    rng = np.random.default_rng(0)
    res: dict[str, Any] = {"rss_loaded_mb": loaded}
    if prefill:  # real tokens, chunked
        ids = rng.integers(0, s.cfg.vocab_size, (1, context))
        st = s.new_state(1)
        t = time.perf_counter()
        for c in range(0, context, 512):
            logits, st = s.step(ids[:, c:c + 512], np.ones((1, c + ids[:, c:c + 512].shape[1]), np.int64), st)
        res["prefill_s"] = time.perf_counter() - t
    else:
        arrays = {}
        for spec in io.state_specs(s.cfg):
            shape = spec.concrete_shape(1, context)
            arrays[spec.past_name] = (rng.standard_normal(shape, dtype=np.float32) if spec.kind in ("key", "value")
                                      else np.zeros(shape, np.float32))
        st = s.state_from_numpy(arrays, context)
        del arrays
        logits = None
    res["rss_state_mb"] = _rss_mb()
    nxt = np.array([1])
    t = time.perf_counter()
    for _ in range(8):
        nxt = s.decode(nxt, st).argmax(-1)
    res["decode_tok_s"] = 8 / (time.perf_counter() - t)
    res["rss_after_decode_mb"] = _rss_mb()
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["state_bytes"] = state_bytes(s.cfg, context)
    return res


def cmd_measure(a: argparse.Namespace) -> None:
    path = Path(a.dir) / "measure.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    for model in MODELS:
        for ctx in a.contexts:
            for prefill in ((False, True) if ctx <= a.prefill_max else (False,)):
                key = f"{model}/{ctx}/{'prefill' if prefill else 'state'}"
                if key in results and not a.redo:
                    continue
                cmd = [sys.executable, __file__, "_once", str(Path(a.dir) / model), str(ctx), str(int(prefill))]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode:
                    print(f"[measure] {key}: failed\n{p.stderr[-2000:]}", file=sys.stderr)
                    continue
                results[key] = json.loads(p.stdout.strip().splitlines()[-1])
                r = results[key]
                print(f"[measure] {key}: loaded {r['rss_loaded_mb']:.0f} MB, with state {r['rss_state_mb']:.0f} MB, "
                      f"peak {r['peak_rss_mb']:.0f} MB, state {sum(r['state_bytes'].values()) / 2**20:.0f} MiB",
                      file=sys.stderr, flush=True)
                path.write_text(json.dumps(results, indent=2))


def cmd_report(a: argparse.Namespace) -> None:
    import numpy as np

    from granite_onnx.models.config import ATTENTION, preset

    results = json.loads((Path(a.dir) / "measure.json").read_text())
    contexts = sorted({int(k.split("/")[1]) for k in results})
    # Fit peak RSS = base_model + k · state bytes over both models (decode from a given state).
    fit = {}
    xs, ys = [], []
    for model in MODELS:
        pts = [(sum(results[f"{model}/{c}/state"]["state_bytes"].values()) / 2**20, results[f"{model}/{c}/state"]["peak_rss_mb"])
               for c in contexts if f"{model}/{c}/state" in results]
        if len(pts) >= 2:
            x, y = np.array(pts).T
            k, b = np.polyfit(x, y, 1)
            fit[model] = {"mb_per_state_mb": float(k), "base_mb": float(b)}
            xs += list(x)
            ys += list(y)
    print("| context | hybrid (1 attention + 3 mamba): state | peak RSS | all attention (4): state | peak RSS | "
          "RSS saved |\n|---|---|---|---|---|---|")
    for c in contexts:
        row = [f"{c:,}"]
        peaks = []
        for model in MODELS:
            r = results.get(f"{model}/{c}/state")
            if r is None:
                row += ["—", "—"]
                continue
            row += [f"{sum(r['state_bytes'].values()) / 2**20:,.1f} MiB", f"{r['peak_rss_mb']:,.0f} MB"]
            peaks.append(r["peak_rss_mb"])
        row.append(f"{100 * (1 - peaks[0] / peaks[1]):.0f} %" if len(peaks) == 2 else "—")
        print("| " + " | ".join(row) + " |")
    # 40 layers by formula: measured per-state-byte factor k and the int4 weights
    k = float(np.mean([f["mb_per_state_mb"] for f in fit.values()])) if fit else 2.0
    tiny = preset("granite-4.0-h-tiny")
    full_attn = dataclasses.replace(tiny, layer_types=(ATTENTION,) * tiny.num_layers)
    weights_mb = {m: c.num_parameters() * (0.5 + 4 / 32) / 2**20 for m, c in (("hybrid", tiny), ("attention", full_attn))}
    overhead = float(np.mean([f["base_mb"] for f in fit.values()])) - preset("tiny-4L").num_parameters() * (0.5 + 4 / 32) / 2**20 if fit else 0
    proj = {}
    print(f"\n40 layers (int4 block 32 weights; runtime base {overhead:,.0f} MB and {k:.2f} MB of RSS per MB of state, "
          "both fitted on the 4-layer measurements)\n")
    print("| context | granite-4.0-h-tiny: state | RSS | 40 × attention: state | RSS | RSS saved | state saved |\n"
          "|---|---|---|---|---|---|---|")
    for c in sorted(set(contexts) | {131072}):
        row, rss, st = [f"{c:,}"], [], []
        for m, cfg in (("hybrid", tiny), ("attention", full_attn)):
            sb = sum(state_bytes(cfg, c).values()) / 2**20
            r = weights_mb[m] + overhead + k * sb
            row += [f"{sb:,.0f} MiB", f"{r / 1024:,.2f} GB"]
            rss.append(r)
            st.append(sb)
        row += [f"{100 * (1 - rss[0] / rss[1]):.0f} %", f"{100 * (1 - st[0] / st[1]):.0f} %"]
        proj[c] = {"hybrid_mb": rss[0], "attention_mb": rss[1], "hybrid_state_mib": st[0], "attention_state_mib": st[1]}
        print("| " + " | ".join(row) + " |")
    (Path(a.dir) / "report.json").write_text(json.dumps({"fit": fit, "k": k, "overhead_mb": overhead,
                                                          "projection_40L": proj}, indent=2))
    if a.plot:
        _plot(results, contexts, proj, Path(a.plot))


def _plot(results: dict[str, Any], contexts: list[int], proj: dict[int, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for model, label, style in (("hybrid", "hybrid (1 of 4 layers attention)", "o-"),
                                ("attention", "every layer attention", "s--")):
        cs = [c for c in contexts if f"{model}/{c}/state" in results]
        ax1.plot(cs, [results[f"{model}/{c}/state"]["peak_rss_mb"] / 1024 for c in cs], style, label=label)
    ax1.set(xscale="log", xlabel="context (tokens)", ylabel="peak RSS (GB)",
            title="measured: Granite-Tiny widths, 4 layers, int4")
    ax1.legend()
    cs = sorted(proj)
    ax2.plot(cs, [proj[c]["hybrid_mb"] / 1024 for c in cs], "o-", label="granite-4.0-h-tiny (4 of 40 attention)")
    ax2.plot(cs, [proj[c]["attention_mb"] / 1024 for c in cs], "s--", label="40 attention layers, same widths")
    ax2.set(xscale="log", xlabel="context (tokens)", ylabel="RSS (GB)", title="projected: 40 layers, int4, batch 1")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"[report] plot → {out}", file=sys.stderr)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_once":
        print(json.dumps(_measure_once(sys.argv[2], int(sys.argv[3]), bool(int(sys.argv[4])))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    e = sub.add_parser("export")
    e.add_argument("--dir", required=True)
    e.add_argument("--quant", default="int4")
    e.set_defaults(fn=cmd_export)
    m = sub.add_parser("measure")
    m.add_argument("--dir", required=True)
    m.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    m.add_argument("--prefill-max", type=int, default=4096, help="also prefill real tokens up to this context")
    m.add_argument("--redo", action="store_true")
    m.set_defaults(fn=cmd_measure)
    r = sub.add_parser("report")
    r.add_argument("--dir", required=True)
    r.add_argument("--plot", help="write a PNG (needs matplotlib; not a granite-onnx dependency)")
    r.set_defaults(fn=cmd_report)
    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
