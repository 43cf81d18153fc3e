"""Graph optimizer: the portable graph's kernel calls → ONNX Runtime contrib ops, one rewrite per file.

| fusion    | replaces                            | with (com.microsoft unless noted)          | file         |
|-----------|-------------------------------------|--------------------------------------------|--------------|
| scan      | granite_onnx.CausalConv1d           | CausalConvWithState + Sigmoid·Mul (SiLU)   | scan.py      |
|           | granite_onnx.SSMScan                | LinearAttention(update_rule="gated")       | scan.py      |
| moe       | granite_onnx.MoE                    | MatMul (router logits) + MoE(swiglu)       | moe.py       |
| moe_split | MoE over E experts, top-k           | MoE over 2E half-experts, top-2k           | moe_split.py |
| router    | router MatMul + shared-MLP MatMul   | one MatMul over both weights + Split       | router.py    |
| attention | granite_onnx.Attention              | GroupQueryAttention(do_rotary=0)           | attention.py |
|           | its q/k/v projection MatMuls        | one MatMul → GQA's packed QKV (no RoPE)    | attention.py |
| norms     | Add + RMSNormalization              | SkipSimplifiedLayerNormalization           | norms.py     |
|           | RMSNormalization                    | SimplifiedLayerNormalization (ONNX domain) | norms.py     |
| softplus  | Where(Greater(x, 20), x, Softplus(x)) | Softplus (ORT's is overflow-safe)        | softplus.py  |
| fold      | MatMul(Mul(x, s)), Mul(MatMul, c)   | MatMul with the scale in its weight        | scale_fold.py |
| shapes    | Reshape(x, Concat(Shape(..), ..))   | Reshape(x, constant with 0 / -1)           | static_shapes.py |
|           | identity, chained, MoE-flatten Reshapes | — (removed)                            | static_shapes.py |
| (always)  | orphaned functions/weights, consts  | —                                          | cleanup.py   |

Order (`fuse_all`): shape inference once (the checks read static heads/dims), then scan, moe,
moe_split, router, attention, norms, softplus, fold, shapes, cleanup. The kernel fusions are one-node patterns and independent of
each other; norms run after them so that the Adds they absorb are final; fold (constant Muls into
MatMul weights) sees the final Muls; shapes reads the shapes of the contrib ops' outputs and leaves the
Shape/Concat subgraphs dead; cleanup runs last because it removes what the others orphaned (the
portable functions, the old MoE, conv and folded weights, the dead shape arithmetic) and merges the
per-layer copies of the attention-mask arithmetic. Each fusion returns how often it fired; a call
node it refused stays (ONNX Runtime inlines its portable function), and `explain(model)` says why
(fuse_all logs it at INFO).

router, softplus, fold and shapes exist for decode speed: a one-token step of a small model is bound by the
number of kernels, not by arithmetic (see BENCHMARKS.md, "Fused vs HF eager"); moe_split too, for the
balance of the MoE kernel's threads.

With every fusion firing, the fused graph holds no `granite_onnx.*` node and no Scan/Loop.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchingTracer, MatchStatus

from granite_onnx.export.fusions._common import PORTABLE_DOMAIN, infer_shapes
from granite_onnx.export.fusions.attention import attention_rules, fuse_attention
from granite_onnx.export.fusions.cleanup import cleanup
from granite_onnx.export.fusions.moe import fuse_moe, moe_rules
from granite_onnx.export.fusions.moe_split import fuse_moe_split, moe_split_rules
from granite_onnx.export.fusions.norms import fuse_rms_norm, fuse_skip_rms_norm, rms_norm_rules, skip_rms_norm_rules
from granite_onnx.export.fusions.router import fuse_router, router_rules
from granite_onnx.export.fusions.scale_fold import fuse_scale_fold, scale_fold_rules
from granite_onnx.export.fusions.scan import causal_conv_rules, fuse_causal_conv, fuse_ssm_scan, ssm_scan_rules
from granite_onnx.export.fusions.softplus import fuse_softplus, softplus_rules
from granite_onnx.export.fusions.static_shapes import fuse_drop_reshapes, fuse_static_shapes

log = logging.getLogger(__name__)

ALL_FUSIONS = ("scan", "moe", "moe_split", "router", "attention", "norms", "softplus", "fold", "shapes")

# fusion name → (count key, rewrite) in the order they run
_STEPS: dict[str, list[tuple[str, Callable[[ir.Model], int]]]] = {
    "scan": [("causal_conv", fuse_causal_conv), ("ssm_scan", fuse_ssm_scan)],
    "moe": [("moe", fuse_moe)],
    "moe_split": [("moe_split", fuse_moe_split)],
    "router": [("router", fuse_router)],
    "attention": [("attention", fuse_attention)],
    "norms": [("skip_rms_norm", fuse_skip_rms_norm), ("rms_norm", fuse_rms_norm)],
    "softplus": [("softplus", fuse_softplus)],
    "fold": [("scale_fold", fuse_scale_fold)],
    "shapes": [("static_reshape", fuse_static_shapes), ("drop_reshape", fuse_drop_reshapes)],
}

_RULES: dict[str, pattern.RewriteRuleSet] = {
    "causal_conv": causal_conv_rules,
    "ssm_scan": ssm_scan_rules,
    "moe": moe_rules,
    "router": router_rules,
    "moe_split": moe_split_rules,
    "attention": attention_rules,
    "skip_rms_norm": skip_rms_norm_rules,
    "rms_norm": rms_norm_rules,
    "softplus": softplus_rules,
    "scale_fold": scale_fold_rules,
}

__all__ = [
    "ALL_FUSIONS",
    "cleanup",
    "explain",
    "fuse_all",
    "fuse_attention",
    "fuse_causal_conv",
    "fuse_model_file",
    "fuse_moe",
    "fuse_moe_split",
    "fuse_rms_norm",
    "fuse_router",
    "fuse_scale_fold",
    "fuse_skip_rms_norm",
    "fuse_softplus",
    "fuse_ssm_scan",
    "fuse_static_shapes",
    "fuse_drop_reshapes",
    "portable_calls",
]


def portable_calls(model: ir.Model) -> list[str]:
    """Names of the `granite_onnx.*` call nodes still in the graph (empty when all fused)."""
    return [n.name or n.op_type for n in model.graph.all_nodes() if n.domain == PORTABLE_DOMAIN]


def explain(model: ir.Model, *, fusions: Sequence[str] = ALL_FUSIONS) -> dict[str, str]:
    """Why each fusion refused a node it matched: {node name: "<rewrite>: <reason>"}. Changes nothing."""
    infer_shapes(model)
    reasons: dict[str, str] = {}
    for name in fusions:
        for key, _ in _STEPS[name]:
            if key not in _RULES:  # not a pattern rewrite (static_reshape): it refuses no call node
                continue
            tracer = MatchingTracer()
            _RULES[key].apply_to_model(model, tracer=tracer)
            for matches in tracer.best_matches_map.values():
                for m in matches:
                    if m.status == MatchStatus.CONDITION_FAILED:
                        reasons[m.root_node.name or str(m.root_node)] = f"{key}: {m.match_result.reason}"
    return reasons


def fuse_all(model: ir.Model, *, fusions: Sequence[str] = ALL_FUSIONS) -> dict[str, int]:
    """Apply `fusions` (a subset of ALL_FUSIONS) and cleanup in place; return the count of each rewrite.

    Keys: causal_conv, ssm_scan, moe, moe_split, router, attention, skip_rms_norm, rms_norm, softplus,
    scale_fold, static_reshape, drop_reshape (0 when not requested), and
    `cleanup`: nodes and functions it removed.
    """
    unknown = [f for f in fusions if f not in _STEPS]
    if unknown:
        raise ValueError(f"unknown fusion(s) {unknown}; choose from {list(ALL_FUSIONS)}")
    infer_shapes(model)
    counts: dict[str, int] = {}
    for name in ALL_FUSIONS:  # fixed order, whatever order `fusions` lists them in
        for key, fuse in _STEPS[name]:
            counts[key] = fuse(model) if name in fusions else 0
    counts["cleanup"] = cleanup(model)
    if "shapes" in fusions:
        # cleanup's folding and de-duplication expose a few more (chained reshapes whose middle target
        # was not yet a constant), and a merged pair may itself be an identity the next pass proves:
        # repeat while passes find some (two or three in practice)
        for _ in range(4):
            extra = fuse_drop_reshapes(model)
            if not extra:
                break
            counts["drop_reshape"] += extra
            counts["cleanup"] += cleanup(model)
    left = portable_calls(model)
    if left:
        why = explain(model, fusions=fusions)
        for name in left:
            log.info("kept portable call %s: %s", name, why.get(name, "its fusion was not requested"))
    return counts


def fuse_model_file(in_path: Path, out_path: Path, **kw: object) -> dict[str, int]:
    """Load `in_path` (model.onnx with its external data beside it), fuse, save to `out_path`.

    The weights go to a new external-data file `<out_path name>.data` next to `out_path`, written one
    tensor at a time (re-laid-out weights are computed as they are written), so peak memory stays
    near one tensor, not the model. `kw` goes to `fuse_all`. Returns fuse_all's counts.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    data_name = f"{out_path.name}.data"
    if (out_path.parent / data_name).resolve() == (in_path.parent / data_name).resolve() or \
            out_path.resolve() == in_path.resolve():
        raise ValueError(f"refusing to fuse {in_path} onto itself: the new external data would replace the "
                         "weights it is read from; write the fused model to another folder")
    t0 = time.perf_counter()
    model = ir.load(in_path)
    # The source weights are memory-mapped; pages read while writing stay resident until the map is
    # closed, so without this the process RSS grows to the whole model file. Close every map after each
    # tensor is written (a later read maps the file again); one writer thread keeps that safe.
    sources = [v.const_value for v in model.graph.initializers.values()
               if isinstance(v.const_value, ir.ExternalTensor)]
    counts = fuse_all(model, **kw)  # type: ignore[arg-type]
    model.metadata_props["granite_onnx.fusions"] = json.dumps(counts)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def release_sources(_tensor: object, _info: object) -> None:
        for t in sources:
            try:
                t.release()
            except BufferError:  # still referenced by an array in flight: closed on a later call
                pass

    ir.save(model, out_path, external_data=data_name, callback=release_sources, max_workers=1,
            max_in_flight_bytes=256 << 20)
    log.info("fused %s → %s in %.1f s: %s", in_path, out_path, time.perf_counter() - t0, counts)
    return counts
