#!/usr/bin/env python
"""Where a decode step goes with ONNX Runtime's own kernels: each node's kernel timed alone, the executor,
the Python side, against the step as the runtime runs it (BENCHMARKS.md, issue 3).

    python tools/step_budget.py FOLDER [--batch 1] [--threads 2] [--context 32] [--samples 15] [--json]

ONNX Runtime's profiler adds ~10 µs to every node it times, which at a 1–2 ms step of 250 nodes buries the
small ones. This tool times every node of the graph ONNX Runtime actually runs (its optimised graph,
saved once) in a session of its own, on the values of one real decode step, and subtracts the cost of an
empty run. Between two timed runs it streams a working set the size of the step's weights through
ONNX Runtime's MatMul on the same thread pool, so a node finds its weights where a real step would (out of
the private caches; in the last-level cache only if the step's weights fit there) and the pool's workers
awake. (An empty run right after that streaming costs 10–45 µs against ~5 µs warm — ONNX Runtime's own run
machinery gone cold — which is why it is subtracted as measured the same way.) It reports:

- `kernels`: the sum of those per-node times, by operator;
- `executor`: what ONNX Runtime's sequential executor adds per node (a chain of cheap nodes, per node,
  times the node count);
- `python`: the time a step spends outside `run_with_iobinding` (binding, bookkeeping);
- `step`: the runtime's decode step, timed as `granite-onnx bench` times it (the median of 64 steps; the
  best of 3 rounds, in a process of its own), and the `unexplained` remainder, step − (kernels + executor +
  python).

What it is good for: which kernels a step's time is in, and what the step would still cost if a rewrite
kept those kernels (a kernel kept costs what it costs here). How far to trust it: the large kernels
(MatMul, Gemm, MoE, LinearAttention) repeat within ~15 % from run to run; a node of a few µs can read 0 in
one run and 2 µs in the next (whether the pool's second worker was still spinning); and the step itself
moves with the machine's neighbours (±20 % within an hour on a shared VM), which the `unexplained` line
absorbs — compare it across runs taken close together. Torch-free.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _session_options(ort: Any, optimize: bool) -> Any:
    """Options of every session this tool makes: on the process's global thread pool (see `budget`)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.use_per_session_threads = False
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return so


def runtime_step(folder: Path, batch: int, threads: int, context: int) -> tuple[float, float]:
    """(seconds per decode step, seconds of it outside run_with_iobinding), timed as `granite-onnx bench`
    times it (`decode_loop_timed`: the median step of 64): the best of 3 rounds."""
    from granite_onnx.bench import decode_loop_timed
    from granite_onnx.runtime.generate import Model

    m = Model.load(folder, threads=threads)
    ids = np.random.default_rng(0).integers(3, m.cfg.vocab_size, (batch, context))
    decode_loop_timed(m, ids[:, :8], 4)  # warm-up: binding caches, logits buffer
    best = min((decode_loop_timed(m, ids, 64) for _ in range(3)), key=lambda r: r["ours_step_p50_ms"])
    return best["ours_step_p50_ms"] / 1e3, best["outside_run_us"] / 1e6


def optimized_graph(ort: Any, folder: Path, tmp: Path) -> Path:
    """The graph ONNX Runtime runs for this folder (all its optimisations), saved with external weights."""
    so = _session_options(ort, optimize=True)
    so.optimized_model_filepath = str(tmp / "opt.onnx")
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    return tmp / "opt.onnx"


