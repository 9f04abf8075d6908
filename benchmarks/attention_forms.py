"""Which attention form ONNX Runtime's CPU provider runs fastest, per attention kind of SD1.5 at 512².

    .venv/bin/python benchmarks/attention_forms.py [--runs 5]

For each kind — UNet outer self-attention (4096 tokens, 8×40), UNet outer cross-attention (4096 × 77 tokens),
the deepest self-attention (64 tokens, 8×160) and the VAE mid-block attention (4096 tokens, 1×512) — one graph per
form: com.microsoft MultiHeadAttention, ONNX Attention (opset 23) and the unfused MatMul/Softmax/MatMul, all on the
same q/k/v (batch 2). Reports the median seconds per call; the ort-cpu preset's choice follows this table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

KINDS = {  # name: (query tokens, key tokens, heads, head size)
    "unet self 64²": (4096, 4096, 8, 40),
    "unet cross 64²": (4096, 77, 8, 40),
    "unet self 8²": (64, 64, 8, 160),
    "vae mid 64²": (4096, 4096, 1, 512),
}


def graph(form: str, heads: int, head_dim: int):
    width, scale = heads * head_dim, head_dim**-0.5
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", n.upper(), width]) for n in "qkv"]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if form == "mha":
        nodes = [
            helper.make_node(
                "MultiHeadAttention", ["q", "k", "v"], ["y"], num_heads=heads, scale=scale, domain="com.microsoft"
            )
        ]
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    elif form == "onnx":
        nodes = [
            helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=heads, kv_num_heads=heads, scale=scale)
        ]
        opsets = [helper.make_opsetid("", 23)]
    else:
        split = helper.make_tensor("split", TensorProto.INT64, [4], [0, -1, heads, head_dim])
        merge = helper.make_tensor("merge", TensorProto.INT64, [3], [0, -1, width])
        s = helper.make_tensor("s", TensorProto.FLOAT, [], [scale])
        nodes = [
            helper.make_node("Reshape", ["q", "split"], ["q4"]),
            helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", ["k", "split"], ["k4"]),
            helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", ["v", "split"], ["v4"]),
            helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
            helper.make_node("MatMul", ["qt", "kt"], ["qk"]),
            helper.make_node("Mul", ["qk", "s"], ["scores"]),
            helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
            helper.make_node("MatMul", ["p", "vt"], ["o"]),
            helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", ["ot", "merge"], ["y"]),
        ]
        opsets = [helper.make_opsetid("", 17)]
        return helper.make_model(
            helper.make_graph(nodes, "a", io, out, [split, merge, s]), opset_imports=opsets, ir_version=10
        )
    return helper.make_model(helper.make_graph(nodes, "a", io, out), opset_imports=opsets, ir_version=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'kind':16s} {'mha s':>8s} {'onnx s':>8s} {'unfused s':>10s}  fastest")
    for kind, (s_q, s_k, heads, head_dim) in KINDS.items():
        width = heads * head_dim
        feeds = {
            "q": rng.standard_normal((2, s_q, width), dtype=np.float32),
            "k": rng.standard_normal((2, s_k, width), dtype=np.float32),
            "v": rng.standard_normal((2, s_k, width), dtype=np.float32),
        }
        sessions = {
            f: ort.InferenceSession(graph(f, heads, head_dim).SerializeToString()) for f in ("mha", "onnx", "unfused")
        }
        times = {f: [] for f in sessions}
        outputs = {f: s.run(None, feeds)[0] for f, s in sessions.items()}  # warm-up
        for _ in range(args.runs):  # interleaved, so drift hits every form alike
            for form, session in sessions.items():
                start = time.perf_counter()
                session.run(None, feeds)
                times[form].append(time.perf_counter() - start)
        assert all(np.abs(o - outputs["unfused"]).max() < 1e-4 for o in outputs.values())
        medians = {f: statistics.median(t) for f, t in times.items()}
        best = min(medians, key=medians.get)
        print(f"{kind:16s} {medians['mha']:8.3f} {medians['onnx']:8.3f} {medians['unfused']:10.3f}  {best}", flush=True)


if __name__ == "__main__":
    main()
