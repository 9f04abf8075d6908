"""Cleanup: constant folding, shape inference, no-op removal (Identity, Cast to the same type, x·1, x+0, …)
and dead-node elimination, via onnxscript's optimizer — which works on onnx_ir models whose big weights stay
lazily on disk, so it is safe on external-data (> 2 GB) graphs.

Returns how many nodes the graph lost.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer


def cleanup(model: ir.Model) -> int:
    before = _count(model)
    # fold only small constants: a folded 1280×1280 weight would double memory and disk for no gain
    onnxscript.optimizer.optimize(model, input_size_limit=1 << 16, output_size_limit=1 << 16)
    common.RemoveUnusedNodesPass()(model)
    common.RemoveUnusedOpsetsPass()(model)
    return before - _count(model)


def _count(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
