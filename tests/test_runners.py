"""Runners and their loaders on a tiny graph: ORT by loader and by path, OpenVINO against ORT, the backend table."""

import subprocess
import sys
from functools import partial

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from diffkiln.errors import DiffkilnError
from diffkiln.runtime import backends
from diffkiln.runtime.backends import available, runner_factory
from diffkiln.runtime.runners import OrtOptions, OrtRunner, session_from_onnx


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """t = tanh(x @ W1); y = Identity(t); z = t @ W2. OpenVINO folds the Identity, so port `y` is also named `t`."""
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((32, 32)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Tanh", ["h"], ["t"]),
            helper.make_node("Identity", ["t"], ["y"]),
            helper.make_node("MatMul", ["t", "w2"], ["z"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 32]),
        ],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    path = tmp_path_factory.mktemp("runners") / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


@pytest.fixture(scope="module")
def feeds():
    return {"x": np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32) * 0.3}


def _run(runner, feeds):
    with runner as r:
        return r.infer(feeds)


def _rel(got, ref):
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def test_ort_runner_loader_and_path_agree(model_path, feeds):
    by_loader = _run(OrtRunner(partial(session_from_onnx, model_path, OrtOptions(device="cpu", threads=1))), feeds)
    by_path = _run(OrtRunner(model_path), feeds)
    by_str = _run(OrtRunner(str(model_path)), feeds)
    assert sorted(by_loader) == ["y", "z"]
    for name in ("y", "z"):
        np.testing.assert_array_equal(by_loader[name], by_path[name])
        np.testing.assert_array_equal(by_loader[name], by_str[name])


def test_session_from_onnx_options(model_path):
    session = session_from_onnx(model_path, OrtOptions(device="cpu", threads=2, optimization="basic"))
    assert session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(DiffkilnError):
        OrtOptions(device="gpu")
    with pytest.raises(DiffkilnError):
        OrtOptions(optimization="max")


def test_runner_records_times_and_needs_activation(model_path, feeds):
    runner = OrtRunner(model_path)
    with pytest.raises(RuntimeError):
        runner.infer(feeds)
    with runner:
        runner.infer(feeds)
        runner.infer(feeds)
    assert len(runner.inference_times) == 2 and runner.last_inference_time > 0
    assert runner.session is None and runner.precision_hint is None


def test_openvino_f32_matches_ort(model_path, feeds):
    pytest.importorskip("openvino")
    from diffkiln.runtime.runners import OpenVinoRunner, compiled_openvino_model

    ref = _run(OrtRunner(model_path), feeds)
    runner = OpenVinoRunner(partial(compiled_openvino_model, model_path, "CPU", "f32"))
    with runner:
        got = runner.infer(feeds)
        assert runner.precision_hint == "f32"
        assert str(runner.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()) == "f32"
    assert sorted(got) == ["y", "z"]
    for name in ("y", "z"):
        assert _rel(got[name], ref[name]) < 1e-5, name


def test_openvino_port_lookup_by_merged_names(model_path, feeds):
    """The Identity's output `y` shares a compiled port with `t`: it is found by its name set, not get_any_name."""
    pytest.importorskip("openvino")
    from diffkiln.runtime.runners import OpenVinoRunner

    with OpenVinoRunner(model_path) as runner:
        assert runner.output_names == ["y", "z"] and runner.input_names == ["x"]
        y_port = runner.compiled.outputs[0]
        assert "y" in y_port.get_names()
        got = runner.infer(feeds)
    np.testing.assert_allclose(got["y"], np.tanh(feeds["x"] @ _weight(model_path, "w1")), rtol=1e-5, atol=1e-6)


def _weight(path, name):
    model = onnx.load(str(path))
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_openvino_bf16_hint(model_path, feeds):
    pytest.importorskip("openvino")
    from diffkiln.runtime.runners import OpenVinoRunner

    f32 = _run(OpenVinoRunner(model_path, precision_hint="f32"), feeds)
    runner = OpenVinoRunner(model_path, precision_hint="bf16")
    assert runner.precision_hint == "bf16"  # requested, before activation
    with runner:
        got = runner.infer(feeds)
        if runner.precision_hint != "bf16":
            pytest.skip(f"this CPU has no native bf16: OpenVINO runs {runner.precision_hint}")
    assert _rel(got["z"], f32["z"]) < 5e-2  # bf16 keeps 8 bits of mantissa
    assert not np.array_equal(got["z"], f32["z"])


def test_runner_factory_builds_runners(model_path, feeds):
    assert available("ort") is None
    ref = _run(OrtRunner(model_path), feeds)
    got = _run(runner_factory("ort", device="cpu")(model_path), feeds)
    np.testing.assert_array_equal(got["z"], ref["z"])
    if available("openvino") is None:
        runner = runner_factory("openvino", precision_hint="f32")(model_path)
        assert _rel(_run(runner, feeds)["z"], ref["z"]) < 1e-5 and runner.precision_hint == "f32"
        assert runner_factory("openvino")(model_path).precision_hint == "f32"  # never OpenVINO's silent bf16


def _one_line_error(*args, **kwargs) -> str:
    with pytest.raises(DiffkilnError) as err:
        runner_factory(*args, **kwargs)
    message = str(err.value)
    assert message and "\n" not in message
    return message


def test_runner_factory_errors(monkeypatch):
    assert "unknown backend 'tvm'" in _one_line_error("tvm")
    assert "--device gpu" in _one_line_error("ort", device="gpu")
    assert "--device cuda" in _one_line_error("openvino", device="cuda")
    assert "--precision-hint" in _one_line_error("ort", precision_hint="bf16")
    assert "fp8" in _one_line_error("openvino", precision_hint="fp8")
    assert available("tvm").startswith("unknown backend")


def test_runner_factory_missing_package(monkeypatch):
    real = backends.importlib.util.find_spec
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None if name == "openvino" else real(name))
    assert "pip install diffkiln[openvino]" in _one_line_error("openvino")
    assert "pip install diffkiln[openvino]" in available("openvino")
    assert available("ort") is None


def test_runner_factory_cuda_without_onnxruntime_gpu(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert "--device cuda needs onnxruntime-gpu" in _one_line_error("ort", device="cuda")
    with pytest.raises(DiffkilnError):
        session_from_onnx("unused.onnx", OrtOptions(device="cuda"))


def test_backends_import_no_backend_package():
    code = (
        "import sys, diffkiln.runtime.backends\n"
        "print(sorted(m for m in ('onnx', 'onnxruntime', 'openvino', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
