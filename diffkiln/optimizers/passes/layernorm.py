"""LayerNorm fusion: the decomposed form some exporters write (opset < 17, hand-written norms),

    d = x − ReduceMean(x, [-1]);  y = d / √(ReduceMean(d·d, [-1]) + ε) · γ [+ β]     (or d · 1/√…)

rewritten to ONNX LayerNormalization(x, γ, β, axis=-1, ε) — ONNX Runtime's CPU kernel and TensorRT's native
layer. torch's exporter already emits LayerNormalization at opset ≥ 17, so on diffkiln's own exports this
finds nothing; it is for graphs from elsewhere. Only the last axis, with keepdims (the op's default).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from diffkiln.optimizers.passes._ir import const, scalar


class DecomposedLayerNorm(pattern.RewriteRuleClassBase):
    def __init__(self, with_bias: bool):
        super().__init__(name="layer_norm_bias" if with_bias else "layer_norm", remove_nodes=False)
        self.with_bias = with_bias

    def pattern(self, op, x, axes1, axes2, epsilon, gamma, beta):
        mean = op.ReduceMean(x, axes1, _outputs=["mean"])
        d = op.Sub(x, mean)
        var = op.ReduceMean(pattern.OrValue([op.Mul(d, d), op.Pow(d, 2.0)]), axes2, _outputs=["var"])
        std = op.Sqrt(op.Add(var, epsilon))
        normalized = pattern.OrValue([op.Div(d, std), op.Mul(d, op.Reciprocal(std))])
        y = op.Mul(normalized, gamma)
        return op.Add(y, beta) if self.with_bias else y

    def check(self, context, x, axes1, axes2, epsilon, gamma, mean, var, beta=None, **_):
        result = pattern.MatchResult()
        for axes in (axes1, axes2):
            values = const(axes)
            if values is None or values.reshape(-1).tolist() not in ([-1], [x.shape.rank() - 1] if x.shape else [-1]):
                return result.fail("the mean is not over the last axis only")
        for node in (mean.producer(), var.producer()):
            if node.attributes.get_int("keepdims", 1) != 1:
                return result.fail("ReduceMean drops the reduced axis")
        self._epsilon = scalar(epsilon)
        if self._epsilon is None:
            return result.fail("ε is not a constant scalar")
        for name, value in (("γ", gamma), ("β", beta)):
            if value is not None and (const(value) is None or const(value).ndim != 1):
                return result.fail(f"{name} is not a constant vector over the normalized axis")
        return result

    def rewrite(self, op, x, gamma, beta=None, **_):
        inputs = (x, gamma, beta) if self.with_bias else (x, gamma)
        return op.LayerNormalization(*inputs, axis=-1, epsilon=self._epsilon)


def fuse_layernorm(model: ir.Model) -> int:
    """Returns how many LayerNorms were fused. The bias-carrying form runs over the whole graph first: rules
    apply in node order, and the bias-free rule would otherwise claim the Mul before the Add is reached."""
    return sum(
        pattern.RewriteRuleSet([DecomposedLayerNorm.rule(with_bias)]).apply_to_model(model)
        for with_bias in (True, False)
    )
