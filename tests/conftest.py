from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def test_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 'test' preset (seed 1) exported once per session, logits for every position."""
    from granite_onnx.export.exporter import ExportOptions, export

    out = tmp_path_factory.mktemp("models") / "test-all"
    export(preset_name="test", seed=1, out=out, options=ExportOptions(logits="all"))
    return out


@pytest.fixture(scope="session")
def test_model_last_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from granite_onnx.export.exporter import ExportOptions, export

    out = tmp_path_factory.mktemp("models") / "test-last"
    export(preset_name="test", seed=1, out=out, options=ExportOptions(logits="last"))
    return out


@pytest.fixture(scope="session")
def test_model_fused_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 'test' preset (seed 1) exported fused (ONNX Runtime kernels, shared K/V), logits of the last position."""
    from granite_onnx.export.exporter import ExportOptions, export

    out = tmp_path_factory.mktemp("models") / "test-fused"
    export(preset_name="test", seed=1, out=out, options=ExportOptions(logits="last", optimize=True))
    return out
