"""Attention fusion: scaled-dot-product attention as torch's exporter writes it, for UNet self/cross attention,
the VAE mid-block and CLIP's causal self-attention.

Pattern (q, k, v are the projections [B, S, D] / [B, L, D]; H heads of size d = D / H):

    q4 = Transpose(Reshape(q, [B, S, H, d]), perm=[0, 2, 1, 3])           # (B, H, S, d)
    kT = Transpose(Reshape(k, [B, L, H, d]), perm=[0, 2, 3, 1])           # (B, H, d, L)
    v4 = Transpose(Reshape(v, [B, L, H, d]), perm=[0, 2, 1, 3])           # (B, H, L, d)
    p  = Softmax(MatMul(q4 · sq, kT · sk) [+ mask], axis=-1)              # sq · sk = scale = 1/√d
    y  = Reshape(Transpose(MatMul(p, v4) [→ Reshape], perm=[0, 2, 1, 3]), [B, S, D])   # (B, S, D)

Either H or d in the reshape targets may be -1 (diffusers writes H, transformers writes d); the other is a
constant and the query width D fixes both.

Joint attention (Flux's dual- and single-stream blocks): q, k, v arrive already split into heads, (B, S, H, d),
after the q/k RMS norms, the text/image concatenation and the rotary embedding, so the same pattern starts at the
Transposes (`JointAttention`); H and d come from q's inferred shape. A query that is a Reshape's output is the
first pattern's, never this one's.

The scales sq, sk are constants or torch's runtime chain `√(1/√d)` computed from the query's shape; both are
resolved to one number. Rewrites, chosen per target and per attention kind:
  - "mha": com.microsoft MultiHeadAttention(q, k, v, attention_bias=mask, num_heads=H, scale) — unpacked Q/K/V,
    which ONNX Runtime's CPU provider runs (packed QKV has no CPU kernel);
  - "onnx": ONNX Attention (opset ≥ 23) on the same 3-D q, k, v with q_num_heads = kv_num_heads = H;
  - "canonical": the same computation in standard ONNX as MatMul → Mul(constant scale) → [Add mask] → Softmax →
    MatMul, with the shape-computing chains gone: the form TensorRT's MHA fusion recognizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx_ir as ir
from onnxscript.rewriter import pattern

from diffkiln.optimizers.passes._ir import const, producer, scalar

SKIP_CASTS = ("Cast", "Identity")


class SdpaAttention(pattern.RewriteRuleClassBase):
    def __init__(self, choose: Callable[[dict], str]):
        # remove_nodes=False: the query transpose also feeds the scale chain (Shape); dead-node cleanup drops both
        super().__init__(name="sdpa_attention", remove_nodes=False)
        self.choose = choose  # attention facts → "mha" | "onnx" | "canonical" | "keep"

    def pattern(self, op, q, k, v, q_shape, k_shape, v_shape, q_scale, k_scale, mask, out_shape):
        q4 = op.Transpose(op.Reshape(q, q_shape), perm=[0, 2, 1, 3])
        kt = op.Transpose(op.Reshape(k, k_shape), perm=[0, 2, 3, 1])
        v4 = op.Transpose(op.Reshape(v, v_shape), perm=[0, 2, 1, 3])
        scores = op.MatMul(op.Mul(q4, q_scale), op.Mul(kt, k_scale))
        scores = pattern.OrValue([op.Add(scores, mask), scores], tag_var="has_mask", tag_values=[True, False])
        y = op.MatMul(op.Softmax(scores, axis=-1), v4)
        y = pattern.OrValue([op.Reshape(y, pattern.ANY_VALUE), y])  # transformers re-views (B, H, S, d)
        return op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), out_shape)

    def check(self, context, q, k, q_shape, k_shape, v_shape, q_scale, k_scale, mask, has_mask, **_):
        result = pattern.MatchResult()
        hidden = _last_dim(q)
        if hidden is None:
            return result.fail("the query width is unknown")
        heads = {_heads(s, hidden) for s in (q_shape, k_shape, v_shape)}
        if len(heads) != 1 or None in heads:
            return result.fail("the q/k/v reshapes do not split the width into one constant head count")
        self._heads = heads.pop()
        head_dim = hidden // self._heads
        sq, sk = _scale(q_scale, head_dim), _scale(k_scale, head_dim)
        if sq is None or sk is None:
            return result.fail("q/k scales are neither constants nor the √(1/√d) chain")
        self._scale = sq * sk
        cross = _source(q) is not _source(k)
        facts = {"heads": self._heads, "head_dim": head_dim, "has_mask": has_mask, "cross": cross}
        self._mode = self.choose(facts)
        if self._mode == "keep":
            return result.fail("target keeps this attention unfused")
        self._mask_rank = mask.shape.rank() if has_mask and mask.shape is not None else None
        if self._mode == "mha" and has_mask and self._mask_rank not in (2, 4):
            self._mode = "canonical"  # MultiHeadAttention's attention_bias must be (B|1, H|1, S, L)
        return result

    def rewrite(self, op, q, k, v, q_shape, k_shape, v_shape, mask, out_shape, has_mask, **_):
        bias = mask if has_mask else None
        if self._mode == "mha":
            if has_mask and self._mask_rank == 2:
                bias = op.Unsqueeze(mask, op.Constant(value=ir.tensor([0, 1], dtype=ir.DataType.INT64)))
            return op.MultiHeadAttention(
                q, k, v, None, None, bias, num_heads=self._heads, scale=self._scale, _domain="com.microsoft"
            )
        if self._mode == "onnx":
            return op.Attention(q, k, v, bias, q_num_heads=self._heads, kv_num_heads=self._heads, scale=self._scale)
        q4 = op.Transpose(op.Reshape(q, q_shape), perm=[0, 2, 1, 3])
        kt = op.Transpose(op.Reshape(k, k_shape), perm=[0, 2, 3, 1])
        v4 = op.Transpose(op.Reshape(v, v_shape), perm=[0, 2, 1, 3])
        scale = op.Constant(value=ir.tensor([self._scale], dtype=ir.DataType.FLOAT, name="attention_scale"))
        scores = op.Mul(op.MatMul(q4, kt), scale)
        if has_mask:
            scores = op.Add(scores, bias)
        y = op.MatMul(op.Softmax(scores, axis=-1), v4)
        return op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), out_shape)


class JointAttention(pattern.RewriteRuleClassBase):
    """SDPA over q, k, v already shaped (B, S, H, d): Flux's joint attention (see the module docstring)."""

    def __init__(self, choose: Callable[[dict], str]):
        super().__init__(name="joint_attention", remove_nodes=False)
        self.choose = choose

    def pattern(self, op, q, k, v, q_scale, k_scale, out_shape):
        q4 = op.Transpose(q, perm=[0, 2, 1, 3])
        kt = op.Transpose(k, perm=[0, 2, 3, 1])
        v4 = op.Transpose(v, perm=[0, 2, 1, 3])
        y = op.MatMul(op.Softmax(op.MatMul(op.Mul(q4, q_scale), op.Mul(kt, k_scale)), axis=-1), v4)
        return op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), out_shape)

    def check(self, context, q, k, v, q_scale, k_scale, **_):
        result = pattern.MatchResult()
        if producer(q, "Reshape") is not None:
            return result.fail("the query is a reshaped projection: the SD/CLIP attention pattern")
        split = _split_heads(q)
        if split is None:
            return result.fail("no reshape into heads found above the query")
        self._heads, head_dim = split
        sq, sk = _scale(q_scale, head_dim), _scale(k_scale, head_dim)
        if sq is None or sk is None:
            return result.fail("q/k scales are neither constants nor the √(1/√d) chain")
        self._scale = sq * sk
        self._mode = self.choose({"heads": self._heads, "head_dim": head_dim, "has_mask": False, "cross": False})
        return result.fail("target keeps this attention unfused") if self._mode == "keep" else result

    def rewrite(self, op, q, k, v, **_):
        # (B, S, H, d) → (B, S, H·d). Not the matched `out_shape`: torch computes it from the attention's own
        # output (Shape of the transposed result), which would keep the unfused attention alive beside the new one
        flat = op.Constant(value=ir.tensor([0, 0, -1], dtype=ir.DataType.INT64))
        if self._mode in ("mha", "onnx"):
            q3, k3, v3 = (op.Reshape(x, flat) for x in (q, k, v))
            if self._mode == "mha":
                return op.MultiHeadAttention(
                    q3, k3, v3, num_heads=self._heads, scale=self._scale, _domain="com.microsoft"
                )
            return op.Attention(q3, k3, v3, q_num_heads=self._heads, kv_num_heads=self._heads, scale=self._scale)
        scale = op.Constant(value=ir.tensor([self._scale], dtype=ir.DataType.FLOAT, name="attention_scale"))
        scores = op.Mul(op.MatMul(op.Transpose(q, perm=[0, 2, 1, 3]), op.Transpose(k, perm=[0, 2, 3, 1])), scale)
        y = op.MatMul(op.Softmax(scores, axis=-1), op.Transpose(v, perm=[0, 2, 1, 3]))
        return op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), flat)


