"""INT8 as explicit QuantizeLinear/DequantizeLinear in the graph (what TensorRT builds strongly typed, and what
ONNX Runtime and OpenVINO fold into their int8 kernels).

Pattern: the activation input and the constant weight of every Conv, MatMul and Gemm whose weight is an
initializer get Q/DQ — weights symmetric int8, zero point 0, per channel (Conv/Gemm axis 0, MatMul the output
axis 1); activations per tensor with one shared Q/DQ per tensor (the q/k/v projections' common input gets one),
symmetric int8 (zero point 0, TensorRT's only form) or, for ONNX Runtime's x86 kernels, uint8 centred on 128;
for ONNX Runtime also the Conv outputs (its QLinearConv needs them).
Never: a MatMul of two activations (attention's QKᵀ and ·V: INT8 attention is not a TensorRT path, and no Q/DQ
touches Softmax), biases (kept float), node outputs. Not by default (`KEEP`, NVIDIA's SD recipes): the time and
added embeddings, conv_in, conv_out, conv_shortcut and proj_out, plus whatever `exclude` names.

ONNX Runtime's `quantize_static` places the Q/DQ (one well-kept implementation of the placement rules); the
ranges it would calibrate itself (min/max merged over all samples) are replaced by ours — a percentile over
denoising steps of each step's amax (stats.py) — handed over as its calibration cache, its public way to take
precomputed ranges.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from diffkiln.errors import library_errors

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
# Higher precision by default: where NVIDIA's SD INT8 recipes keep it (small layers, big error)
KEEP = {
    "time_embedding": "time embedding: tiny GEMMs, and every block's scale and shift depend on it",
    "time_emb_proj": "per-block timestep projection: tiny GEMMs that set each ResNet's shift",
    "add_embedding": "SDXL's added size/text embedding: tiny GEMMs",
    "conv_in": "first conv: 4-channel latent input, no speed to gain, error enters every block",
    "conv_out": "last conv: its error goes straight into the noise prediction",
    "conv_shortcut": "ResNet shortcut: the residual path's precision",
    "proj_out": "transformer output projection: adds straight onto the residual stream",
}


def quantizable_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Conv/MatMul/Gemm nodes whose second input (the weight) is an initializer."""
    weights = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in QUANTIZED_OPS and len(n.input) > 1 and n.input[1] in weights]


def kept_reason(node_name: str, patterns: dict[str, str]) -> str | None:
    """Why a node stays in float, when one of `patterns` (module-path fragments) names it."""
    for pattern, why in patterns.items():
        if re.search(rf"(^|/){re.escape(pattern)}([./_]|$)", node_name) or pattern == node_name:
            return why
    return None


def activation_inputs(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[str]:
    return list(dict.fromkeys(n.input[0] for n in nodes))


def quantize(
    src: Path,
    dst: Path,
    amax: dict[str, float],
    exclude: list[str],
    *,
    activation_type: str = "int8",
    quantized_outputs: tuple[str, ...] = (),
    log: Callable[[str], None] = lambda _: None,
) -> None:
    """Write `src` with Q/DQ into `dst`: `amax` maps each activation tensor to its calibrated max |x|; nodes
    named in `exclude` stay float. `quantized_outputs`: op types whose outputs get Q/DQ too (ONNX Runtime's CPU
    int8 Conv, QLinearConv, only forms around a quantized output; its MatMul does without)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    ranges = {}
    for name, value in amax.items():
        value = max(float(value), 1e-8)
        # |x| ≤ value is all we record: symmetric for int8 (zero point 0), and centred (zero point 128) for uint8
        ranges[name] = TensorData(lowest=np.float32(-value), highest=np.float32(value))
    model = onnx.load(str(src), load_external_data=False)
    candidates = quantizable_nodes(model)
    chosen = [n.name for n in candidates if n.name not in set(exclude)]
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    del model
    with tempfile.TemporaryDirectory(prefix=".diffkiln-calib-", dir=dst.parent) as tmp:
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), cache)
        with library_errors(f"cannot quantize {src}", "re-export the kiln dir, or keep it in --precision fp32"):
            quantize_static(
                str(src),
                str(dst),
                None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS),
                per_channel=True,
                activation_type=QuantType.QInt8 if activation_type == "int8" else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=chosen,
                use_external_data_format=external,
                calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=cache,
                extra_options={
                    "ActivationSymmetric": activation_type == "int8",
                    "WeightSymmetric": True,
                    "QuantizeBias": False,
                    "MatMulConstBOnly": True,
                    "DedicatedQDQPair": False,
                    "OpTypesToExcludeOutputQuantization": [op for op in QUANTIZED_OPS if op not in quantized_outputs],
                    "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                },
            )
    log(f"  int8: Q/DQ on {len(chosen)} of {len(candidates)} Conv/MatMul/Gemm nodes with constant weights")


def write_json(path: Path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
