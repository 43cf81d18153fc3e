"""tools/step_budget.py: every node of ONNX Runtime's graph timed alone, on a real fused folder.

Run in a subprocess: the tool puts ONNX Runtime on a process-wide thread pool, which every later session
of that process would then have to use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "step_budget.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=600)


def test_budget_of_a_fused_step(test_model_fused_dir: Path) -> None:
    import onnx

    done = _run(str(test_model_fused_dir), "--batch", "2", "--samples", "5", "--json")
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    print({k: v for k, v in r.items() if k != "ops"})
    for op, v in r["ops"].items():
        print(f"{op:34s} {v['nodes']:4d} {v['us']:8.1f} µs")
    # every node of ONNX Runtime's graph was timed, and that graph is the fused one (its kernels, not the scan)
    assert sum(v["nodes"] for v in r["ops"].values()) == r["nodes"] > 0
    graph = onnx.load(str(test_model_fused_dir / "model.onnx"), load_external_data=False).graph
    fused_ops = {n.op_type for n in graph.node}
    for op in ("MoE", "LinearAttention", "CausalConvWithState", "GroupQueryAttention"):
        assert op in fused_ops and op in r["ops"], op
    assert "Scan" not in r["ops"] and "Loop" not in r["ops"]
    assert all(v["us"] >= 0 for v in r["ops"].values())
    # the heaviest kernel costs something measurable; the parts add up to the sum, the remainder to the step
    assert r["ops"]["MoE"]["us"] > 0 and r["kernels_us"] >= r["ops"]["MoE"]["us"]
    assert r["executor_us"] > 0 and r["python_us"] > 0 and r["step_us"] > 0
    assert abs(r["sum_us"] - (r["kernels_us"] + r["executor_us"] + r["python_us"])) < 1e-6 * r["sum_us"] + 1e-9
    assert abs(r["unexplained_us"] - (r["step_us"] - r["sum_us"])) < 1e-6 * r["step_us"] + 1e-9
    assert r["batch"] == 2 and r["step_weight_bytes"] > 0


def test_table_and_bad_input(test_model_fused_dir: Path, tmp_path: Path) -> None:
    done = _run(str(test_model_fused_dir), "--samples", "1")
    assert done.returncode == 0, done.stderr
    print(done.stdout)
    assert "kernels, each timed alone" in done.stdout and "decode step, measured" in done.stdout
    assert "[step-budget]" in done.stderr  # progress goes to stderr, the table to stdout
    missing = _run(str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no model.onnx" in missing.stderr and "granite-onnx export" in missing.stderr
    bad = _run(str(test_model_fused_dir), "--batch", "0")
    assert bad.returncode == 2 and "at least 1" in bad.stderr
