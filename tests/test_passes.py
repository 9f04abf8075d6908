"""Each pass on a tiny graph built in code: the exact ops after the rewrite, ONNX Runtime parity on random
inputs, and a case that must not fire."""

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from diffkiln.optimizers.manager import op_counts, run_passes
from diffkiln.optimizers.passes.attention import fuse_attention
from diffkiln.optimizers.passes.cleanup import cleanup
from diffkiln.optimizers.passes.gelu import fuse_gelu
from diffkiln.optimizers.passes.groupnorm import fuse_groupnorm
from diffkiln.optimizers.passes.layernorm import fuse_layernorm
from diffkiln.parity import diff

RNG = np.random.default_rng(0)
F = TensorProto.FLOAT


def const(name, array):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name))


def model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(proto)
    return proto


def run(proto, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString()).run(None, feeds)


def rewrite(proto, fn, *args):
    m = ir.from_proto(proto)
    count = fn(m, *args)
    cleanup(m)
    return count, ir.to_proto(m)


def ops(proto):
    return dict(op_counts(ir.from_proto(proto)))


def assert_parity(a, b, feeds, threshold=1e-5):
    for x, y in zip(run(a, feeds), run(b, feeds), strict=True):
        assert diff(y, x).rel <= threshold


# --------------------------------------------------------------------------------------------------- attention


