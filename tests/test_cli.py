"""The CLI as a user runs it: exit codes and messages for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "granite_onnx.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_help() -> None:
    r = run("--help")
    assert r.returncode == 0 and "export" in r.stdout and "validate" in r.stdout


def test_generate_ids_json(test_model_last_dir: Path) -> None:
    r = run("generate", str(test_model_last_dir), "--ids", "5,6,7", "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) <= 4 and out["prompt_tokens"] == 3


@pytest.mark.parametrize("args,needle", [
    (["--ids", "5,99999"], "outside the vocabulary"),
    (["--ids", "5,6", "--max-new-tokens", "0"], "max_new_tokens"),
    (["--ids", "5,6", "--temperature", "-1"], "temperature"),
    (["--ids", "5,6", "--top-p", "1.5"], "top_p"),
    (["--prompt", "hello"], "no tokenizer"),
])
def test_generate_bad_input(test_model_last_dir: Path, args: list[str], needle: str) -> None:
    r = run("generate", str(test_model_last_dir), *args)
    print(r.stderr)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_data_file(tmp_path: Path, test_model_last_dir: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(test_model_last_dir, d)
    (d / "model.onnx.data").unlink()
    r = run("generate", str(d), "--ids", "1,2")
    assert r.returncode == 2 and "model.onnx.data" in r.stderr


def test_export_existing_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    r = run("export", "--preset", "test", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "--overwrite" in r.stderr


def test_export_unknown_preset(tmp_path: Path) -> None:
    r = run("export", "--preset", "nope", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unknown preset" in r.stderr and not (tmp_path / "o").exists()


def test_generate_progress_per_chunk(test_model_last_dir: Path) -> None:
    r = run("generate", str(test_model_last_dir), "--ids", "5,6,7,8,9", "--chunk-size", "2", "--progress",
            "--max-new-tokens", "2", "--no-spin")
    assert r.returncode == 0, r.stderr
    lines = [s for s in r.stderr.splitlines() if s.startswith("[prefill]")]
    assert [s.split()[1] for s in lines] == ["2/5", "4/5", "5/5"]


def test_chat_needs_a_tokenizer(test_model_last_dir: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "granite_onnx.cli", "chat", str(test_model_last_dir)], input="hi\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no tokenizer.json" in r.stderr and "Traceback" not in r.stderr
