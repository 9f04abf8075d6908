"""SmoothQuant for the linear layers (Xiao et al., 2023): move activation outliers into the weights before INT8.

Pattern: a MatMul with a constant weight W [K, N] fed by activation X [..., K] (the q/k/v projections share one
X, and so one smoothing). With a_k = max |X[..., k]| over the calibration inputs and w_k = max |W[k, :]| over
every consumer's weight, s_k = a_k^α / w_k^(1−α); X becomes X·(1/s) through one inserted Mul and each W becomes
diag(s)·W, so the product is unchanged in exact arithmetic while X's per-tensor int8 scale no longer serves its
largest channel only. Never: Conv (its input channels are not a last axis), a MatMul of two activations, a kept
layer. Written by hand: ONNX Runtime's SmoothQuant needs Intel Neural Compressor, not installable here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

SCALE_RANGE = (1e-4, 1e4)


def groups(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> dict[str, tuple[list[str], int]]:
    """activation tensor → (its MatMul consumers to smooth, K). Other readers of the tensor keep reading it
    unchanged: the smoothed copy feeds the MatMuls only."""
    weights = {t.name: t for t in model.graph.initializer}
    matmuls: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        if n.op_type == "MatMul" and n.input[1] in weights and len(weights[n.input[1]].dims) == 2:
            matmuls.setdefault(n.input[0], []).append(n)
    result = {}
    for x, consumers in matmuls.items():
        ks = {weights[n.input[1]].dims[0] for n in consumers}
        if len(ks) == 1:
            result[x] = ([n.name for n in consumers], ks.pop())
    return result


def smooth(
    src: Path,
    dst: Path,
    plan: dict[str, tuple[list[str], int]],
    channel_amax: dict[str, np.ndarray],
    alpha: float,
    save,
) -> dict[str, tuple[str, np.ndarray]]:
    """Write the smoothed graph; returns X → (the smoothed tensor's name, s)."""
    model = onnx.load(str(src))
    weights = {t.name: t for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    done = {}
    new_nodes = []
    for x, (consumers, _k) in plan.items():
        a = np.max(channel_amax[x], axis=0)
        w = np.max([np.max(np.abs(numpy_helper.to_array(weights[by_name[c].input[1]])), axis=1) for c in consumers], 0)
        s = np.clip(np.maximum(a, 1e-8) ** alpha / np.maximum(w, 1e-8) ** (1 - alpha), *SCALE_RANGE).astype(np.float32)
        for c in consumers:
            tensor = weights[by_name[c].input[1]]
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * s[:, None], tensor.name))
        smoothed, inverse = x + "__smooth", x + "__smooth_inv"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inverse))
        new_nodes.append((x, helper.make_node("Mul", [x, inverse], [smoothed], name=smoothed + "_mul")))
        for c in consumers:
            by_name[c].input[0] = smoothed
        done[x] = (smoothed, s)
    # each Mul right after its input's producer keeps the graph topologically sorted
    position = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    nodes = list(model.graph.node)
    for x, node in sorted(new_nodes, key=lambda item: -position.get(item[0], -1)):
        nodes.insert(position.get(x, -1) + 1, node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    save(model, dst)
    return done


def smoothed_amax(channel_amax: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Per-sample max |X/s| from the per-sample, per-channel max |X|."""
    return np.max(channel_amax / s[None, :], axis=1)
