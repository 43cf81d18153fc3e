"""Validate an exported model folder against HF transformers (eager, float32) on identical inputs.

    validate(model_dir, reference) -> ValidationReport

`reference` is an HF checkpoint folder, or a preset name whose seeded random weights are written to a
temporary HF folder (seed and layers default to the ones in the folder's export_report.json). Checks, in
the order they are reported (the first failing one is `first_divergent`):

    prefill     one prompt [1, prompt_len]: logits (last position, or every position for a logits="all"
                folder) and every present.* tensor by name, HF's cache layouts mapped to ours; the logits
                also with ONNX Runtime's graph optimizations off
    decode      `decode_steps` teacher-forced steps (the same fixed random ids on both sides): logits at
                every step, every present.* after the last one
    greedy      `greedy_tokens` greedy tokens, HF `generate(do_sample=False)` vs our runtime's
                `Model.generate`, EOS disabled on both sides so the full length is compared
    batch       `batch` left-padded rows of different lengths, prefill + teacher-forced decode: ONNX Runtime
                batched vs each row alone in ONNX Runtime, and vs HF batched

HF's cache layouts (transformers 5.x DynamicCache): conv state [B, conv_dim, d_conv] of which the last
d_conv − 1 columns are ours; SSM state [B, H, head_dim, d_state], the transpose of ours; K/V
[B, kv_heads, T, head_dim] as ours. HF's RoPE needs explicit position ids under left padding; they are
computed as the ONNX graph computes them, `cumsum(mask) − 1` clamped at 0.

Nothing here prints: the report's `format_table()` / `to_json()` are for the CLI and the tests.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from granite_onnx.export import io
from granite_onnx.models.config import HybridConfig

log = logging.getLogger(__name__)

EXPORT_REPORT = "export_report.json"


class ValidationError(RuntimeError):
    """Validation could not run (not a failed comparison); the message says why and how to fix it."""


# ---------------------------------------------------------------------------------------------- report
@dataclass
class Row:
    """One compared output: the largest |ORT − reference| over everything it covers."""

    name: str
    max_abs_diff: float  # for "greedy": how many token ids differ
    atol: float
    ok: bool
    detail: str = ""  # where the worst or first failing element is (step, row, layer)
    first_bad_step: int | None = None  # rows that cover decode steps: the first step over atol


@dataclass
class ValidationReport:
    passed: bool
    max_abs_logits_diff: float
    greedy_match: bool
    rows: list[Row]
    first_divergent: str | None = None
    greedy_hf: list[int] = field(default_factory=list)
    greedy_ort: list[int] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "max_abs_logits_diff": self.max_abs_logits_diff,
            "greedy_match": self.greedy_match,
            "first_divergent": self.first_divergent,
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "greedy": {"hf": self.greedy_hf, "ort": self.greedy_ort},
            "settings": self.settings,
            "seconds": round(self.seconds, 3),
        }

    def format_table(self) -> str:
        width = max((len(r.name) for r in self.rows), default=0)
        lines = []
        for r in self.rows:
            if r.name == "greedy":
                line = f"✓ {r.name:<{width}}  {r.detail}" if r.ok else f"✗ {r.name}: {r.detail}"
            elif r.ok:
                line = f"✓ {r.name:<{width}}  max {r.max_abs_diff:.1e} ≤ {r.atol:.0e}"
                line += f"  ({r.detail})" if r.detail else ""
            else:
                line = f"✗ {r.name}: max diff {r.max_abs_diff:.1e} > atol {r.atol:.0e}"
                line += f" ({r.detail})" if r.detail else ""
            lines.append(line)
        verdict = "PASSED" if self.passed else f"FAILED — first divergent: {self.first_divergent}"
        lines.append(f"{verdict}; max |Δlogits| {self.max_abs_logits_diff:.1e}, "
                     f"greedy {'identical' if self.greedy_match else 'differs'} ({self.seconds:.1f} s)")
        return "\n".join(lines)


class _Rows:
    """Collects rows; the comparison helpers all go through `add`."""

    def __init__(self, atol: float) -> None:
        self.atol = atol
        self.rows: list[Row] = []
        self.logits_max = 0.0

    def add(self, name: str, diff: float, detail: str = "", *, logits: bool = False,
            first_bad_step: int | None = None) -> Row:
        """`logits`: a logits comparison against the reference (counted in max_abs_logits_diff)."""
        ok = bool(math.isfinite(diff) and diff <= self.atol)
        row = Row(name, float(diff), self.atol, ok, detail, first_bad_step)
        self.rows.append(row)
        if logits:
            self.logits_max = max(self.logits_max, float(diff)) if math.isfinite(diff) else math.inf
        log.debug("%s: %.3g %s", name, diff, detail)
        return row

    def add_steps(self, name: str, per_step: list[float], *, logits: bool = False) -> Row:
        """One row for a sequence of steps; the detail names the worst step and the first failing one."""
        worst = int(np.argmax(per_step))
        bad = [k for k, d in enumerate(per_step) if not d <= self.atol]
        detail = f"{len(per_step)} steps, worst at step {worst}"
        if bad:
            detail += f", first over atol at step {bad[0]}"
        return self.add(name, max(per_step), detail, logits=logits, first_bad_step=bad[0] if bad else None)

    def add_tokens(self, name: str, ref: list[int], ours: list[int]) -> Row:
        """Token ids, HF vs ours: max_abs_diff counts the ids that differ; the step is the first one."""
        n_diff = sum(a != b for a, b in zip(ref, ours)) + abs(len(ref) - len(ours))
        first: int | None = None
        detail = f"{len(ref)} tokens identical"
        if n_diff:
            first = next((i for i, (a, b) in enumerate(zip(ref, ours)) if a != b), min(len(ref), len(ours)))
            detail = f"token {first} of {len(ref)} differs: HF {ref[first:first + 4]} vs ORT {ours[first:first + 4]}"
        row = Row(name, float(n_diff), 0.0, n_diff == 0, detail, first)
        self.rows.append(row)
        return row


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ValidationError(f"shape mismatch {a.shape} vs {b.shape}: the model folder does not follow the "
                              "state contract of this granite-onnx version; re-export it")
    if a.size == 0:
        return 0.0
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(d.max()) if np.isfinite(d).all() else math.inf


# ---------------------------------------------------------------------------------------- reference
def _read_source(model_dir: Path) -> dict[str, Any]:
    p = model_dir / EXPORT_REPORT
    if not p.exists():
        return {}
    src = json.loads(p.read_text()).get("source")
    return src if isinstance(src, dict) else {}


def _reference_folder(reference: str | Path, model_dir: Path, seed: int | None, layers: int | None,
                      scratch: Path) -> tuple[Path, str]:
    """An HF checkpoint folder for `reference`, and a description of it for the report."""
    p = Path(reference)
    if p.is_dir():
        if seed is not None or layers is not None:
            raise ValidationError("seed/layers apply to a preset reference only; an HF folder keeps its weights")
        if not (p / "config.json").exists():
            raise ValidationError(f"{p} has no config.json; the reference must be an HF checkpoint folder "
                                  "(config.json + *.safetensors) or a preset name")
        return p, str(p)
    from granite_onnx.models.config import ConfigError, preset, preset_names
    from granite_onnx.models.weights import RandomWeights, save_hf_folder

    src = _read_source(model_dir)
    if seed is None:
        seed = int(src.get("seed", 0)) if src.get("preset") == str(reference) else 0
    if layers is None and src.get("preset") == str(reference):
        layers = src.get("layers")
    try:
        cfg = preset(str(reference), layers=layers)
    except ConfigError as e:
        raise ValidationError(f"{reference!r} is neither a folder nor a preset ({e}); presets: "
                              f"{', '.join(preset_names())}") from None
    log.info("writing the HF reference for preset %s (seed %d, layers %s) to %s", reference, seed, layers, scratch)
    save_hf_folder(RandomWeights(cfg, seed), scratch)
    return scratch, f"preset {reference} (seed {seed}, layers {layers or cfg.num_layers})"


def _check_same_config(ours: HybridConfig, ref: HybridConfig, model_dir: Path, what: str) -> None:
    a, b = ours.to_json_dict(), ref.to_json_dict()
    diff = [f"{k}: folder {a[k]!r} vs reference {b[k]!r}" for k in a if k != "name" and a[k] != b[k]]
    if diff:
        raise ValidationError(f"{model_dir} was not exported from {what}: " + "; ".join(diff[:6])
                              + " — pass the checkpoint (or preset, seed and layers) it was exported from")


def _load_hf(folder: Path) -> Any:
    import torch
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, attn_implementation="eager", experts_implementation="eager")
    except TypeError:  # a transformers without the experts_implementation switch
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    # Greedy continuations run to full length on both sides.
    model.generation_config.eos_token_id = None
    return model


# ------------------------------------------------------------------------------------------- HF side
class _HF:
    """HF forward passes with a cache, fed like our graph: explicit position ids from the mask."""

    def __init__(self, model: Any, cfg: HybridConfig) -> None:
        self.model, self.cfg = model, cfg
        self.cache: Any = None

    def step(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        t_ids = torch.from_numpy(np.asarray(ids, np.int64))
        t_mask = torch.from_numpy(np.asarray(mask, np.int64))
        pos = (t_mask.cumsum(-1) - 1).clamp(min=0)[:, -t_ids.shape[1]:]
        attention_mask: Any = t_mask
        if not self.cfg.attention_layers:
            attention_mask = self._mamba_only_masks(t_mask, t_ids.shape[1])
        with torch.no_grad():
            out = self.model(input_ids=t_ids, attention_mask=attention_mask, position_ids=pos, cache=self.cache,
                             use_cache=True)
        self.cache = out["cache"] if "cache" in out else out["past_key_values"]
        return out["logits"].float().numpy()

    @staticmethod
    def _mamba_only_masks(mask: Any, new_tokens: int) -> dict[str, Any]:
        """The per-layer-type mask mapping for a model without attention layers.

        transformers 5.24 builds the full-attention mask even when no layer uses it, and that asks the
        cache for a sequence length only attention layers track: `ValueError: get_seq_length can only be
        called on Attention layers`. A precomputed mapping skips it; this is what
        `masking_utils.create_recurrent_attention_mask` returns (None = nothing to zero).
        """
        if new_tokens == 1 or bool((mask == 1).all()):
            return {"linear_attention": None}
        return {"linear_attention": mask[:, -new_tokens:].contiguous()}

    def states(self) -> dict[str, np.ndarray]:
        """Every present.* tensor in our layout, by name."""
        c = self.cache
        out = {}
        for s in io.state_specs(self.cfg):
            if s.kind == "key":
                t = c.layers[s.layer].keys
            elif s.kind == "value":
                t = c.layers[s.layer].values
            elif s.kind == "conv_state":
                t = c.get_conv_state(s.layer)[..., -(self.cfg.mamba_d_conv - 1):]
            else:
                t = c.get_recurrent_state(s.layer).transpose(-1, -2)
            out[s.present_name] = t.detach().float().numpy()
        return out

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        import torch

        if not self.cfg.attention_layers:
            return self._greedy_by_steps(prompt, n)  # generate() cannot pass the mask mapping above
        ids = torch.tensor([prompt], dtype=torch.int64)
        with torch.no_grad():
            seq = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                      do_sample=False, eos_token_id=None,
                                      pad_token_id=self.cfg.pad_token_id or 0)
        return [int(x) for x in seq[0, len(prompt):]]


    def _greedy_by_steps(self, prompt: list[int], n: int) -> list[int]:
        self.cache = None
        mask = np.ones((1, len(prompt)), np.int64)
        logits = self.step(np.asarray([prompt], np.int64), mask)
        out: list[int] = []
        while True:
            out.append(int(logits[0, -1].argmax()))
            if len(out) == n:
                return out
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
            logits = self.step(np.asarray([[out[-1]]], np.int64), mask)


# ------------------------------------------------------------------------------------------ ORT side
def _ort_states(sess: Any, state: Any) -> dict[str, np.ndarray]:
    arrays = sess.state_to_numpy(state)
    return {s.present_name: arrays[s.past_name] for s in io.state_specs(sess.cfg)}


def _greedy_runtime(sess: Any, prompt: list[int], n: int) -> list[int]:
    """Our runtime's generate loop (prefill → sampler → decode steps), with EOS disabled."""
    from granite_onnx.runtime.config import GenerationConfig
    from granite_onnx.runtime.generate import Model

    class _NoEos(Model):
        eos_token_ids = ()  # type: ignore[assignment]  # compare the full length, as HF does here

    return _NoEos(sess, None).generate([prompt], GenerationConfig(max_new_tokens=n))[0].token_ids


