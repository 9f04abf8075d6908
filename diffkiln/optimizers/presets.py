"""Which passes run for which target, in which order, and which form each fusion takes there.

- `ort-cpu`: ops ONNX Runtime's CPU provider really runs fast. Attention → com.microsoft MultiHeadAttention (see
  `ort_cpu_attention` for the measured choice), GELU → com.microsoft Gelu; GroupNorm stays as torch exports it
  (InstanceNormalization), which ORT's CPU kernels run faster than any fused form (none has a CPU kernel).
- `tensorrt`: standard ONNX only, at opset 21: attention in the MatMul → Mul → Softmax → MatMul form TensorRT's
  MHA fusion recognizes, GroupNormalization, ONNX Gelu.
"""

from __future__ import annotations

from functools import partial

import onnx_ir as ir
import onnxscript.version_converter

from diffkiln.errors import DiffkilnError
from diffkiln.optimizers.manager import Pass
from diffkiln.optimizers.passes.attention import fuse_attention
from diffkiln.optimizers.passes.cleanup import cleanup
from diffkiln.optimizers.passes.gelu import fuse_gelu
from diffkiln.optimizers.passes.groupnorm import fuse_groupnorm
from diffkiln.optimizers.passes.layernorm import fuse_layernorm

TARGETS = ("ort-cpu", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
# what --precision converts unless --components says otherwise: fp16 everything, int8 the UNet (where the time is)
PRECISION_COMPONENTS = {
    "fp16": ("text_encoder", "text_encoder_2", "unet", "transformer", "vae_decoder", "vae_encoder"),
    "int8": ("unet", "transformer"),
}
TENSORRT_OPSET = 21


def ort_cpu_attention(facts: dict) -> str:
    """MultiHeadAttention for every attention kind: measured fastest here for UNet self-attention (4096 tokens:
    0.99 s vs ONNX Attention 1.21 s vs unfused 1.33 s per batch-2 call), cross-attention and the VAE mid-block
    (benchmarks/attention_forms.py); the whole sd15 UNet: MHA 6.02 s, ONNX Attention 6.31 s, unfused 6.57 s
    (benchmarks/optimize_unet.py). Only 64-token attentions favour ONNX Attention, by microseconds."""
    return "mha"


def tensorrt_attention(facts: dict) -> str:
    return "canonical"


def to_opset(version: int) -> Pass:
    def convert(model: ir.Model) -> int:
        current = model.opset_imports.get("", 0)
        if current >= version:
            return 0
        onnxscript.version_converter.convert_version(model, version)
        if current < 18 <= version:
            _reduce_axes_as_inputs(model)
        return 1

    return convert


# opset 18 moved `axes` of these from an attribute to an input (ReduceSum did at 13)
REDUCE_18 = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
             "ReduceLogSumExp", "ReduceSumSquare"}  # fmt: skip


def _reduce_axes_as_inputs(model: ir.Model) -> None:
    """The opset-18 adapter onnxscript's converter lacks (it leaves `axes` attributes, which opset 18 rejects):
    each Reduce* `axes` attribute becomes an int64 initializer input. T5's RMS norm (Flux's text_encoder_2)
    exports as Pow → ReduceMean; SD graphs have no such node."""
    import numpy as np

    for node in list(model.graph):
        if node.op_type in REDUCE_18 and node.domain in ("", "ai.onnx") and "axes" in node.attributes:
            axes = node.attributes.pop("axes").as_ints()
            value = ir.Value(name=f"{node.name or node.op_type}_axes", const_value=ir.tensor(np.array(axes, np.int64)))
            model.graph.register_initializer(value)
            node.resize_inputs(2)
            node.replace_input_with(1, value)


def preset(target: str, precision: str = "fp32", attention: str | None = None) -> list[tuple[str, Pass]]:
    """The ordered (name, pass) list for a target; cleanup runs first (folds the shape chains the fusions read)
    and last (drops what the fusions left dead). `attention` forces one attention form ("mha", "canonical",
    "keep") for every attention — the benchmarks compare them with it."""
    if target not in TARGETS:
        raise DiffkilnError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if precision not in PRECISIONS:
        raise DiffkilnError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    forced = (lambda facts: attention) if attention else None
    if target == "ort-cpu":
        upgrade = [("opset-23", to_opset(23))] if attention == "onnx" else []  # ONNX Attention is opset 23
        return [
            *upgrade,
            ("cleanup", cleanup),
            ("layernorm", fuse_layernorm),
            ("attention", partial(fuse_attention, choose=forced or ort_cpu_attention)),
            ("gelu", partial(fuse_gelu, domain="com.microsoft")),
            ("final-cleanup", cleanup),
        ]
    return [
        (f"opset-{TENSORRT_OPSET}", to_opset(TENSORRT_OPSET)),
        ("cleanup", cleanup),
        ("layernorm", fuse_layernorm),
        ("attention", partial(fuse_attention, choose=forced or tensorrt_attention)),
        ("groupnorm", fuse_groupnorm),
        ("gelu", partial(fuse_gelu, domain="")),
        ("final-cleanup", cleanup),
    ]
