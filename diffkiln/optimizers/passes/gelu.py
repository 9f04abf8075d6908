"""GELU fusion: the exact (erf) GELU as exporters write it,

    y = 0.5 · x · (1 + erf(x / √2))      (any association of the two products)

rewritten to one op: com.microsoft Gelu (ONNX Runtime's CPU kernel) for `ort-cpu`, ONNX Gelu (opset ≥ 20) for
`tensorrt`. In diffusers' GEGLU feed-forward this is the gate's activation: `h · gelu(gate)`.
"""

from __future__ import annotations

import math

import onnx_ir as ir
from onnxscript.rewriter import pattern

from diffkiln.optimizers.passes._ir import scalar


class ErfGelu(pattern.RewriteRuleClassBase):
    def __init__(self, domain: str, variant: int):
        super().__init__(name=f"erf_gelu_{variant}")
        self.domain, self.variant = domain, variant

    def pattern(self, op, x, half, sqrt2, one):
        erf = op.Add(op.Erf(op.Div(x, sqrt2)), one)
        if self.variant == 0:
            return op.Mul(op.Mul(x, erf), half)  # torch's TorchScript export: (x · (erf + 1)) · 0.5
        return op.Mul(x, op.Mul(erf, half))

    def check(self, context, half, sqrt2, one, **_):
        result = pattern.MatchResult()
        values = (scalar(half), scalar(sqrt2), scalar(one))
        if None in values or not _close(values, (0.5, math.sqrt(2), 1.0)):
            return result.fail(f"constants {values} are not (0.5, √2, 1)")
        return result

    def rewrite(self, op, x, **_):
        return op.Gelu(x, _domain=self.domain) if self.domain else op.Gelu(x)


def _close(values, expected) -> bool:
    return all(abs(v - e) <= 1e-3 * abs(e) for v, e in zip(values, expected, strict=True))


def fuse_gelu(model: ir.Model, domain: str) -> int:
    """`domain` "com.microsoft" or "" (standard ONNX Gelu, needs opset 20)."""
    rules = [ErfGelu.rule(domain, variant) for variant in (0, 1)]
    return pattern.RewriteRuleSet(rules, commute=True).apply_to_model(model)
