"""FP16 and INT8 written into the graph: the fp16 islands of an overflowing toy graph, the Q/DQ rules of the int8
UNet (zero point 0, int8 only, per-channel weights, excluded layers, no Softmax, shared q/k/v input), standard
ONNX for TensorRT, ORT and OpenVINO running it, image fidelity and adherence on the demo model against fp32, the
recipe given back, the sensitivity search, and bad inputs refused."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from diffkiln.calibration import optimize_with_calibration, read_recipe
from diffkiln.errors import DiffkilnError
from diffkiln.optimizers.optimize import PRECISION_REPORT
from diffkiln.optimizers.precision import fp16, int8, sensitivity, smooth
from diffkiln.optimizers.precision.apply import PrecisionOptions

CAPTIONS = 64  # all held-out captions (a 16-caption subset is too coarse for 3 points: one flip is 6.25)


def quiet(_msg):
    pass


@pytest.fixture(scope="module")
def kilns(demo_kiln, tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    made = {}
    for target, precision in [("ort-cpu", "fp16"), ("ort-cpu", "int8"), ("tensorrt", "int8"), ("tensorrt", "fp16")]:
        out = root / f"{target}-{precision}"
        optimize_with_calibration(demo_kiln, target, precision, out=out, log=quiet)
        made[target, precision] = out
    return made


def graph(kiln_dir, component="unet"):
    return onnx.load(str(kiln_dir / component / "model.onnx"))


# --- fp16 --------------------------------------------------------------------------------------------------------


def overflow_graph(tmp_path):
    """x → MatMul(×300) → Mul(×300) → Mul(1/1e5) → y: the middle tensor reaches ~1e5·|x|, past fp16's 65504."""
    w = numpy_helper.from_array(np.full((4, 4), 300.0 / 4, np.float32), "w")
    big = numpy_helper.from_array(np.array(300.0, np.float32), "big")
    small = numpy_helper.from_array(np.array(1e-5, np.float32), "small")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="matmul"),
        helper.make_node("Mul", ["a", "big"], ["b"], name="scale_up"),
        helper.make_node("Mul", ["b", "small"], ["y"], name="scale_down"),
        helper.make_node("Relu", ["y"], ["z"], name="relu"),
    ]
    g = helper.make_graph(
        nodes,
        "overflow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])],
        [w, big, small],
    )
    path = tmp_path / "src.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_fp16_keeps_the_overflowing_island_in_fp32(tmp_path):
    src = overflow_graph(tmp_path)
    feeds = [{"x": np.random.default_rng(i).uniform(1, 3, (2, 4)).astype(np.float32)} for i in range(3)]
    record = fp16.to_fp16(src, tmp_path / "model.onnx", feeds, lambda m, p: onnx.save(m, str(p)))
    assert set(record["islands"]) == {"scale_up", "scale_down"}  # b ≈ 1e5: its producer and its reader
    assert "output |x| up to" in record["islands"]["scale_up"] and "> 8192" in record["islands"]["scale_down"]
    converted = onnx.load(str(tmp_path / "model.onnx"))
    types = {i.name: i.data_type for i in converted.graph.initializer}
    assert types["w"] == TensorProto.FLOAT16  # the rest is fp16, I/O stays fp32
    assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    import onnxruntime as ort

    got = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feeds[0])[0]
    ref = ort.InferenceSession(str(src)).run(None, feeds[0])[0]
    assert np.isfinite(got).all() and np.allclose(got, ref, rtol=2e-3)
    # a threshold past fp16's range cannot let the overflow through; below every value, everything is kept
    record = fp16.to_fp16(src, tmp_path / "again.onnx", feeds, lambda m, p: onnx.save(m, str(p)), data_max=1e9)
    assert set(record["islands"]) == {"scale_up", "scale_down"} and "> 65504" in record["islands"]["scale_up"]
    record = fp16.to_fp16(src, tmp_path / "all.onnx", feeds, lambda m, p: onnx.save(m, str(p)), data_max=0.5)
    assert set(record["islands"]) == {"matmul", "scale_up", "scale_down", "relu"}
    # the case that must not fire: a graph whose values all stay small keeps no island
    small = [{"x": f["x"] * 1e-3} for f in feeds]
    assert fp16.to_fp16(src, tmp_path / "small.onnx", small, lambda m, p: onnx.save(m, str(p)))["islands"] == {}