def step_values(ort: Any, model: Any, tmp: Path, batch: int, context: int, vocab: int) -> dict[str, np.ndarray]:
    """Every tensor of one decode step after a `context`-token prefill: graph inputs and node outputs."""
    import onnx

    cap = onnx.ModelProto()
    cap.CopyFrom(model)
    have = {o.name for o in cap.graph.output}
    for n in cap.graph.node:
        for o in n.output:
            if o and o not in have:
                cap.graph.output.append(onnx.ValueInfoProto(name=o))
                have.add(o)
    onnx.save(cap, str(tmp / "capture.onnx"))
    so = _session_options(ort, optimize=False)
    sess = ort.InferenceSession(str(tmp / "capture.onnx"), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(3, vocab, (batch, context)).astype(np.int64),
             "attention_mask": np.ones((batch, context), np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_"):
            shape = [batch if d == "batch" else 0 if isinstance(d, str) or d is None else d for d in i.shape]
            feeds[i.name] = np.zeros(shape, np.float32)
    names = [o.name for o in sess.get_outputs()]
    vals = dict(zip(names, sess.run(None, feeds)))
    step = {"input_ids": vals["logits"][:, -1].argmax(-1)[:, None].astype(np.int64),
            "attention_mask": np.ones((batch, context + 1), np.int64)}
    for k in feeds:
        if k.startswith("past_"):
            step[k] = vals[k.replace("past_key_values", "present")]
    vals = dict(zip(names, sess.run(None, step)))
    vals.update(step)
    return vals


class Evictor:
    """Streams `nbytes` of weights through ONNX Runtime's MatMul at batch 1 on each call."""

    def __init__(self, ort: Any, tmp: Path, nbytes: float, hidden: int) -> None:
        from granite_onnx import roofline

        (tmp / "evict").mkdir()
        path = roofline.matmul_model(tmp / "evict", 1, hidden, roofline.gemv_widths(nbytes, hidden))
        so = _session_options(ort, optimize=True)
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.feed = {"x": np.full((1, hidden), 0.5, np.float32)}

    def __call__(self) -> None:
        self.sess.run(None, self.feed)


def time_node(ort: Any, node: Any, model: Any, inits: dict[str, Any], vals: dict[str, np.ndarray], base: Path,
              samples: int, evict: Evictor, in_place: dict[str, str] | None = None) -> float:
    """Median seconds of one run of a one-node model holding `node` (its weights as initializers).

    `in_place`: past state name → present name of the states the runtime updates in place; a node that
    reads one and writes the other gets one buffer bound as both, as the runtime binds it."""
    import onnx
    from onnx import helper, numpy_helper

    inputs, weights, seen = [], [], set()
    for x in node.input:
        if not x or x in seen:
            continue
        seen.add(x)
        if x in inits:
            weights.append(numpy_helper.from_array(numpy_helper.to_array(inits[x], base_dir=str(base)), x))
        else:
            v = vals[x]
            inputs.append(helper.make_tensor_value_info(x, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape))
    graph = helper.make_graph([node], "one", inputs, [onnx.ValueInfoProto(name=o) for o in node.output if o], weights)
    one = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    so = _session_options(ort, optimize=False)
    sess = ort.InferenceSession(one.SerializeToString(), so, providers=["CPUExecutionProvider"])
    binding = sess.io_binding()
    shared = {}  # present name → the OrtValue bound as its past too
    for i in inputs:
        present = (in_place or {}).get(i.name)
        if present is not None and present in node.output:
            shared[present] = ort.OrtValue.ortvalue_from_numpy(np.array(vals[i.name], copy=True))
            binding.bind_ortvalue_input(i.name, shared[present])
        else:
            binding.bind_cpu_input(i.name, vals[i.name])
    for o in sess.get_outputs():
        if o.name in shared:
            binding.bind_ortvalue_output(o.name, shared[o.name])
        else:
            binding.bind_output(o.name)
    sess.run_with_iobinding(binding)  # prepacking, first touch
    times = []
    for _ in range(samples):
        evict()
        t = time.perf_counter()
        sess.run_with_iobinding(binding)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def executor_per_node(ort: Any, hidden: int, nodes: int = 250) -> float:
    """Seconds ONNX Runtime's executor adds per node: a chain of `nodes` Adds on [1, hidden] against one Add."""
    from onnx import TensorProto, helper, numpy_helper

    def chain(n: int) -> float:
        ns = [helper.make_node("Add", ["x" if i == 0 else f"a{i - 1}", "c"], [f"a{i}" if i < n - 1 else "y"])
              for i in range(n)]
        g = helper.make_graph(ns, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, hidden])],
                              [numpy_helper.from_array(np.full((1, hidden), 1e-3, np.float32), "c")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        so = _session_options(ort, optimize=False)
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        feed = {"x": np.ones((1, hidden), np.float32)}
        for _ in range(20):
            sess.run(None, feed)
        ts = []
        for _ in range(300):
            t = time.perf_counter()
            sess.run(None, feed)
            ts.append(time.perf_counter() - t)
        return float(np.median(ts))

    return (chain(nodes) - chain(1)) / (nodes - 1)


def budget(folder: Path, batch: int = 1, threads: int = 2, context: int = 32, samples: int = 15,
           progress: Any = None) -> dict[str, Any]:
    import onnx

    from granite_onnx import roofline
    from granite_onnx.export import io
    from granite_onnx.runtime.session import import_ort, read_folder_config

    say = progress or (lambda s: None)
    say("timing the runtime's decode step (in a process of its own)")
    done = subprocess.run([sys.executable, __file__, str(folder), "--batch", str(batch), "--threads", str(threads),
                           "--context", str(context), "--step-only"], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"timing the decode step failed: {done.stderr.strip()[-2000:]}")
    step_s, python_s = json.loads(done.stdout)
    ort = import_ort()
    # one thread pool for the evicting MatMuls and the node timed after them: the node then finds the
    # pool's workers awake, as it does inside a step (separate pools: every timed run woke a sleeping one)
    ort.capi.onnxruntime_pybind11_state.set_global_thread_pool_sizes(threads, 1)
    cfg, meta = read_folder_config(folder)
    # as the runtime on the CPU: the folder's in-place conv/SSM states get one buffer as past and present
    in_place = {s.past_name: s.present_name for s in io.state_specs(cfg)
                if s.kind in ("conv_state", "recurrent_state") and meta.get("recurrent_state") == "inplace"}
    with tempfile.TemporaryDirectory(prefix="granite-step-budget-") as t:
        tmp = Path(t)
        say("saving ONNX Runtime's optimised graph")
        model = onnx.load(str(optimized_graph(ort, folder, tmp)), load_external_data=False)
        vals = step_values(ort, model, tmp, batch, context, cfg.vocab_size)
        inits = {i.name: i for i in model.graph.initializer}
        step_bytes = roofline.bytes_per_decode_step(cfg, batch)
        evict = Evictor(ort, tmp, step_bytes, cfg.hidden_size)
        empty = onnx.helper.make_node("Identity", ["input_ids"], ["_empty"])
        empty_s = time_node(ort, empty, model, inits, vals, tmp, samples, evict)
        per_op: dict[str, float] = collections.defaultdict(float)
        count: collections.Counter[str] = collections.Counter()
        nodes = list(model.graph.node)
        for i, node in enumerate(nodes):
            if i % 25 == 0:
                say(f"timing node {i + 1}/{len(nodes)} alone")
            s = time_node(ort, node, model, inits, vals, tmp, samples, evict, in_place)
            per_op[node.op_type] += max(0.0, s - empty_s)
            count[node.op_type] += 1
    exec_s = executor_per_node(ort, cfg.hidden_size) * len(nodes)
    kernels = sum(per_op.values())
    total = kernels + exec_s + python_s
    return {
        "folder": str(folder), "batch": batch, "threads": threads, "context": context, "nodes": len(nodes),
        "step_weight_bytes": step_bytes,
        "ops": {op: {"nodes": count[op], "us": per_op[op] * 1e6}
                for op in sorted(per_op, key=lambda k: -per_op[k])},
        "kernels_us": kernels * 1e6, "executor_us": exec_s * 1e6, "python_us": python_s * 1e6,
        "empty_run_us": empty_s * 1e6, "sum_us": total * 1e6, "step_us": step_s * 1e6,
        "unexplained_us": (step_s - total) * 1e6,
    }


def render(r: dict[str, Any]) -> str:
    step = r["step_us"]
    lines = [f"{r['folder']}: batch {r['batch']}, {r['threads']} threads, {r['nodes']} nodes in ONNX Runtime's "
             f"graph, {r['step_weight_bytes'] / 1e6:.1f} MB of weights a step",
             f"{'':34s} {'nodes':>5s} {'µs':>8s} {'of step':>8s}"]
    for op, v in r["ops"].items():
        if v["us"] >= 0.5:
            lines.append(f"{op:34s} {v['nodes']:5d} {v['us']:8.1f} {100 * v['us'] / step:7.1f}%")
    small = [v for v in r["ops"].values() if v["us"] < 0.5]
    if small:
        lines.append(f"{'(other ops, < 0.5 µs each kind)':34s} {sum(v['nodes'] for v in small):5d} "
                     f"{sum(v['us'] for v in small):8.1f}")
    for key, label in (("kernels_us", "kernels, each timed alone"), ("executor_us", "executor (per node × nodes)"),
                       ("python_us", "Python, outside run"), ("sum_us", "sum"), ("step_us", "decode step, measured"),
                       ("unexplained_us", "unexplained")):
        lines.append(f"{label:34s} {'':5s} {r[key]:8.1f} {100 * r[key] / step:7.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="an exported model folder (fused or portable)")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    ap.add_argument("--context", type=int, default=32, help="tokens prefilled before the step (default 32)")
    ap.add_argument("--samples", type=int, default=15, help="timed runs per node; the median is kept (default 15)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--step-only", action="store_true", help=argparse.SUPPRESS)  # the runtime's step, as JSON
    a = ap.parse_args(argv)
    if not (a.folder / "model.onnx").is_file():
        print(f"error: {a.folder} has no model.onnx; export one with `granite-onnx export`", file=sys.stderr)
        return 2
    if a.batch < 1 or a.threads < 1 or a.context < 1 or a.samples < 1:
        print("error: --batch, --threads, --context and --samples must be at least 1", file=sys.stderr)
        return 2
    if a.step_only:  # its own process: the runtime keeps per-session threads, the budget a global pool
        print(json.dumps(runtime_step(a.folder, a.batch, a.threads, a.context)))
        return 0
    r = budget(a.folder, a.batch, a.threads, a.context, a.samples,
               progress=lambda s: print(f"[step-budget] {s}", file=sys.stderr, flush=True))
    print(json.dumps(r, indent=1) if a.json else render(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
