"""Small helpers over onnx_ir values shared by the passes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def const(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents (initializer or Constant node output), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if (
        node is not None
        and node.op_type == "Constant"
        and node.domain in ("", "ai.onnx")
        and "value" in node.attributes
    ):
        return node.attributes["value"].as_tensor().numpy()
    return None


def scalar(value: ir.Value | None) -> float | None:
    array = const(value)
    return float(array.reshape(-1)[0]) if array is not None and array.size == 1 else None


def producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    """The node producing `value` if it is a standard-domain `op_type`."""
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None