def test_fp16_demo_records_islands_and_fidelity(kilns):
    report = json.loads((kilns["ort-cpu", "fp16"] / PRECISION_REPORT).read_text())
    assert set(report["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    unet = report["components"]["unet"]
    kinds = {why.split(":")[0] for why in unet["islands"].values()}
    assert {"InstanceNormalization", "LayerNormalization"} <= kinds
    assert unet["fidelity"]["psnr_db"] > 60
    manifest = json.loads((kilns["ort-cpu", "fp16"] / "manifest.json").read_text())
    assert manifest["precision"] == "fp16" and manifest["components"]["unet"]["precision"] == "fp16"
    weights = [t for t in graph(kilns["ort-cpu", "fp16"]).graph.initializer if len(t.dims) >= 2]
    assert sum(t.data_type == TensorProto.FLOAT16 for t in weights) > 0.9 * len(weights)


# --- int8 --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
def test_int8_unet_follows_the_qdq_rules(kilns, target):
    model = graph(kilns[target, "int8"])
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    made_by = {o: n for n in model.graph.node for o in n.output}
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(q) > 40 and len(dq) > 100
    weights = {n.input[0] for n in dq if n.input[0] in inits}
    for node in q + dq:
        zero_point = inits[node.input[2]]
        if target == "tensorrt" or node.input[0] in weights:  # symmetric int8 only: all of TensorRT's, all weights
            assert zero_point.dtype == np.int8 and not zero_point.any(), node.name
        else:  # ONNX Runtime's x86 kernels: uint8 activations, centred
            assert zero_point.dtype == np.uint8 and abs(int(zero_point) - 128) <= 1, node.name
    weight_dq = [n for n in dq if n.input[0] in inits]
    assert all(inits[n.input[1]].size > 1 for n in weight_dq)  # per-channel weight scales
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for node in model.graph.node:
        fed = [made_by[i].op_type for i in node.input if i in made_by]
        if node.op_type == "Softmax":
            assert "DequantizeLinear" not in fed
            assert all(c.op_type != "QuantizeLinear" for c in consumers.get(node.output[0], []))
        if node.op_type in ("Conv", "Gemm", "MatMul") and int8.kept_reason(node.name, int8.KEEP):
            # conv_in, conv_out, time embedding …: float weights, no Q/DQ of their own (ORT's graph quantizes
            # Conv outputs, so a kept layer right after a quantized Conv reads that Conv's dequantized output)
            assert node.input[1] in inits and inits[node.input[1]].dtype == np.float32, node.name
            if target == "tensorrt":
                assert "DequantizeLinear" not in fed, node.name
    kept = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm") and int8.kept_reason(n.name, int8.KEEP)]
    assert any("conv_in" in k for k in kept) and any("time_emb_proj" in k for k in kept)
    # one shared Q/DQ for the q/k/v projections of self-attention
    to_q = next(n for n in model.graph.node if n.name.endswith("attn1/to_q/MatMul"))
    to_k = next(n for n in model.graph.node if n.name.endswith("attn1/to_k/MatMul"))
    assert to_q.input[0] == to_k.input[0] and made_by[to_q.input[0]].op_type == "DequantizeLinear"
    if target == "tensorrt":
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # standard ONNX only


def test_tensorrt_fp16_is_standard_onnx(kilns):
    for component in ("unet", "vae_decoder", "text_encoder"):
        assert {n.domain for n in graph(kilns["tensorrt", "fp16"], component).graph.node} <= {"", "ai.onnx"}


def unet_psnr(kiln_dir, reference_dir, runner):
    from diffkiln import kiln
    from diffkiln.runtime.runners import OrtRunner
    from diffkiln.specs import PipelineInfo, component_specs, dims

    info = PipelineInfo.from_json(kiln.read_manifest(reference_dir)["pipeline"])
    feeds = component_specs(info)["unet"].sample_inputs(dims(2, 8, 8), info, seed=5)
    ref = next(iter(OrtRunner(reference_dir / "unet" / "model.onnx").activate().infer(feeds).values()))
    got = next(iter(runner(kiln_dir / "unet" / "model.onnx").activate().infer(feeds).values()))
    return sensitivity.psnr_db([got], [ref])


def test_int8_unet_runs_in_ort_and_openvino(kilns, demo_kiln):
    from diffkiln.runtime.runners import OpenVinoRunner, OrtRunner

    assert unet_psnr(kilns["ort-cpu", "int8"], demo_kiln, OrtRunner) > 40
    pytest.importorskip("openvino")
    assert unet_psnr(kilns["tensorrt", "int8"], demo_kiln, lambda p: OpenVinoRunner(p, precision_hint="f32")) > 40


def test_demo_images_meet_the_precision_bars(kilns, demo_kiln):
    """The acceptance (ORT paths; benchmarks/precision_demo.py adds OpenVINO): fp16 median PSNR ≥ 35 dB, int8
    ≥ 28 dB against the fp32 kiln, adherence within 2 (fp16) and 3 (int8) points of fp32's."""
    from diffkiln.bench.precision import compare
    from diffkiln.demo.data import heldout_captions

    captions = heldout_captions()[:CAPTIONS]
    paths = {"fp32": (demo_kiln, None), "fp16": (kilns["ort-cpu", "fp16"], None)}
    paths["int8"] = (kilns["ort-cpu", "int8"], None)
    result = compare(paths, captions, steps=20, log=quiet)
    assert result["fp16"]["psnr_median_db"] >= 35, result["fp16"]["psnr_db"]
    assert result["int8"]["psnr_median_db"] >= 28, result["int8"]["psnr_db"]
    for name, bound in (("fp16", 0.02), ("int8", 0.03)):
        for attribute in ("color", "background", "shape"):
            gap = abs(result[name]["adherence"][attribute] - result["fp32"]["adherence"][attribute])
            assert gap <= bound + 1e-9, (name, attribute, gap)


# --- recipe, sensitivity, bad input ------------------------------------------------------------------------------


def test_recipe_given_back_rebuilds_the_same_graph(kilns, demo_kiln, tmp_path):
    first = kilns["ort-cpu", "int8"]
    recipe = first / PRECISION_REPORT
    again = tmp_path / "again"
    optimize_with_calibration(demo_kiln, "ort-cpu", "int8", out=again, recipe_file=recipe, log=quiet)
    scales = lambda d: {  # noqa: E731
        t.name: numpy_helper.to_array(t).tolist() for t in graph(d).graph.initializer if t.name.endswith("_scale")
    }
    assert scales(again) == scales(first)
    a, b = (json.loads((d / PRECISION_REPORT).read_text())["components"]["unet"] for d in (first, again))
    assert a["kept"] == b["kept"] and a["amax"] == b["amax"]


def test_sensitivity_keeps_groups_until_the_bar_is_met(demo_kiln, kilns, tmp_path):
    report = json.loads((kilns["ort-cpu", "int8"] / PRECISION_REPORT).read_text())["components"]["unet"]
    bar = report["fidelity"]["psnr_db"] + 3  # above what quantizing everything reaches
    out = tmp_path / "strict"
    optimize_with_calibration(
        demo_kiln, "ort-cpu", "int8", out=out, count=2, options=PrecisionOptions(min_psnr=bar), log=quiet
    )
    search = json.loads((out / PRECISION_REPORT).read_text())["components"]["unet"]["search"]
    assert search["all_groups_psnr_db"] < bar and search["kept_groups"]
    assert len(search["groups"]) >= 10  # every block × op kind was scored alone
    assert search["psnr_db"] >= bar or len(search["kept_groups"]) == len(search["groups"])


def test_group_names():
    assert sensitivity.group_of("/model/down_blocks.1/attentions.0/t/attn1/to_q/MatMul", "MatMul") == (
        "down_blocks.1/attention"
    )
    assert sensitivity.group_of("/model/up_blocks.2/resnets.0/conv1/Conv", "Conv") == "up_blocks.2/conv"
    assert sensitivity.group_of("/model/mid_block/attentions.0/t/ff/net.2/MatMul", "MatMul") == "mid_block/feed-forward"


def test_bad_precision_inputs_are_one_line_errors(demo_kiln, tmp_path):
    bad = tmp_path / "recipe.json"
    bad.write_text('{"components": {"unet": {"amax": {"x": "NaN"}}}}')
    with pytest.raises(DiffkilnError, match="the range of x is 'NaN', not a finite number"):
        read_recipe(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(DiffkilnError, match="is not a precision recipe"):
        read_recipe(bad)
    with pytest.raises(DiffkilnError, match="--components text_encoder_2 is not in this kiln dir"):
        optimize_with_calibration(demo_kiln, "ort-cpu", "int8", components=["text_encoder_2"], out=tmp_path / "o")
    with pytest.raises(DiffkilnError, match="fp32 converts nothing"):
        optimize_with_calibration(demo_kiln, "ort-cpu", "fp32", components=["unet"], out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cli_optimize_int8_and_a_bad_recipe(demo_kiln, tmp_path):
    from click.testing import CliRunner

    from diffkiln.cli import main

    out = tmp_path / "int8"
    args = ["optimize", str(demo_kiln), "--target", "tensorrt", "--precision", "int8", "--calib-prompts", "2"]
    result = CliRunner().invoke(main, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "unet             int8: 29 node(s) kept in higher precision" in result.output
    (tmp_path / "bad.json").write_text("{not json")
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "x"), "--recipe", str(tmp_path / "bad.json")])
    assert result.exit_code == 1 and "cannot read the recipe" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_smoothquant_is_exact_in_fp32_and_only_touches_linear_inputs(demo_kiln, tmp_path):
    import onnxruntime as ort

    from diffkiln import kiln
    from diffkiln.specs import PipelineInfo, component_specs, dims

    src = demo_kiln / "unet" / "model.onnx"
    model = onnx.load(str(src))
    nodes = [n for n in int8.quantizable_nodes(model) if not int8.kept_reason(n.name, int8.KEEP)]
    plan = smooth.groups(model, nodes)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert plan and all(ops[c] == "MatMul" for consumers, _k in plan.values() for c in consumers)
    # self-attention's q/k/v share one input, and so one smoothing
    assert any(len(consumers) == 3 for consumers, _k in plan.values())
    info = PipelineInfo.from_json(kiln.read_manifest(demo_kiln)["pipeline"])
    feeds = component_specs(info)["unet"].sample_inputs(dims(2, 8, 8), info, seed=1)
    rng = np.random.default_rng(0)
    amax = {x: rng.uniform(0.1, 20, (3, k)) for x, (_c, k) in plan.items()}
    done = smooth.smooth(src, tmp_path / "s.onnx", plan, amax, 0.5, lambda m, p: onnx.save(m, str(p)))
    assert len(done) == len(plan)
    ref = ort.InferenceSession(str(src)).run(None, feeds)[0]
    got = ort.InferenceSession(str(tmp_path / "s.onnx")).run(None, feeds)[0]
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4  # smoothing alone changes nothing
    muls = [n for n in onnx.load(str(tmp_path / "s.onnx")).graph.node if n.name.endswith("__smooth_mul")]
    assert len(muls) == len(plan)
    # the cases that must not fire: attention's activation × activation MatMuls, Convs and kept layers
    smoothed = {c for consumers, _k in plan.values() for c in consumers}
    assert not any(c.endswith(("attn1/MatMul", "attn1/MatMul_1")) for c in smoothed)
    assert smoothed <= {n.name for n in nodes if n.op_type == "MatMul"}


def test_fp16_io_kiln_runs_in_the_runtime(demo_kiln, tmp_path):
    """--fp16-io: the UNet takes and gives fp16, the manifest says so, and the runtime casts at the border."""
    from diffkiln.bench.fidelity import psnr
    from diffkiln.bench.precision import generate_all

    out = tmp_path / "fp16io"
    options = PrecisionOptions(fp16_io=True)
    optimize_with_calibration(demo_kiln, "tensorrt", "fp16", out=out, count=2, components=["unet"], options=options)
    model = graph(out)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    contract = json.loads((out / "manifest.json").read_text())["components"]["unet"]["contract"]
    assert {t["dtype"] for t in contract["inputs"]} == {"float16"}
    report = json.loads((out / PRECISION_REPORT).read_text())["components"]["unet"]
    assert report["fidelity"]["psnr_db"] > 60  # scored on fp16-cast held-back inputs
    captions = ["a small red circle on a blue background, top left", "a large yellow square, center"]
    ref = generate_all(demo_kiln, None, captions, 20, quiet)
    got = generate_all(out, None, captions, 20, quiet)
    assert min(psnr(a, b) for a, b in zip(got, ref, strict=True)) >= 35