def _split_heads(value: ir.Value, depth: int = 16) -> tuple[int, int] | None:
    """(H, d) of a (B, S, H, d) tensor: its static shape, else the Reshape that split a projection into heads,
    found by walking up through the element-wise ops between them (norms, Concat of text and image, rotary)."""
    shape = value.shape
    if shape is not None and shape.rank() == 4 and all(isinstance(d, int) and d > 0 for d in shape[2:]):
        return shape[2], shape[3]
    node = value.producer()
    for _ in range(depth):
        if node is None:
            return None
        if node.op_type == "Reshape":
            hidden = _last_dim(node.inputs[0])
            heads = _heads(node.inputs[1], hidden) if hidden else None
            return (heads, hidden // heads) if heads else None
        if node.op_type not in ("Add", "Mul", "Div", "Cast", "Concat", "Identity"):
            return None
        data = [i for i in node.inputs if i is not None and const(i) is None and i.producer() is not None]
        node = data[0].producer() if data else None
    return None


def _heads(shape: ir.Value, hidden: int) -> int | None:
    """H from a reshape target [B, S, H, d] (a constant, or a Concat ending in H, d) where H or d is a constant."""
    folded = const(shape)
    if folded is not None and folded.size == 4:
        h, d = (float(x) for x in folded[2:])
    else:
        # [B, S, H, d], or torch's unflatten: [Shape(x)[:-1], [H, d], Shape(x)[-1+1:] (empty)]
        concat = producer(shape, "Concat")
        if concat is None or len(concat.inputs) < 2:
            return None
        pairs = [c for c in (const(i) for i in concat.inputs) if c is not None and c.size == 2]
        if len(pairs) == 1:
            h, d = (float(x) for x in pairs[0].reshape(-1))
        elif len(concat.inputs) == 4:
            h, d = scalar(concat.inputs[2]), scalar(concat.inputs[3])
        else:
            return None
    if h is not None and h > 0 and hidden % h == 0:
        return int(h)
    if d is not None and d > 0 and hidden % d == 0:
        return hidden // int(d)
    return None


def _source(projection: ir.Value) -> ir.Value | None:
    """The input a q/k projection was computed from (self-attention: the same for both)."""
    node = projection.producer()
    while node is not None and node.op_type in ("Add", "MatMul"):
        data = next((i for i in node.inputs if i is not None and const(i) is None), None)
        if node.op_type == "MatMul":
            return data
        node = data.producer() if data is not None else None
    return None


def _last_dim(value: ir.Value) -> int | None:
    """Static last dimension of a projection output: from shape inference, else from its weight matrix."""
    if value.shape is not None and value.shape.rank() and isinstance(value.shape[-1], int):
        return value.shape[-1]
    node = value.producer()
    while node is not None and node.op_type == "Add":  # MatMul + bias
        node = next((i.producer() for i in node.inputs if i is not None and const(i) is None), None)
    if node is None or node.op_type != "MatMul":
        return None
    weight = const(node.inputs[1])
    return int(weight.shape[-1]) if weight is not None and weight.ndim == 2 else None


def _strip(value: ir.Value | None) -> ir.Value | None:
    while value is not None and (node := value.producer()) is not None and node.op_type in SKIP_CASTS:
        value = node.inputs[0]
    return value


def _scale(value: ir.Value, head_dim: int) -> float | None:
    """A constant scale, or torch's `Sqrt(Div(c, Sqrt(Cast(Slice(Shape(q), -1)))))` = √(c/√d)."""
    constant = scalar(value)
    if constant is not None:
        return constant
    outer = producer(_strip(value), "Sqrt")
    div = producer(_strip(outer.inputs[0]), "Div") if outer else None
    c = scalar(div.inputs[0]) if div else None
    inner = producer(_strip(div.inputs[1]), "Sqrt") if div else None
    sliced = producer(_strip(inner.inputs[0]), "Slice") if inner else None
    if c is None or sliced is None or producer(sliced.inputs[0], "Shape") is None:
        return None
    return math.sqrt(c / math.sqrt(head_dim))


def fuse_attention(model: ir.Model, choose: Callable[[dict], str]) -> int:
    """Rewrite every matching attention per `choose(facts)`; returns how many were rewritten."""
    return pattern.RewriteRuleSet([SdpaAttention.rule(choose), JointAttention.rule(choose)]).apply_to_model(model)
