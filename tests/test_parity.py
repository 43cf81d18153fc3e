"""The parity suite: ONNX Runtime vs HF transformers (eager, float32) on configurations that each vary
one thing, through `granite_onnx.validate` — logits and every present.* by name on a 37-token prefill and
16 teacher-forced decode steps, 32 greedy tokens, batch 3 with left padding vs each row alone and vs HF.

Rungs: ORT vs HF (validate); decode loop vs one full forward (ORT alone, logits="all" folder).

Each configuration is exported once (module scope, ~30 s each). Most derive from preset "test" with
untied embeddings: with tied ones, random weights make greedy decoding repeat the last prompt token
forever, so the greedy check would compare 32 copies of one id. The two configurations that vary the
multipliers and the vocabulary keep "test" exactly (tied), so the tied lm_head is covered too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from granite_onnx.export import io
from granite_onnx.models.config import ATTENTION, MAMBA, HybridConfig, preset

ATOL = 1e-4
PROMPT_LEN = 37
DECODE_STEPS = 16
GREEDY_TOKENS = 32

TEST = preset("test")  # mamba, attention, mamba, mamba; 6 experts top-2; odd multipliers and eps
UNTIED = dataclasses.replace(TEST, tie_word_embeddings=False)

CONFIGS: dict[str, HybridConfig] = {
    "attention-first": dataclasses.replace(UNTIED, layer_types=(ATTENTION, MAMBA, MAMBA, MAMBA)),
    "attention-last": dataclasses.replace(UNTIED, layer_types=(MAMBA, MAMBA, MAMBA, ATTENTION)),
    "all-mamba": dataclasses.replace(UNTIED, layer_types=(MAMBA,) * 4),
    # Granite 4.0 1B's shape, reduced: every layer attention with RoPE, dense MLP.
    "all-attention-rope": dataclasses.replace(UNTIED, layer_types=(ATTENTION,) * 4, position_embedding_type="rope",
                                              rope_theta=10000.0, num_experts=0, num_experts_per_tok=0),
    "dense-mlp": dataclasses.replace(UNTIED, num_experts=0, num_experts_per_tok=0),
    "mamba-n-groups-2": dataclasses.replace(UNTIED, mamba_n_groups=2),
    "odd-multipliers": dataclasses.replace(TEST, embedding_multiplier=7.1, residual_multiplier=0.43,
                                           attention_multiplier=0.29, logits_scaling=3.3, rms_norm_eps=3e-4),
    "vocab-1003": dataclasses.replace(TEST, vocab_size=1003),
    # dt lands in [1e-3, 0.1] at init: the 0.05 cap bites in prefill (HF clamps there) but not in
    # single-token decode (HF does not clamp there).
    "time-step-limit": dataclasses.replace(UNTIED, time_step_limit=(0.0, 0.05)),
}
SEED = 7


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # Tiny models on a shared 2-core machine: torch's thread pool only fights ONNX Runtime's (30× slower).
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclasses.dataclass
class Exported:
    name: str
    cfg: HybridConfig
    hf_dir: Path
    folder: Path
    report: Any  # ValidationReport


# Every configuration twice: the portable graph (standard ops) and the fused one (ONNX Runtime kernels).
@pytest.fixture(scope="module", params=[(n, g) for n in CONFIGS for g in ("portable", "fused")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    from granite_onnx.export.exporter import ExportOptions, export
    from granite_onnx.models.weights import RandomWeights, save_hf_folder
    from granite_onnx.validate import validate

    name, graph = request.param
    cfg = dataclasses.replace(CONFIGS[name], name=f"test-{name}")
    root = tmp_path_factory.mktemp(f"{name}-{graph}")
    hf_dir = save_hf_folder(RandomWeights(cfg, SEED), root / "hf")
    folder = root / "onnx"
    export(model=hf_dir, out=folder, options=ExportOptions(logits="all", overwrite=True, parity_check=False,
                                                           optimize=graph == "fused"))
    meta = json.loads((folder / "granite_config.json").read_text())
    assert meta["graph"] == graph
    report = validate(folder, hf_dir, prompt_len=PROMPT_LEN, decode_steps=DECODE_STEPS,
                      greedy_tokens=GREEDY_TOKENS, batch=3, atol=ATOL)
    print(f"\n[{name}, {graph} graph]\n{report.format_table()}")
    return Exported(name, cfg, hf_dir, folder, report)


def _rows(report: Any, prefix: str) -> list[Any]:
    return [r for r in report.rows if r.name.startswith(prefix)]


def _assert_rows(report: Any, prefix: str) -> None:
    rows = _rows(report, prefix)
    assert rows, f"no rows named {prefix}*"
    for r in rows:
        print(f"{'✓' if r.ok else '✗'} {r.name}: {r.max_abs_diff:.2e} {r.detail}")
    bad = [f"{r.name}: {r.max_abs_diff:.2e} > {r.atol:.0e} ({r.detail})" for r in rows if not r.ok]
    assert not bad, "\n".join(bad) + "\n\n" + report.format_table()


def test_prefill_logits_and_every_state_vs_hf(exported: Exported) -> None:
    names = {r.name for r in _rows(exported.report, "prefill.")}
    assert {f"prefill.{n}" for n in io.output_names(exported.cfg)} <= names
    _assert_rows(exported.report, "prefill.")
    assert "37 positions" in exported.report.rows[0].detail  # logits="all": every position compared


def test_teacher_forced_decode_vs_hf(exported: Exported) -> None:
    assert {f"decode.{n}" for n in io.output_names(exported.cfg)} <= {r.name for r in exported.report.rows}
    _assert_rows(exported.report, "decode.")


def test_greedy_continuation_identical(exported: Exported) -> None:
    rep = exported.report
    print("HF ", rep.greedy_hf, "\nORT", rep.greedy_ort)
    assert len(rep.greedy_hf) == GREEDY_TOKENS
    assert rep.greedy_match, _rows(rep, "greedy")[0].detail


def test_left_padded_batch_vs_rows_alone_and_hf(exported: Exported) -> None:
    _assert_rows(exported.report, "batch.")


def test_report_summary(exported: Exported) -> None:
    rep = exported.report
    assert rep.passed, rep.format_table()
    assert rep.first_divergent is None
    assert rep.max_abs_logits_diff <= ATOL
    d = json.loads(json.dumps(rep.to_json()))
    assert d["passed"] and d["greedy_match"] and len(d["rows"]) == len(rep.rows)


def test_decode_loop_equals_one_full_forward(exported: Exported) -> None:
    """ORT alone: prefill k tokens then decode the rest one by one == one prefill over all tokens."""
    from granite_onnx.runtime.session import GraniteSession

    sess = GraniteSession(exported.folder)
    rng = np.random.default_rng(1)
    k, n = 21, 12
    ids = rng.integers(0, exported.cfg.vocab_size, (2, k + n), dtype=np.int64)
    full, full_state = sess.step(ids, np.ones_like(ids), sess.new_state(2))
    lo, st = sess.step(ids[:, :k], np.ones((2, k), np.int64), sess.new_state(2))
    steps = [lo[:, -1]]
    for t in range(k, k + n - 1):
        lo, st = sess.step(ids[:, t:t + 1], np.ones((2, t + 1), np.int64), st)
        steps.append(lo[:, -1])
    lo, st = sess.step(ids[:, -1:], np.ones((2, k + n), np.int64), st)
    stepped = np.stack(steps + [lo[:, -1]], axis=1)  # logits for positions k-1 .. k+n-1
    d_logits = float(np.abs(stepped - full[:, k - 1:]).max())
    a, b = sess.state_to_numpy(st), sess.state_to_numpy(full_state)
    d_state = {name: float(np.abs(a[name] - b[name]).max()) for name in a}
    print(f"[{exported.name}] decode loop vs full forward: logits {d_logits:.2e}; "
          + ", ".join(f"{k}: {v:.1e}" for k, v in d_state.items()))
    if exported.cfg.time_step_limit != TEST.time_step_limit:
        # HF clamps dt to time_step_limit in prefill but not in single-token decode (validate checks both
        # paths against HF), so here the two must differ: proof that the clamp is exercised.
        assert d_logits > ATOL, "time_step_limit did not change anything: the clamp is not exercised"
        return
    assert d_logits <= ATOL
    assert max(d_state.values()) <= ATOL, d_state


# ------------------------------------------------------------------------------ the validator itself
def test_validate_preset_reference_logits_last(test_model_last_dir: Path) -> None:
    """A preset reference takes seed and layers from export_report.json; logits="last" folders compare the
    last position."""
    from granite_onnx.validate import validate

    rep = validate(test_model_last_dir, "test", prompt_len=9, decode_steps=3, greedy_tokens=4, batch=2)
    print(rep.format_table())
    assert rep.passed, rep.format_table()
    assert rep.settings["reference"] == "preset test (seed 1, layers 4)"
    assert rep.rows[0].name == "prefill.logits" and rep.rows[0].detail == "1 position"


def test_validate_reports_a_wrong_reference(test_model_last_dir: Path, tmp_path: Path) -> None:
    """The same config with other weights must fail, and name the first divergent output."""
    from granite_onnx.models.weights import RandomWeights, save_hf_folder
    from granite_onnx.validate import validate

    other = save_hf_folder(RandomWeights(TEST, 2), tmp_path / "other")  # the folder has seed 1
    rep = validate(test_model_last_dir, other, prompt_len=7, decode_steps=2, greedy_tokens=3, batch=2)
    table = rep.format_table()
    print(table)
    assert not rep.passed and rep.first_divergent == "prefill.logits"
    assert "✗ prefill.logits: max diff" in table and "> atol 1e-04" in table
    assert "FAILED — first divergent: prefill.logits" in table
    assert json.loads(json.dumps(rep.to_json()))["passed"] is False


def test_validate_rejects_a_reference_with_another_config(test_model_last_dir: Path, tmp_path: Path) -> None:
    from granite_onnx.models.weights import RandomWeights, save_hf_folder
    from granite_onnx.validate import ValidationError, validate

    other = save_hf_folder(RandomWeights(CONFIGS["attention-last"], 1), tmp_path / "other")
    with pytest.raises(ValidationError, match="layer_types"):
        validate(test_model_last_dir, other)
