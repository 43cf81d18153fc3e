"""`granite-onnx optimize IN_DIR OUT_DIR`: fuse a portable model folder into ONNX Runtime kernels.

The output folder is written atomically (hidden sibling, renamed when complete) with the fused
model.onnx + model.onnx.data and the other files of the input folder; export_report.json records the
fusion counts and the op histograms before and after.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import onnx

from granite_onnx.export.exporter import (
    GRANITE_CONFIG,
    MODEL_FILE,
    REPORT,
    op_histogram,
    state_layout,
)
from granite_onnx.models.config import HybridConfig
from granite_onnx.export.folder import ExportError, atomic_folder

_COPY_SKIP = {MODEL_FILE, "model.onnx.data"}


def optimize_folder(in_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    from granite_onnx.export.fusions import fuse_model_file

    src, out = Path(in_dir), Path(out_dir)
    if not (src / MODEL_FILE).exists() or not (src / GRANITE_CONFIG).exists():
        raise ExportError(f"{src} is not a granite-onnx model folder (no {MODEL_FILE}/{GRANITE_CONFIG}); "
                          "export one with `granite-onnx export --portable`")
    meta = json.loads((src / GRANITE_CONFIG).read_text())
    if meta.get("graph") == "fused":
        raise ExportError(f"{src} is already fused; optimize a portable folder")
    with atomic_folder(out, overwrite=overwrite) as tmp:
        t = time.perf_counter()
        before = op_histogram(onnx.load(str(src / MODEL_FILE), load_external_data=False))
        counts = fuse_model_file(src / MODEL_FILE, tmp / MODEL_FILE)
        for f in src.iterdir():
            if f.name not in _COPY_SKIP and f.is_file():
                shutil.copy2(f, tmp / f.name)
        meta["graph"] = "fused"
        graph = onnx.load(str(tmp / MODEL_FILE), load_external_data=False)  # the fused graph, no weights
        meta.update(state_layout(HybridConfig.from_json_dict(meta["config"]), counts, graph))
        (tmp / GRANITE_CONFIG).write_text(json.dumps(meta, indent=2))
        report = json.loads((src / REPORT).read_text()) if (src / REPORT).exists() else {}
        report.update({"graph": "fused", "fusion_counts": counts, "op_histogram_portable": before,
                       "op_histogram": op_histogram(graph)})
        report.setdefault("timings_s", {})["fuse_s"] = round(time.perf_counter() - t, 3)
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
    return report
