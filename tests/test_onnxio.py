import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from diffkiln.onnxio import consolidate_external_data, has_external_data, iter_initializers, load_graph, op_histogram
from diffkiln.parity import ort_session


def _model(rng):
    """y = relu(x @ W1) @ W2: two 64×64 initializers."""
    w1, w2 = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model, {"w1": w1, "w2": w2}


def test_consolidate_per_tensor_files(tmp_path):
    """torch writes one file per tensor past 2 GB; we rewrite them into one aligned model.onnx.data."""
    model, weights = _model(np.random.default_rng(0))
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "w1", "w2"]
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    before = ort_session(path).run(None, {"x": x})[0]

    assert consolidate_external_data(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    graph = load_graph(path)
    offsets = [int(e.value) for t in graph.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets == [0, 16384]  # 64·64·4 bytes, page aligned
    for name, array in iter_initializers(graph, tmp_path):
        np.testing.assert_array_equal(array, weights[name])
    np.testing.assert_array_equal(ort_session(path).run(None, {"x": x})[0], before)


def test_consolidate_leaves_inline_models_alone(tmp_path):
    model, _ = _model(np.random.default_rng(0))
    onnx.save(model, str(tmp_path / "model.onnx"))
    assert not consolidate_external_data(tmp_path / "model.onnx")
    assert not has_external_data(load_graph(tmp_path / "model.onnx"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_op_histogram():
    model, _ = _model(np.random.default_rng(0))
    assert op_histogram(model) == {"MatMul": 2, "Relu": 1}
