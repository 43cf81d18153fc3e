#!/usr/bin/env python
"""Memory against context length: the hybrid vs the same widths with every layer attention (BENCHMARKS.md).

    python tools/memory_context.py export  --dir /tmp/memctx                  # tiny-4L + all-attention, int4
    python tools/memory_context.py measure --dir /tmp/memctx --contexts 1024 4096 16384 65536
    python tools/memory_context.py report  --dir /tmp/memctx --plot docs/memory_vs_context.png

`measure` runs each (model, context) in a fresh process: it loads the model, gives it a state holding
`context` tokens of K/V (zeros: memory does not depend on the values) and the recurrent state, and
decodes 8 tokens; it records the RSS after loading, the peak RSS, and the state's bytes. (The state is
staged in calloc'd zeros, which never become resident: the figures are the runtime's own.) For contexts up
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
        # np.zeros is calloc'd: its pages are never resident, so staging the state costs no RSS, and the
        # figures are the runtime's own (memory does not depend on the values).
        arrays = {spec.past_name: np.zeros(spec.concrete_shape(1, context), np.float32)
                  for spec in io.state_specs(s.cfg)}
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
    models = dict(m.split("=", 1) for m in a.model) if a.model else {m: str(Path(a.dir) / m) for m in MODELS}
    for model, folder in models.items():
        for ctx in a.contexts:
            for prefill in ((False, True) if ctx <= a.prefill_max else (False,)):
                key = f"{model}/{ctx}/{'prefill' if prefill else 'state'}"
                if key in results and not a.redo:
                    continue
                cmd = [sys.executable, __file__, "_once", folder, str(ctx), str(int(prefill))]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode:
                    print(f"[measure] {key}: failed\n{p.stderr[-2000:]}", file=sys.stderr)
                    continue
                results[key] = json.loads(p.stdout.strip().splitlines()[-1])
                results.setdefault("_folders", {})[model] = folder
                r = results[key]
                print(f"[measure] {key}: loaded {r['rss_loaded_mb']:.0f} MiB, with state {r['rss_state_mb']:.0f} MiB, "
                      f"peak {r['peak_rss_mb']:.0f} MiB, state {sum(r['state_bytes'].values()) / 2**20:.0f} MiB",
                      file=sys.stderr, flush=True)
                path.write_text(json.dumps(results, indent=2))


def _model_bytes(folder: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.name.startswith("model.onnx"))


def cmd_report(a: argparse.Namespace) -> None:
    import numpy as np

    from granite_onnx.models.config import ATTENTION, preset

    results = json.loads((Path(a.dir) / "measure.json").read_text())
    folders = results.pop("_folders", {})
    folders = {m: folders.get(m, str(Path(a.dir) / m)) for m in {k.split("/")[0] for k in results}}
    contexts = sorted({int(k.split("/")[1]) for k in results if k.split("/")[0] in MODELS})

    def peak(model: str, c: int) -> float | None:
        r = results.get(f"{model}/{c}/state")
        return None if r is None else r["peak_rss_mb"]

    # 1. Fit the 4-layer measurements: peak RSS = model file + c + k · state.
    fit = {}
    for model in MODELS:
        pts = [(sum(results[f"{model}/{c}/state"]["state_bytes"].values()) / 2**20, peak(model, c))
               for c in contexts if peak(model, c) is not None]
        x, y = np.array(pts).T
        k, base = np.polyfit(x, y, 1)
        fit[model] = {"k": float(k), "base_mb": float(base), "file_mb": _model_bytes(folders[model]) / 2**20}
    k = float(np.mean([f["k"] for f in fit.values()]))
    c = float(np.mean([f["base_mb"] - f["file_mb"] for f in fit.values()]))
    print("Measured, Granite-Tiny widths, 4 layers, int4 (peak RSS of a fresh process that decodes 8 tokens "
          "after a state of `context` tokens):\n")
    print("| context | hybrid (1 attention + 3 Mamba): state | peak RSS | 4 × attention: state | peak RSS | RSS saved |"
          "\n|---|---|---|---|---|---|")
    for ctx in contexts:
        row, peaks = [f"{ctx:,}"], []
        for model in MODELS:
            r = results[f"{model}/{ctx}/state"]
            row += [f"{sum(r['state_bytes'].values()) / 2**20:,.1f} MiB", f"{r['peak_rss_mb']:,.0f} MiB"]
            peaks.append(r["peak_rss_mb"])
        row.append(f"{100 * (1 - peaks[0] / peaks[1]):.0f} %")
        print("| " + " | ".join(row) + " |")
    per_model = ", ".join(f"{m} k={f['k']:.2f}" for m, f in fit.items())
    print(f"\nFit: peak RSS = model file + {c:,.0f} MiB + {k:.2f} × state (per model: {per_model}).\n")

    # 2. Project 40 layers by that formula; check it against the measured 40-layer model if there is one.
    tiny = preset("granite-4.0-h-tiny")
    attn40 = dataclasses.replace(tiny, layer_types=(ATTENTION,) * tiny.num_layers)
    measured_40 = "h-tiny-40L" if any(key.startswith("h-tiny-40L/") for key in results) else None
    w_tiny = (_model_bytes(folders[measured_40]) / 2**20 if measured_40 else
              tiny.num_parameters() * (0.5 + 4 / 32) / 2**20)
    w_attn = w_tiny * attn40.num_parameters() / tiny.num_parameters()  # int4 bytes ∝ parameters
    proj = {}
    print("| context | granite-4.0-h-tiny (4 of 40 attention): state | RSS projected | RSS measured | "
          "40 × attention: state | RSS projected | RSS saved | state saved |\n|---|---|---|---|---|---|---|---|")
    for ctx in sorted(set(contexts) | {131072}):
        s_h, s_a = (sum(state_bytes(cfg, ctx).values()) / 2**20 for cfg in (tiny, attn40))
        r_h, r_a = w_tiny + c + k * s_h, w_attn + c + k * s_a
        meas = peak(measured_40, ctx) if measured_40 else None
        proj[ctx] = {"hybrid_mb": r_h, "attention_mb": r_a, "hybrid_state_mib": s_h, "attention_state_mib": s_a,
                     "hybrid_measured_mb": meas}
        shown = "—" if meas is None else f"{meas / 1024:,.2f} GiB"
        print(f"| {ctx:,} | {s_h:,.0f} MiB | {r_h / 1024:,.2f} GiB | {shown} "
              f"| {s_a:,.0f} MiB | {r_a / 1024:,.2f} GiB | {100 * (1 - r_h / r_a):.0f} % | {100 * (1 - s_h / s_a):.0f} % |")
    (Path(a.dir) / "report.json").write_text(json.dumps({"fit": fit, "k": k, "overhead_mb": c,
                                                          "weights_mb": {"hybrid": w_tiny, "attention": w_attn},
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
    ax1.set(xscale="log", xlabel="context (tokens)", ylabel="peak RSS (GiB)",
            title="measured: Granite-Tiny widths, 4 layers, int4")
    ax1.legend()
    cs = sorted(proj)
    ax2.plot(cs, [proj[c]["hybrid_mb"] / 1024 for c in cs], "o-", label="granite-4.0-h-tiny (4 of 40 attention)")
    ax2.plot(cs, [proj[c]["attention_mb"] / 1024 for c in cs], "s--", label="40 attention layers, same widths")
    meas = [(c, proj[c]["hybrid_measured_mb"]) for c in cs if proj[c].get("hybrid_measured_mb")]
    if meas:
        ax2.plot([c for c, _ in meas], [m / 1024 for _, m in meas], "kx", markersize=9,
                 label="granite-4.0-h-tiny int4, measured")
    ax2.set(xscale="log", xlabel="context (tokens)", ylabel="RSS (GiB)", title="40 layers, int4, batch 1: formula (lines), measured (×)")
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
    m.add_argument("--model", action="append", help="NAME=DIR to measure instead of DIR/hybrid and DIR/attention "
                   "(e.g. h-tiny-40L=/tmp/h-tiny-int4: checks the 40-layer projection)")
    m.set_defaults(fn=cmd_measure)
    r = sub.add_parser("report")
    r.add_argument("--dir", required=True)
    r.add_argument("--plot", help="write a PNG (needs matplotlib; not a granite-onnx dependency)")
    r.set_defaults(fn=cmd_report)
    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