def _kept(logits_mode: str, x: np.ndarray) -> np.ndarray:
    return x[:, -1:] if logits_mode == "last" else x


def _left_pad(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return ids, mask, [length - len(r) for r in rows]


def _row_state_diff(cfg: HybridConfig, batched: dict[str, np.ndarray], r: int, pad: int,
                    other: dict[str, np.ndarray], other_row: int, other_pad: int) -> Iterator[tuple[str, float]]:
    """Per state name, row r of `batched` vs row other_row of `other`; K/V compared at real positions."""
    for s in io.state_specs(cfg):
        a, b = batched[s.present_name][r], other[s.present_name][other_row]
        if s.kind in ("key", "value"):
            a, b = a[:, pad:], b[:, other_pad:]
        yield s.present_name, _max_abs(a, b)


# ---------------------------------------------------------------------------------------------- main
def validate(model_dir: str | Path, reference: str | Path, *, seed: int | None = None, layers: int | None = None,
             prompt_len: int = 37, decode_steps: int = 16, greedy_tokens: int = 32, batch: int = 3,
             atol: float = 1e-4) -> ValidationReport:
    """Compare the ONNX model in `model_dir` with HF transformers on the same inputs; see the module doc."""
    from granite_onnx.runtime.session import GraniteSession, read_folder_config

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    if prompt_len < 1 or decode_steps < 0 or greedy_tokens < 0 or batch < 1:
        raise ValidationError(f"prompt_len ≥ 1, decode_steps ≥ 0, greedy_tokens ≥ 0 and batch ≥ 1 are needed; got "
                              f"{prompt_len}, {decode_steps}, {greedy_tokens}, {batch}")
    cfg, meta = read_folder_config(model_dir)
    logits_mode = meta.get("logits", "last")
    with tempfile.TemporaryDirectory(prefix="granite-onnx-ref-") as scratch:
        ref_dir, ref_what = _reference_folder(reference, model_dir, seed, layers, Path(scratch))
        _check_same_config(cfg, HybridConfig.from_hf(ref_dir), model_dir, ref_what)
        hf_model = _load_hf(ref_dir)
    sess = GraniteSession(model_dir)
    rows = _Rows(atol)
    rng = np.random.default_rng(0)
    vocab = cfg.vocab_size

    # --- prefill: one prompt, logits and every present.* by name
    prompt = rng.integers(0, vocab, (1, prompt_len), dtype=np.int64)
    mask = np.ones_like(prompt)
    hf = _HF(hf_model, cfg)
    hf_logits = hf.step(prompt, mask)
    ort_logits, state = sess.step(prompt, mask, sess.new_state(1))
    rows.add("prefill.logits", _max_abs(ort_logits, _kept(logits_mode, hf_logits)),
             f"{ort_logits.shape[1]} position{'s' if ort_logits.shape[1] > 1 else ''}", logits=True)
    plain = GraniteSession(model_dir, optimization="none")
    plain_logits, _ = plain.step(prompt, mask, plain.new_state(1))
    del plain
    rows.add("prefill.logits [ORT optimizations off]", _max_abs(plain_logits, _kept(logits_mode, hf_logits)),
             logits=True)
    hf_st, ort_st = hf.states(), _ort_states(sess, state)
    for name in io.output_names(cfg)[1:]:
        rows.add(f"prefill.{name}", _max_abs(ort_st[name], hf_st[name]))

    # --- teacher-forced decode: the same fixed ids one at a time
    if decode_steps:
        forced = rng.integers(0, vocab, (1, decode_steps), dtype=np.int64)
        per_step = []
        for k in range(decode_steps):
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
            lo, state = sess.step(forced[:, k:k + 1], mask, state)
            per_step.append(_max_abs(lo, hf.step(forced[:, k:k + 1], mask)[:, -1:]))
        rows.add_steps("decode.logits", per_step, logits=True)
        hf_st, ort_st = hf.states(), _ort_states(sess, state)
        for name in io.output_names(cfg)[1:]:
            rows.add(f"decode.{name}", _max_abs(ort_st[name], hf_st[name]), f"after {decode_steps} steps")

    # --- greedy continuation, EOS disabled on both sides
    greedy_hf: list[int] = []
    greedy_ort: list[int] = []
    greedy_match = True
    if greedy_tokens:
        greedy_hf = hf.greedy(prompt[0].tolist(), greedy_tokens)
        greedy_ort = _greedy_runtime(sess, prompt[0].tolist(), greedy_tokens)
        greedy_match = rows.add_tokens("greedy", greedy_hf, greedy_ort).ok

    # --- batch with left padding: ORT batched vs each row alone, and vs HF batched
    if batch > 1:
        _check_batch(sess, hf_model, cfg, logits_mode, rows, rng, prompt_len, decode_steps, batch)

    failed = [r for r in rows.rows if not r.ok]
    first = None
    if failed:
        r = failed[0]
        first = r.name if r.first_bad_step is None else f"{r.name} step {r.first_bad_step}"
    report = ValidationReport(
        passed=not failed, max_abs_logits_diff=rows.logits_max, greedy_match=greedy_match, rows=rows.rows,
        first_divergent=first, greedy_hf=greedy_hf, greedy_ort=greedy_ort,
        settings={"model_dir": str(model_dir), "reference": ref_what, "logits": logits_mode,
                  "prompt_len": prompt_len, "decode_steps": decode_steps, "greedy_tokens": greedy_tokens,
                  "batch": batch, "atol": atol, "graph": meta.get("graph", "portable")},
        seconds=time.perf_counter() - t0)
    log.info("validation %s in %.1f s (max |Δlogits| %.2g)", "passed" if report.passed else "failed",
             report.seconds, report.max_abs_logits_diff)
    return report


def _check_batch(sess: Any, hf_model: Any, cfg: HybridConfig, logits_mode: str, rows: _Rows,
                 rng: np.random.Generator, prompt_len: int, steps: int, batch: int) -> None:
    """Rows of lengths prompt_len down to about half of it, left-padded into one batch."""
    lengths = [max(1, prompt_len - (r * prompt_len) // (2 * batch)) for r in range(batch)]
    prompts = [rng.integers(0, cfg.vocab_size, n, dtype=np.int64).tolist() for n in lengths]
    forced = rng.integers(0, cfg.vocab_size, (batch, steps), dtype=np.int64)
    ids, mask, pads = _left_pad(prompts, cfg.pad_token_id or 0)

    # Batched, in ONNX Runtime and in HF.
    hf = _HF(hf_model, cfg)
    b_logits, state = sess.step(ids, mask, sess.new_state(batch))
    h_logits = _kept(logits_mode, hf.step(ids, mask))
    b_dec, h_dec = [], []
    for k in range(steps):
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        lo, state = sess.step(forced[:, k:k + 1], mask, state)
        b_dec.append(lo)
        h_dec.append(hf.step(forced[:, k:k + 1], mask)[:, -1:])
    b_st, h_st = _ort_states(sess, state), hf.states()

    alone_logits, alone_dec, alone_st = [], [], []
    for r, p in enumerate(prompts):
        one = np.asarray([p], np.int64)
        m = np.ones_like(one)
        lo, st = sess.step(one, m, sess.new_state(1))
        alone_logits.append(lo)
        dec = []
        for k in range(steps):
            m = np.concatenate([m, np.ones((1, 1), np.int64)], axis=1)
            lo, st = sess.step(forced[r:r + 1, k:k + 1], m, st)
            dec.append(lo)
        alone_dec.append(dec)
        alone_st.append(_ort_states(sess, st))

    def real(x: np.ndarray, r: int) -> np.ndarray:
        # Logits at the row's real positions (all of them for a logits="all" folder).
        return x[r:r + 1, pads[r]:] if logits_mode == "all" else x[r:r + 1]

    rows_desc = f"{batch} rows left-padded, lengths {'/'.join(map(str, lengths))}"
    # vs each row alone
    rows.add("batch.prefill.logits vs alone",
             max(_max_abs(real(b_logits, r), alone_logits[r]) for r in range(batch)), rows_desc)
    if steps:
        rows.add_steps("batch.decode.logits vs alone",
                       [max(_max_abs(b_dec[k][r:r + 1], alone_dec[r][k]) for r in range(batch))
                        for k in range(steps)])
    worst = max(((n, d, r) for r in range(batch)
                 for n, d in _row_state_diff(cfg, b_st, r, pads[r], alone_st[r], 0, 0)), key=lambda x: x[1])
    rows.add("batch.present.* vs alone", worst[1], f"worst {worst[0]} row {worst[2]}")
    # vs HF batched
    rows.add("batch.prefill.logits vs HF",
             max(_max_abs(real(b_logits, r), real(h_logits, r)) for r in range(batch)), rows_desc, logits=True)
    if steps:
        rows.add_steps("batch.decode.logits vs HF", [_max_abs(b, h) for b, h in zip(b_dec, h_dec)],
                       logits=True)
    worst = max(((n, d, r) for r in range(batch)
                 for n, d in _row_state_diff(cfg, b_st, r, pads[r], h_st, r, pads[r])), key=lambda x: x[1])
    rows.add("batch.present.* vs HF", worst[1], f"worst {worst[0]} row {worst[2]}")


__all__ = ["Row", "ValidationReport", "ValidationError", "validate"]
