"""Export folder format, atomic writes and bad input (rung: ORT portable vs torch, recorded in the report)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from granite_onnx.export import io
from granite_onnx.export.exporter import ExportError, ExportOptions, export
from granite_onnx.models.config import ConfigError, HybridConfig, preset
from granite_onnx.models.weights import RandomWeights, WeightsError, save_hf_folder


def test_folder_contents_and_contract(test_model_dir: Path) -> None:
    names = {p.name for p in test_model_dir.iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "granite_config.json", "export_report.json"} <= names
    assert not any(n.startswith(".") for n in names)
    m = onnx.load(str(test_model_dir / "model.onnx"), load_external_data=False)
    cfg = preset("test")
    assert [i.name for i in m.graph.input] == io.input_names(cfg)
    assert [o.name for o in m.graph.output] == io.output_names(cfg)
    # standard ops only, plus our local functions (whose bodies are standard ops)
    domains = {n.domain for n in m.graph.node} - {"", "granite_onnx"}
    assert not domains, domains
    assert {f.name for f in m.functions} == {"CausalConv1d", "SSMScan", "MoE", "Attention"}
    for f in m.functions:
        assert {n.domain for n in f.node} <= {""}
    assert not any(n.op_type in ("Scan", "Loop") for n in m.graph.node)
    # hierarchical node names
    assert any(n.name.startswith("/model/layers.1/") for n in m.graph.node)
    rep = json.loads((test_model_dir / "export_report.json").read_text())
    print("parity", rep["parity"]["max_abs_diff"])
    assert rep["parity"]["worst"] < 1e-4
    assert rep["op_histogram"]["granite_onnx.SSMScan"] == 3
    assert rep["peak_rss_mb"] > 0 and rep["timings_s"]["total_s"] > 0
    g = json.loads((test_model_dir / "genai_config.json").read_text())
    dec = g["model"]["decoder"]
    assert dec["inputs"]["past_conv_names"] == io.PAST_CONV
    assert dec["outputs"]["present_recurrent_names"] == io.PRESENT_RECURRENT
    assert g["model"]["type"] == "granitemoehybrid"


def test_dynamic_dims(test_model_dir: Path) -> None:
    m = onnx.load(str(test_model_dir / "model.onnx"), load_external_data=False)
    ids = m.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in ids] == [io.BATCH, io.SEQUENCE]


def test_existing_output_needs_overwrite(tmp_path: Path, test_model_dir: Path) -> None:
    out = tmp_path / "m"
    shutil.copytree(test_model_dir, out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ExportError, match="--overwrite"):
        export(preset_name="test", out=out)
    assert sorted(p.name for p in out.iterdir()) == before


def test_failed_export_leaves_nothing(tmp_path: Path) -> None:
    cfg = preset("test")
    hf = save_hf_folder(RandomWeights(cfg, 0), tmp_path / "hf")
    sd = load_file(str(hf / "model.safetensors"))
    del sd["model.layers.2.mamba.out_proj.weight"]
    save_file(sd, str(hf / "model.safetensors"))
    out = tmp_path / "out"
    with pytest.raises(WeightsError, match=r"model\.layers\.2\.mamba\.out_proj\.weight"):
        export(model=hf, out=out, options=ExportOptions(parity_check=False))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_wrong_shape_named(tmp_path: Path) -> None:
    cfg = preset("test")
    hf = save_hf_folder(RandomWeights(cfg, 0), tmp_path / "hf")
    sd = load_file(str(hf / "model.safetensors"))
    sd["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(3, 64)
    save_file(sd, str(hf / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight has shape \(3, 64\)"):
        export(model=hf, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_configs(tmp_path: Path) -> None:
    cfg = preset("test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no config.json"):
        export(model=tmp_path / "empty", out=tmp_path / "o1")
    d = cfg.to_hf_dict()
    bad = tmp_path / "llama"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**d, "model_type": "llama"}))
    with pytest.raises(ExportError, match="model_type 'llama' is not supported"):
        export(model=bad, out=tmp_path / "o2")
    widths = tmp_path / "widths"
    widths.mkdir()
    (widths / "config.json").write_text(json.dumps({**d, "mamba_d_head": 48}))
    with pytest.raises(ExportError, match="mamba widths disagree"):
        export(model=widths, out=tmp_path / "o3")
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


def test_from_hf_accepts_both_layer_type_spellings() -> None:
    d = preset("test").to_hf_dict()
    a = HybridConfig.from_hf({**d, "layer_types": ["mamba", "attention", "mamba", "mamba"]})
    b = HybridConfig.from_hf({**d, "layer_types": ["linear_attention", "full_attention", "linear_attention",
                                                   "linear_attention"]})
    assert a.layer_types == b.layer_types == ("mamba", "attention", "mamba", "mamba")
    dense = HybridConfig.from_hf({**d, "num_local_experts": 0, "position_embedding_type": "nope"})
    assert not dense.has_experts
    with pytest.raises(ConfigError):
        HybridConfig.from_hf({**d, "position_embedding_type": "alibi"})


def test_presets_layers_override() -> None:
    t = preset("granite-4.0-h-tiny", layers=4)
    assert t.num_layers == 4 and t.attention_layers == (2,) and t.hidden_size == 1536
    assert abs(preset("granite-4.0-h-tiny").num_parameters() / 1e9 - 6.9) < 0.1
