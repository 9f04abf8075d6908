"""Per-tensor magnitudes of a graph on real inputs: max |x| of chosen tensors, one figure per input sample.

ONNX Runtime's calibrators collect whole intermediate tensors (gigabytes for an sd15 UNet at 512²) and merge them
over all samples; we need one amax per tensor *per sample* (per denoising step) to take a percentile over steps,
so the graph gets a `ReduceMax(Abs(x))` scalar output per tensor and runs once per sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from diffkiln.errors import library_errors
from diffkiln.runtime.runners import OrtOptions, session_from_onnx

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
SUFFIX = "__diffkiln_amax"


def inferred_value_info(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Every tensor's type and shape. ONNX Runtime's symbolic shape inference knows its com.microsoft ops (onnx's
    own stops at the first MultiHeadAttention and leaves everything after it untyped); it needs the small
    constant initializers' values, so a graph whose shape constants are external falls back to onnx's."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]  # stale types (a converter's) would contradict inference
    try:
        inferred = SymbolicShapeInference.infer_shapes(bare, auto_merge=True, guess_output_rank=True)
        if inferred is not None:
            return list(inferred.graph.value_info)
    except Exception:
        pass
    for t in bare.graph.initializer:  # the weights are not needed, and a >2 GB proto cannot be inferred
        if t.data_location == TensorProto.EXTERNAL or len(t.raw_data) > 1 << 16:
            t.ClearField("raw_data")
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
    return list(onnx.shape_inference.infer_shapes(bare, strict_mode=False).graph.value_info)


def float_tensors(model: onnx.ModelProto) -> dict[str, int]:
    """name → element type of every float tensor a node produces."""
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred_value_info(model), *model.graph.output)}
    produced = {o for n in model.graph.node for o in n.output if o}
    return {name: t for name, t in types.items() if name in produced and t in FLOAT_TYPES}


def amax_per_sample(
    path: Path,
    tensors: Iterable[str],
    feeds: list[dict[str, np.ndarray]],
    log: Callable[[str], None] = lambda _: None,
    channels: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """tensor → float64 [len(feeds)] of max |x| for each feed; for the tensors in `channels` (name → size of the
    last axis), [len(feeds), size]: max |x| per last-axis channel (SmoothQuant's input channels). The augmented
    graph is written beside `path` (so external weights resolve) and removed afterwards; `path` must lie in a
    folder we own (the staging dir)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    names = [t for t in dict.fromkeys(tensors)]
    channels = channels or {}
    existing = {o.name for o in model.graph.output}
    for name in names:
        amax = name + SUFFIX
        nodes = [helper.make_node("Abs", [name], [amax + "_abs"])]
        if name in channels:  # [..., C] → [-1, C] → max over rows: one figure per channel
            shape = amax + "_shape"
            model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1, channels[name]]), shape))
            nodes.append(helper.make_node("Reshape", [amax + "_abs", shape], [amax + "_rows"]))
            nodes.append(_reduce_rows(model, amax + "_rows", amax + "_max"))
        else:
            nodes.append(helper.make_node("ReduceMax", [amax + "_abs"], [amax + "_max"], keepdims=0))
        nodes.append(helper.make_node("Cast", [amax + "_max"], [amax], to=TensorProto.FLOAT))
        model.graph.node.extend(nodes)
        if amax not in existing:
            dims = [channels[name]] if name in channels else []
            model.graph.output.append(helper.make_tensor_value_info(amax, TensorProto.FLOAT, dims))
    augmented = path.with_name(path.stem + ".amax.onnx")
    try:
        onnx.save(model, str(augmented))
        del model
        with library_errors(f"ONNX Runtime cannot run {path} for calibration", "re-export the kiln dir"):
            session = session_from_onnx(augmented, OrtOptions(optimization="basic"))
            outputs = [n + SUFFIX for n in names]
            rows = []
            for i, feed in enumerate(feeds):
                feed = fit_inputs(session, feed)
                rows.append([np.asarray(v, dtype=np.float64) for v in session.run(outputs, feed)])
                if (i + 1) % 10 == 0 or i + 1 == len(feeds):
                    log(f"  calibration: {i + 1}/{len(feeds)} samples")
        session = None
    finally:
        with contextlib.suppress(OSError):
            augmented.unlink()
    return {name: np.stack([row[i] for row in rows]) if rows else np.zeros(0) for i, name in enumerate(names)}


def _reduce_rows(model: onnx.ModelProto, x: str, out: str) -> onnx.NodeProto:
    """ReduceMax over axis 0: an attribute up to opset 17, an input from 18 on."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    if opset < 18:
        return helper.make_node("ReduceMax", [x], [out], axes=[0], keepdims=0)
    axes = out + "_axes"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0]), axes))
    return helper.make_node("ReduceMax", [x, axes], [out], keepdims=0)


def fit_inputs(session, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`feed` with fp32 arrays cast to fp16 where the session's graph takes fp16 (an --fp16-io graph)."""
    half = {i.name for i in session.get_inputs() if i.type == "tensor(float16)"}
    return {k: v.astype(np.float16) if k in half else v for k, v in feed.items()}


def over_steps(per_sample: np.ndarray, percentile: float) -> float:
    """One amax from per-step figures: the `percentile` over samples (100 = their max). Timestep-aware as
    NVIDIA's diffusion recipe: a rare step's outlier does not set the scale every other step pays for."""
    return float(np.percentile(per_sample, percentile)) if per_sample.size else 0.0
