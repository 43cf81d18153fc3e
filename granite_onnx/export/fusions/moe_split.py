"""Each expert of com.microsoft.MoE split into two halves of its intermediate units, so that ONNX Runtime's
CPU kernel spreads every routed expert over two threads.

The CPU MoE kernel (ORT 1.32, contrib_ops/cpu/moe/moe_cpu.cc) hands each thread a contiguous range of
experts and runs that expert's two GEMMs single-threaded. At decode, top-2 of 8 experts over 2 threads
lands both experts on one thread 3 times in 7, and the MoE is then the longest node of the step
(~30 % of a batch-1 step of the small preset with varied routing). SwiGLU is elementwise per
intermediate unit, so an expert is the sum of two experts over the halves of its units:

    fc2_e · swiglu(fc1_e x) = fc2_e[:, :I/2] · swiglu(fc1_e[units :I/2] x) + fc2_e[:, I/2:] · swiglu(fc1_e[units I/2:] x)

The rewrite lays the 2E half-experts out as [first halves of experts 0…E−1 | second halves], duplicates
the router logits ([N, E] → [N, 2E]: the router weight's columns repeated, so no extra node) and
selects top-2k: both halves of each chosen expert are
selected, one in each thread's range. Weights: the softmax over 2E duplicated logits gives each half
p_e / 2, and the renormalisation over the 2k selected halves gives each half (p_e / 2) / Σ_top-k p —
half its expert's weight — so fc2 is multiplied by 2 (exact in floating point). Outputs equal the unsplit MoE up to summation order (~1e-7).

One difference, at exact ties: ORT picks the top k by softmax probability and breaks an exact tie at
the k-th place by the higher index. With duplicated logits, a tie between two experts for the last
place takes the second halves of both instead of both halves of one. A tie needs two router
probabilities equal in float32 (logits within ~1e-7 of each other); the unsplit kernel then already
departs from HF (torch.topk compares the logits themselves), so neither is the reference answer.

Refused when the intermediate size is odd, the weights are not initializers read by this node only,
or the MoE is not the form moe.py makes (swiglu interleaved, renormalised, no biases, no clamp).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from granite_onnx.export.fusions._common import (
    ORT_DOMAIN,
    Scoped,
    apply,
    concat_initializer,
    lazy_initializer,
    static_dims,
)

SPLIT = 2  # halves: one per thread of a 2-core decode; more threads still get each expert on two


def split_fc1(fc1: np.ndarray, parts: int = SPLIT) -> np.ndarray:
    """[E, 2I, D] (interleaved gate/up rows: unit j is rows 2j, 2j+1) → [parts·E, 2I/parts, D], part p of
    expert e at p·E + e."""
    two_i = fc1.shape[1]
    return np.ascontiguousarray(np.concatenate([fc1[:, p * two_i // parts:(p + 1) * two_i // parts]
                                                for p in range(parts)], axis=0))


def split_fc2(fc2: np.ndarray, parts: int = SPLIT) -> np.ndarray:
    """[E, D, I] → [parts·E, D, I/parts] in the same order, times `parts`: the renormalised routing weight
    of each part is 1/parts of its expert's."""
    i = fc2.shape[2]
    halves = np.concatenate([fc2[:, :, p * i // parts:(p + 1) * i // parts] for p in range(parts)], axis=0)
    return np.ascontiguousarray(halves * np.asarray(parts, dtype=fc2.dtype))


def _wide_router(op: pattern.RewriterContext, r: ir.Value) -> ir.Value:
    """Lazy initializer [R | R]: the router weight with its columns repeated (logits [N, E] → [N, 2E])."""
    return concat_initializer(op, f"{r.name}.halves", [r] * SPLIT)


# attributes the rewrite keeps as they are; anything else must be absent or at the default moe.py leaves
_EXPECTED = {"activation_type": "swiglu", "swiglu_fusion": 1, "normalize_routing_weights": 1}
_DEFAULTS = {"use_sparse_mixer": 0, "activation_alpha": 1.0, "activation_beta": 0.0}


class MoEHalves(pattern.RewriteRuleClassBase):
    """MoE(x, logits, fc1 [E,2I,D], –, fc2 [E,D,I], k) → MoE(x, [logits|logits], fc1', –, fc2', 2k)."""

    def pattern(self, op, x, logits, fc1, fc2):
        return op.MoE(x, logits, fc1, None, fc2, _domain=ORT_DOMAIN, _allow_other_attributes=True, _outputs=["y"])

    def check(self, op, x, logits, fc1, fc2, y, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        node = y.producer()
        attrs = {k: v.value for k, v in node.attributes.items()}
        for k, want in _EXPECTED.items():
            if attrs.get(k) != want:
                return result.fail(f"{node.name}: {k}={attrs.get(k)!r}, the split needs {want!r}", y)
        for k, default in _DEFAULTS.items():
            if attrs.get(k, default) != default:
                return result.fail(f"{node.name}: {k}={attrs[k]!r} is not the default {default!r}", y)
        if "swiglu_limit" in attrs:
            return result.fail(f"{node.name}: swiglu_limit is set (clamps are not checked under the split)", y)
        f1, f2 = static_dims(fc1, 3), static_dims(fc2, 3)
        for v, dims in ((fc1, f1), (fc2, f2)):
            if v.const_value is None or dims is None or None in dims:
                return result.fail(f"{v.name} is not a 3-D initializer", v)
            if len(v.uses()) != 1:
                return result.fail(f"{v.name} is read by {len(v.uses())} nodes; re-laying it out would change "
                                   "the others", v)
        e, two_i, d = f1
        if f2 != (e, d, two_i // 2):
            return result.fail(f"{fc1.name} {fc1.shape} and {fc2.name} {fc2.shape} are not [E, 2I, D], [E, D, I]", fc2)
        if (two_i // 2) % SPLIT:
            return result.fail(f"intermediate size {two_i // 2} is not a multiple of {SPLIT}", fc1)
        if static_dims(logits, 2) is None:
            return result.fail(f"router logits {logits.name} are not 2-D [N, E]", logits)
        if fc1.name.endswith(".halves"):
            return result.fail(f"{node.name} is split already", y)
        return result

    def rewrite(self, op, x, logits, fc1, fc2, y, **kw):
        node = y.producer()
        attrs = {k: v.value for k, v in node.attributes.items()}
        attrs["k"] = attrs["k"] * SPLIT
        e, two_i, d = fc1.shape
        i = two_i // 2
        t1, t2 = fc1.const_value, fc2.const_value
        w1 = lazy_initializer(op, f"{fc1.name}.halves", (SPLIT * e, two_i // SPLIT, d), t1.dtype,
                              lambda: split_fc1(t1.numpy()))
        w2 = lazy_initializer(op, f"{fc2.name}.halves", (SPLIT * e, d, i // SPLIT), t2.dtype,
                              lambda: split_fc2(t2.numpy()))
        prefix, name = node.name.rsplit("/", 1)
        s = Scoped(op, prefix)
        return s.MoE(x, self.logits(op, s, logits, **kw), w1, None, w2, _domain=ORT_DOMAIN, _what=name, **attrs)

    def logits(self, op, s, logits, **_) -> ir.Value:
        return s.Concat(*([logits] * SPLIT), axis=-1, _what="router_halves")


class MoEHalvesFromRouter(MoEHalves):
    """The same when the logits come from MatMul(a, R), R an initializer only it reads: R's columns are
    repeated instead, so the duplicated logits cost no extra node."""

    def pattern(self, op, x, a, r, fc1, fc2):
        logits = op.MatMul(a, r, _outputs=["logits"])
        return op.MoE(x, logits, fc1, None, fc2, _domain=ORT_DOMAIN, _allow_other_attributes=True, _outputs=["y"])

    def check(self, op, r, logits, **kw) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if r.const_value is None or static_dims(r, 2) is None or None in static_dims(r, 2) or len(r.uses()) != 1:
            return result.fail(f"router weight {r.name} is not a 2-D initializer read once", r)
        if len(logits.uses()) != 1 or logits.is_graph_output():
            return result.fail(f"{logits.name} has other readers", logits)
        return super().check(op, logits=logits, **kw)

    def logits(self, op, s, logits, a=None, r=None, **_) -> ir.Value:
        prefix, name = logits.producer().name.rsplit("/", 1)
        return Scoped(op, prefix).MatMul(a, _wide_router(op, r), _what=name)


moe_split_rules = pattern.RewriteRuleSet([MoEHalvesFromRouter.rule(), MoEHalves.rule()])


def fuse_moe_split(model: ir.Model) -> int:
    """Split every float MoE's experts into halves (one per thread); return how many MoE nodes."""
    return apply(moe_split_rules, model)