def attention_graph(heads=2, head_dim=4, cross=False, dynamic_scale=True, mask=False, heads_in_shape=True, opset=17):
    """torch's SDPA export: q/k/v projections, [B, S, H, d] reshapes, √(1/√d) scales, softmax, output reshape."""
    width = heads * head_dim
    nodes, inits = [], []
    for name in "qkv":
        inits.append(numpy_helper.from_array(RNG.standard_normal((width, width)).astype(np.float32), f"w_{name}"))
        source = "ctx" if cross and name != "q" else "x"
        nodes.append(helper.make_node("MatMul", [source, f"w_{name}"], [name]))
    split = [0, -1, heads, head_dim] if heads_in_shape else [0, -1, -1, head_dim]
    if not heads_in_shape:
        split = [0, 0, -1, head_dim]
    nodes.append(const("split", np.array(split, dtype=np.int64)))
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes.append(helper.make_node("Reshape", [name, "split"], [f"{name}_r"]))
        nodes.append(helper.make_node("Transpose", [f"{name}_r"], [f"{name}_t"], perm=perm))
    if dynamic_scale:  # Sqrt(Div(1, Sqrt(Cast(Slice(Shape(q_t), -1)))))
        nodes += [
            helper.make_node("Shape", ["q_t"], ["q_shape"]),
            const("minus1", np.array([-1], dtype=np.int64)),
            const("big", np.array([2**62], dtype=np.int64)),
            helper.make_node("Slice", ["q_shape", "minus1", "big"], ["d_int"]),
            helper.make_node("Cast", ["d_int"], ["d"], to=F),
            helper.make_node("Sqrt", ["d"], ["sqrt_d"]),
            const("one", np.array(1.0, dtype=np.float32)),
            helper.make_node("Div", ["one", "sqrt_d"], ["scale"]),
            helper.make_node("Sqrt", ["scale"], ["s"]),
        ]
    else:
        nodes.append(const("s", np.array(head_dim**-0.25, dtype=np.float32)))
    nodes += [
        helper.make_node("Mul", ["q_t", "s"], ["q_s"]),
        helper.make_node("Mul", ["k_t", "s"], ["k_s"]),
        helper.make_node("MatMul", ["q_s", "k_s"], ["scores"]),
    ]
    scores = "scores"
    if mask:
        causal = np.triu(np.full((6, 6), -1e4, dtype=np.float32), 1)
        inits.append(numpy_helper.from_array(causal, "mask"))
        nodes.append(helper.make_node("Add", ["scores", "mask"], ["masked"]))
        scores = "masked"
    nodes += [
        helper.make_node("Softmax", [scores], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v_t"], ["o"]),
        helper.make_node("Transpose", ["o"], ["o_t"], perm=[0, 2, 1, 3]),
        const("merge", np.array([0, -1, width], dtype=np.int64)),
        helper.make_node("Reshape", ["o_t", "merge"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", F, ["B", 6, width])]
    if cross:
        inputs.append(helper.make_tensor_value_info("ctx", F, ["B", 5, width]))
    return model(nodes, inputs, [helper.make_tensor_value_info("y", F, ["B", 6, width])], inits, opset=opset)


def attention_feeds(proto, cross=False):
    width = proto.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    feeds = {"x": RNG.standard_normal((2, 6, width)).astype(np.float32)}
    if cross:
        feeds["ctx"] = RNG.standard_normal((2, 5, width)).astype(np.float32)
    return feeds


@pytest.mark.parametrize("mode", ["mha", "onnx", "canonical"])
@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"cross": True},
        {"dynamic_scale": False},
        {"mask": True},
        {"heads_in_shape": False},  # transformers writes [B, S, -1, d]
    ],
)
def test_attention_fusion(mode, variant):
    proto = attention_graph(**variant, opset=23 if mode == "onnx" else 17)
    facts = []
    count, fused = rewrite(proto, fuse_attention, lambda f: facts.append(f) or mode)
    assert count == 1
    assert facts == [
        {"heads": 2, "head_dim": 4, "has_mask": variant.get("mask", False), "cross": variant.get("cross", False)}
    ]
    after = ops(fused)
    if mode == "mha":
        assert after == {"MatMul": 3, "com.microsoft.MultiHeadAttention": 1}  # a constant mask's Unsqueeze folds
    elif mode == "onnx":
        assert after == {"MatMul": 3, "Attention": 1}
    else:
        assert after["Softmax"] == 1 and after["MatMul"] == 5 and after["Mul"] == 1
        assert "Shape" not in after and "Sqrt" not in after  # the runtime scale chain is gone
        assert all(n.domain in ("", "ai.onnx") for n in fused.graph.node)
    assert_parity(proto, fused, attention_feeds(proto, variant.get("cross", False)))


def test_attention_keep_and_wrong_scale_do_not_fire():
    proto = attention_graph()
    assert rewrite(proto, fuse_attention, lambda f: "keep")[0] == 0
    # a scale that is not a constant nor the √(1/√d) chain: the softmax input is scaled by an input tensor
    broken = attention_graph(dynamic_scale=False)
    for node in broken.graph.node:
        if node.op_type == "Mul" and node.input[0] == "q_t":
            node.input[1] = "x_scale"
    broken.graph.input.append(helper.make_tensor_value_info("x_scale", F, [1]))
    assert rewrite(broken, fuse_attention, lambda f: "mha")[0] == 0


# --------------------------------------------------------------------------------------------------- GELU


def gelu_graph(half=0.5, variant=0):
    nodes = [
        const("sqrt2", np.array(math.sqrt(2), dtype=np.float32)),
        const("one", np.array(1.0, dtype=np.float32)),
        const("half", np.array(half, dtype=np.float32)),
        helper.make_node("Div", ["x", "sqrt2"], ["xs"]),
        helper.make_node("Erf", ["xs"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
    ]
    if variant == 0:
        nodes += [helper.make_node("Mul", ["x", "e1"], ["m"]), helper.make_node("Mul", ["m", "half"], ["y"])]
    else:
        nodes += [helper.make_node("Mul", ["e1", "half"], ["m"]), helper.make_node("Mul", ["x", "m"], ["y"])]
    io = [helper.make_tensor_value_info(n, F, ["N", 8]) for n in ("x", "y")]
    return model(nodes, io[:1], io[1:], opset=20)


@pytest.mark.parametrize("domain", ["com.microsoft", ""])
@pytest.mark.parametrize("variant", [0, 1])
def test_gelu_fusion(domain, variant):
    proto = gelu_graph(variant=variant)
    count, fused = rewrite(proto, fuse_gelu, domain)
    assert count == 1
    assert ops(fused) == {f"{domain}.Gelu" if domain else "Gelu": 1}
    assert_parity(proto, fused, {"x": RNG.standard_normal((3, 8)).astype(np.float32) * 3})


def test_gelu_with_other_constants_does_not_fire():
    assert rewrite(gelu_graph(half=0.25), fuse_gelu, "com.microsoft")[0] == 0


# --------------------------------------------------------------------------------------------------- GroupNorm


def groupnorm_graph(channels=8, groups=4, unit_scale=1.0, gamma_shape=(8, 1, 1)):
    gamma = RNG.standard_normal(gamma_shape).astype(np.float32)
    beta = RNG.standard_normal(gamma_shape).astype(np.float32)
    nodes = [
        const("g_shape", np.array([0, groups, -1], dtype=np.int64)),
        const("ones", np.full(groups, unit_scale, dtype=np.float32)),
        const("zeros", np.zeros(groups, dtype=np.float32)),
        const("gamma", gamma),
        const("beta", beta),
        helper.make_node("Reshape", ["x", "g_shape"], ["xg"]),
        helper.make_node("InstanceNormalization", ["xg", "ones", "zeros"], ["n"], epsilon=1e-5),
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Reshape", ["n", "x_shape"], ["nr"]),
        helper.make_node("Mul", ["nr", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["y"]),
    ]
    io = [helper.make_tensor_value_info(n, F, ["B", channels, "H", "W"]) for n in ("x", "y")]
    return model(nodes, io[:1], io[1:], opset=21)


def test_groupnorm_fusion():
    proto = groupnorm_graph()
    count, fused = rewrite(proto, fuse_groupnorm)
    assert count == 1
    assert ops(fused) == {"GroupNormalization": 1}
    assert_parity(proto, fused, {"x": RNG.standard_normal((2, 8, 5, 3)).astype(np.float32)})


def test_groupnorm_must_not_fire_on_a_scaled_instance_norm_or_old_opset():
    assert rewrite(groupnorm_graph(unit_scale=2.0), fuse_groupnorm)[0] == 0
    old = groupnorm_graph()
    old.opset_import[0].version = 17
    with pytest.raises(ValueError, match="needs opset ≥ 21"):
        fuse_groupnorm(ir.from_proto(old))


# --------------------------------------------------------------------------------------------------- LayerNorm


def layernorm_graph(axis=-1):
    gamma = RNG.standard_normal(8).astype(np.float32)
    beta = RNG.standard_normal(8).astype(np.float32)
    nodes = [
        const("axes", np.array([axis], dtype=np.int64)),
        const("eps", np.array(1e-5, dtype=np.float32)),
        const("gamma", gamma),
        const("beta", beta),
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"]),
        helper.make_node("Sub", ["x", "mean"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        helper.make_node("ReduceMean", ["d2", "axes"], ["var"]),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["std"]),
        helper.make_node("Div", ["d", "std"], ["n"]),
        helper.make_node("Mul", ["n", "gamma"], ["ng"]),
        helper.make_node("Add", ["ng", "beta"], ["y"]),
    ]
    io = [helper.make_tensor_value_info(n, F, ["B", 8, 8]) for n in ("x", "y")]
    return model(nodes, io[:1], io[1:], opset=18)


def test_layernorm_fusion():
    proto = layernorm_graph()
    count, fused = rewrite(proto, fuse_layernorm)
    assert count == 1
    assert ops(fused) == {"LayerNormalization": 1}
    assert_parity(proto, fused, {"x": RNG.standard_normal((2, 8, 8)).astype(np.float32)})


def test_layernorm_over_another_axis_does_not_fire():
    assert rewrite(layernorm_graph(axis=1), fuse_layernorm)[0] == 0


# --------------------------------------------------------------------------------------------------- manager


def test_manager_records_counts_and_op_changes():
    records = run_passes(ir.from_proto(gelu_graph()), [("cleanup", cleanup), ("gelu", lambda m: fuse_gelu(m, ""))])
    assert [r.name for r in records] == ["cleanup", "gelu"]
    assert records[0].count == 3 and records[0].ops_removed == {"Constant": 3}  # constants → initializers
    assert records[1].count == 1
    assert records[1].ops_added == {"Gelu": 1} and records[1].ops_removed == {"Div": 1, "Erf": 1, "Add": 1, "Mul": 2}
