"""ONNX symbolics the TorchScript exporter lacks, registered before a trace (imports torch).

`aten::rms_norm` (torch.nn.RMSNorm: Flux's and SD3's q/k norms) has no ONNX form below opset 23's
RMSNormalization, and torch's exporter refuses it; this is its definition in plain ops, over the last
len(normalized_shape) axes:  y = x / sqrt(mean(x²) + eps) · weight  (eps None: the dtype's machine epsilon).
Written here because neither torch nor onnxscript offer it for the TorchScript exporter at opsets 14-20.
"""

from __future__ import annotations

_REGISTERED: set[int] = set()


def register(opset: int) -> None:
    import torch
    from torch.onnx import register_custom_op_symbolic, symbolic_helper

    if opset in _REGISTERED:
        return

    def rms_norm(g, x, normalized_shape, weight, eps):
        shape = symbolic_helper._get_const(normalized_shape, "is", "normalized_shape")
        value = symbolic_helper._maybe_get_const(eps, "f")
        eps_value = float(torch.finfo(torch.float32).eps) if value is None or symbolic_helper._is_none(eps) else value
        axes = list(range(-len(shape), 0))
        mean = g.op("ReduceMean", g.op("Mul", x, x), axes_i=axes, keepdims_i=1)
        eps_const = g.op("Constant", value_t=torch.tensor(eps_value, dtype=torch.float32))
        y = g.op("Div", x, g.op("Sqrt", g.op("Add", mean, eps_const)))
        return y if symbolic_helper._is_none(weight) else g.op("Mul", y, weight)

    register_custom_op_symbolic("aten::rms_norm", rms_norm, opset)
    _REGISTERED.add(opset)
