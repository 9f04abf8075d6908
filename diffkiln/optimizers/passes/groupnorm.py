"""GroupNorm fusion: torch's export of GroupNorm through InstanceNormalization,

    n = InstanceNormalization(Reshape(x, [B, G, -1]), scale=1ᴳ, bias=0ᴳ, ε)
    y = Reshape(n, Shape(x)) · γ[C,1,1] + β[C,1,1]      (γ, β [C,1] for 3-D x: the VAE attention's norm)

rewritten to ONNX GroupNormalization(x, γ[C], β[C], ε, num_groups=G) — opset 21 semantics (per-channel scale),
so the graph must be at opset ≥ 21. TensorRT runs it as one normalization layer. (ONNX Runtime's CPU provider has
no fused kernel for it — neither for com.microsoft GroupNorm — so `ort-cpu` keeps the InstanceNormalization form.)
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from diffkiln.optimizers.passes._ir import const


class InstanceNormGroupNorm(pattern.RewriteRuleClassBase):
    def __init__(self):
        super().__init__(name="group_norm", remove_nodes=False)  # Shape(x) may feed other nodes

    def pattern(self, op, x, groups_shape, ones, zeros, gamma, beta):
        n = op.InstanceNormalization(op.Reshape(x, groups_shape), ones, zeros, _outputs=["n"])
        return op.Add(op.Mul(op.Reshape(n, op.Shape(x)), gamma), beta)

    def check(self, context, x, ones, zeros, gamma, beta, n, **_):
        result = pattern.MatchResult()
        unit, zero, g, b = (const(v) for v in (ones, zeros, gamma, beta))
        if unit is None or zero is None or not (np.all(unit == 1) and np.all(zero == 0)):
            return result.fail("the instance norm's own scale/bias are not 1 and 0")
        if g is None or b is None or g.ndim < 2 or set(g.shape[1:]) != {1} or b.shape != g.shape:
            return result.fail("γ/β are not constants of shape [C, 1, …]")
        if g.shape[0] % unit.size:
            return result.fail(f"{g.shape[0]} channels do not split into {unit.size} groups")
        self._groups, self._gamma, self._beta = unit.size, g.reshape(-1), b.reshape(-1)
        self._epsilon = n.producer().attributes.get_float("epsilon", 1e-5)
        return result

    def rewrite(self, op, x, **_):
        return op.GroupNormalization(
            x,
            op.Constant(value=ir.tensor(self._gamma)),
            op.Constant(value=ir.tensor(self._beta)),
            epsilon=self._epsilon,
            num_groups=self._groups,
        )


def fuse_groupnorm(model: ir.Model) -> int:
    opset = model.opset_imports.get("", 0)
    if opset < 21:
        raise ValueError(f"GroupNormalization fusion needs opset ≥ 21, the graph has {opset}")
    return pattern.RewriteRuleSet([InstanceNormGroupNorm.rule()]).apply_to_model(model)
