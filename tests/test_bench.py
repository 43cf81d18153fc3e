"""`granite-onnx bench` with a fused and a portable folder of one model and HF eager in one process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from granite_onnx.bench import HF_LABEL, runtime_labels
from granite_onnx.models.config import HybridConfig, preset
from granite_onnx.roofline import bytes_per_decode_step, prefill_flops


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "granite_onnx.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def fused_and_portable(test_model_fused_dir: Path, test_model_last_dir: Path) -> tuple[Path, Path]:
    """The session's 'test' model (seed 1), exported fused and portable."""
    assert json.loads((test_model_fused_dir / "granite_config.json").read_text())["graph"] == "fused"
    assert json.loads((test_model_last_dir / "granite_config.json").read_text())["graph"] == "portable"
    return test_model_fused_dir, test_model_last_dir


def test_bench_fused_portable_and_hf_side_by_side(fused_and_portable: tuple[Path, Path]) -> None:
    fused, portable = fused_and_portable
    r = run("bench", str(fused), str(portable), "--reference", "test", "--batch", "1", "--new-tokens", "4",
            "--prefill", "16", "--turns", "0", "--rounds", "2", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["rounds"] == 2 and "best of 2 rounds" in res["table"]
    print(res["table"])
    labels = ["fused", "portable"]
    assert res["runtimes"] == labels + [HF_LABEL]
    assert [(f["label"], f["graph"], f["dir"]) for f in res["folders"]] == [
        ("fused", "fused", str(fused)), ("portable", "portable", str(portable))]
    assert res["fused_vs_portable"] == {"fused": "fused", "portable": "portable"}
    assert res["reference"]["source"] == "test"

    (p,) = res["prefill"]
    assert p["tokens"] == 16 and all(p["s"][lab] > 0 for lab in res["runtimes"])
    assert set(p["vs_hf"]) == set(labels) and all(v > 0 for v in p["vs_hf"].values())
    assert p["fused_over_portable"] == pytest.approx(p["s"]["portable"] / p["s"]["fused"])

    (d,) = res["decode"]
    assert d["batch"] == 1 and set(d["runtimes"]) == set(res["runtimes"])
    for lab, row in d["runtimes"].items():
        assert row["tok_s"] > 0 and row["ttft_s"] > 0 and row["gb_s"] > 0, (lab, row)
        assert (row["outside_run_share"] is None) == (lab == HF_LABEL)
    tok = {lab: row["tok_s"] for lab, row in d["runtimes"].items()}
    assert d["vs_hf"] == pytest.approx({lab: tok[lab] / tok[HF_LABEL] for lab in labels})
    assert d["fused_over_portable"] == pytest.approx(tok["fused"] / tok["portable"])

    assert set(res["memory"]) == set(res["runtimes"]) and res["peak_rss_mb"] > 0
    if Path("/proc/self/clear_refs").exists():
        assert all(m["peak_growth_mb"] is not None for m in res["memory"].values())
    assert "multi_turn" not in res and res["machine_bandwidth_gb_s"] > 0
    assert "fused/portable" in res["table"] and HF_LABEL in res["table"]

    # the roofline: every rate set against what ONNX Runtime's own MatMul reached on this machine
    roof = res["roofline"]
    assert roof["gemm_gflop_s"] > 1 and roof["gemv_gb_s"] and all(v > 0.1 for v in roof["gemv_gb_s"].values())
    hf_step_ms = 1e3 / tok[HF_LABEL]
    for lab, row in d["runtimes"].items():
        assert row["of_roofline"] == pytest.approx(row["gb_s"] / row["roofline_gb_s"])
        assert row["floor_ms"] == pytest.approx(bytes_per_decode_step(res_cfg(res), 1) / row["roofline_gb_s"] / 1e6)
    assert d["ceiling_vs_hf"] == pytest.approx({lab: hf_step_ms / d["runtimes"][lab]["floor_ms"] for lab in labels})
    assert p["gflop"] == pytest.approx(prefill_flops(res_cfg(res), 16) / 1e9)
    assert p["floor_s"] == pytest.approx(p["gflop"] / roof["gemm_gflop_s"])
    assert p["ceiling_vs_hf"] == pytest.approx(p["s"][HF_LABEL] / p["floor_s"])
    assert p["gflop_s"] == pytest.approx({lab: p["gflop"] / s for lab, s in p["s"].items()})
    assert "roofline" in res["table"] and "ceiling ×HF" in res["table"]


def test_a_roofline_that_cannot_run_keeps_the_timings(fused_and_portable: tuple[Path, Path]) -> None:
    """The roofline writes its weights to a temporary folder; where it cannot (here: a temp dir that does
    not exist, as a full disk would), bench warns, drops the roofline and still reports every timing."""
    fused, _ = fused_and_portable
    code = ("import sys, tempfile; tempfile.tempdir = '/nonexistent/granite-roofline'; "
            "from granite_onnx.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "bench", str(fused), "--no-hf", "--batch", "1", "2",
                        "--new-tokens", "2", "--prefill", "8", "--turns", "0", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    print(r.stderr.splitlines()[-3:])
    assert "roofline skipped" in r.stderr and "Traceback" not in r.stderr
    assert res["roofline"]["error"].startswith("FileNotFoundError") and "roofline skipped" in res["table"]
    assert res["prefill"][0]["s"]["fused"] > 0 and "floor_s" not in res["prefill"][0]
    assert [d["batch"] for d in res["decode"]] == [1, 2]
    assert all(d["runtimes"]["fused"]["tok_s"] > 0 for d in res["decode"])
    assert "roofline_gb_s" not in res["decode"][1]["runtimes"]["fused"]


def res_cfg(res: dict) -> HybridConfig:
    assert res["config"] == "test"
    return preset("test")


def test_bench_without_roofline(fused_and_portable: tuple[Path, Path]) -> None:
    fused, _ = fused_and_portable
    r = run("bench", str(fused), "--no-hf", "--batch", "1", "--new-tokens", "2", "--prefill", "8", "--turns", "0",
            "--no-roofline", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert "roofline" not in res and "roofline_gb_s" not in res["decode"][0]["runtimes"]["fused"]
    assert "floor_s" not in res["prefill"][0] and "ceiling" not in res["table"]


def test_bench_refuses_folders_of_different_models(test_model_last_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(test_model_last_dir, other)
    meta = json.loads((other / "granite_config.json").read_text())
    meta["config"]["vocab_size"] += 1
    (other / "granite_config.json").write_text(json.dumps(meta))
    r = run("bench", str(test_model_last_dir), str(other), "--reference", "test")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "different models" in r.stderr and "vocab_size" in r.stderr and "Traceback" not in r.stderr

    r = run("bench", str(test_model_last_dir), str(test_model_last_dir), "--no-hf")
    assert r.returncode == 2 and "given twice" in r.stderr


def test_labels_add_the_folder_name_where_graph_kinds_repeat() -> None:
    dirs = [Path("/a/x-fused"), Path("/a/x-int4"), Path("/a/x-portable"), Path("/b/x-fused")]
    assert runtime_labels(dirs[:3], ["fused", "fused", "portable"]) == ["fused (x-fused)", "fused (x-int4)",
                                                                       "portable"]
    assert runtime_labels([dirs[0], dirs[3]], ["fused", "fused"]) == ["fused (/a/x-fused)", "fused (/b/x-fused)"]
