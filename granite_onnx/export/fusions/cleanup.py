"""Tidy a fused graph: drop what the fusions orphaned, fold small constants, merge duplicates.

Runs after the fusions (which leave the portable functions, the old expert/conv weights and the
per-layer copies of the mask arithmetic behind). It is onnxscript's optimizer pipeline with two
changes, for big models and for our call nodes:

* no inlining — a call node a fusion refused (see its reason) stays a readable call, and ONNX Runtime
  inlines it itself;
* constant folding and initializer de-duplication only look at tensors up to `size_limit` elements,
  so the weights (external data, possibly tens of GB) are never read into memory.

Redundant casts, reshapes and transposes go through onnxscript's default rewrite rules
(Reshape∘Reshape, Transpose∘Transpose, Cast∘Cast, identity Cast/Expand/Transpose, ...).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript import rewriter
from onnxscript.optimizer import _constant_folding

# Folding reads tensors up to this many elements (small shape/mask/scalar constants and per-head
# vectors such as A = −exp(A_log)); every weight matrix is larger and is left untouched.
FOLD_SIZE_LIMIT = 8192


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Quiet the optimizer passes below WARNING: at INFO they log every de-duplicated constant, every
    contrib op they have no schema for (with a stack trace) and every graph output they keep — all
    expected here."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def cleanup(model: ir.Model, *, size_limit: int = FOLD_SIZE_LIMIT, iterations: int = 2) -> int:
    """Clean `model` in place; return how many nodes and functions it removed (net)."""
    before = sum(1 for _ in model.graph.all_nodes()) + len(model.functions)
    passes = ir.passes.Sequential(
        ir.passes.PassManager(
            [
                _constant_folding.FoldConstantsPass(
                    shape_inference=True, input_size_limit=size_limit, output_size_limit=size_limit,
                    should_fold=lambda node: None),
                rewriter.RewritePass(rewriter._DEFAULT_REWRITE_RULES),
                common.RemoveUnusedNodesPass(),
                common.RemoveUnusedFunctionsPass(),
                common.RemoveUnusedOpsetsPass(),
            ],
            steps=iterations,
            early_stop=True,
        ),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(size_limit=size_limit),
        # the fusions build the same seqlens/bias arithmetic once per attention layer: share it
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.NameFixPass(),
    )
    with _quiet("onnx_ir.passes", "onnxscript.optimizer", "onnxscript.rewriter"):
        passes(model)
    after = sum(1 for _ in model.graph.all_nodes()) + len(model.functions)
    return before - after
