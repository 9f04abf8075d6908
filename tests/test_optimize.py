"""Whole-model optimization: pinned fusion counts per component and target, parity with the unoptimized graph,
standard-ONNX-only output for TensorRT, the weight map followed, and the result runnable by `diffkiln run`."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from diffkiln import kiln
from diffkiln.cli import main
from diffkiln.errors import DiffkilnError, OutputError
from diffkiln.onnxio import iter_initializers, load_graph
from diffkiln.optimizers.optimize import REPORT, optimize

# (attention, gelu, groupnorm) per component: the silent non-match guard
EXPECTED = {
    ("tiny", "ort-cpu"): {
        "text_encoder": (2, 0, 0),  # 2 CLIP layers; quick_gelu is not an erf GELU
        "unet": (8, 4, 0),  # 4 transformer blocks (down, mid, 2 up) × self + cross
        "vae_decoder": (1, 0, 0),
        "vae_encoder": (1, 0, 0),
    },
    ("tiny", "tensorrt"): {
        "text_encoder": (2, 0, 0),
        "unet": (8, 4, 21),
        "vae_decoder": (1, 0, 22),  # 10 resnets × 2, the mid attention's norm, conv_norm_out
        "vae_encoder": (1, 0, 14),
    },
    ("tiny-sdxl", "ort-cpu"): {
        "text_encoder": (2, 0, 0),
        "text_encoder_2": (2, 2, 0),  # OpenCLIP-style encoder: erf GELU
        "unet": (16, 8, 0),  # 8 transformer blocks (2 down, 2 mid, 4 up)
        "vae_decoder": (1, 0, 0),
        "vae_encoder": (1, 0, 0),
    },
}


def counts(report):
    return {n: tuple(c["counts"].get(k, 0) for k in ("attention", "gelu", "groupnorm")) for n, c in report.items()}


@pytest.fixture(scope="module")
def optimized(tiny_kiln, tiny_sdxl_kiln, tmp_path_factory):
    root = tmp_path_factory.mktemp("optimized")
    kilns = {"tiny": tiny_kiln, "tiny-sdxl": tiny_sdxl_kiln}
    return {
        (preset, target): root / f"{preset}-{target}"
        for preset, target in EXPECTED
        if optimize(kilns[preset], target, out=root / f"{preset}-{target}", log=lambda _: None)
    }


@pytest.mark.parametrize(("preset", "target"), list(EXPECTED))
def test_fusion_counts_and_parity(optimized, preset, target):
    out = optimized[(preset, target)]
    report = json.loads((out / REPORT).read_text())
    assert counts(report["components"]) == EXPECTED[(preset, target)]
    for name, component in report["components"].items():
        assert component["parity"]["worst_rel_err"] <= 1e-4, name
        assert len(component["parity"]["cases"]) == 2
        assert component["nodes_after"] < component["nodes_before"]
        assert not component["weights_lost"], name


def test_tensorrt_graphs_are_standard_onnx(optimized):
    out = optimized[("tiny", "tensorrt")]
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        graph = load_graph(kiln.model_path(out, name))
        assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}, name
        assert {o.domain for o in graph.opset_import} <= {"", "ai.onnx"}
        assert graph.opset_import[0].version == 21


def test_ort_cpu_uses_multihead_attention(optimized):
    graph = load_graph(kiln.model_path(optimized[("tiny", "ort-cpu")], "unet"))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MultiHeadAttention") == 8 and "Softmax" not in ops


def test_weight_map_follows_the_rewrite(tiny_kiln, optimized):
    out = optimized[("tiny", "ort-cpu")]
    old = json.loads((tiny_kiln / kiln.WEIGHT_MAP).read_text())
    new = json.loads((out / kiln.WEIGHT_MAP).read_text())
    assert set(new) == set(old)
    for component in old:
        assert set(new[component]) == set(old[component])
        before = dict(iter_initializers(load_graph(kiln.model_path(tiny_kiln, component)), tiny_kiln / component))
        after = dict(iter_initializers(load_graph(kiln.model_path(out, component)), out / component))
        for weight, entry in new[component].items():
            np.testing.assert_array_equal(after[entry["initializer"]], before[old[component][weight]["initializer"]])


def test_optimized_kiln_runs_and_matches(tiny_kiln, optimized):
    from diffkiln.runtime.pipeline import GenerationParams, Pipeline

    params = GenerationParams("a red circle", steps=3, seed=1)
    with Pipeline(tiny_kiln) as plain, Pipeline(optimized[("tiny", "ort-cpu")]) as fast:
        a, b = plain(params).images, fast(params).images
    assert np.abs(a - b).max() < 1e-3


def test_up_to_date_force_and_bad_input(tiny_kiln, tmp_path):
    messages = []
    out = tmp_path / "o"
    optimize(tiny_kiln, "ort-cpu", out=out, log=messages.append)
    optimize(tiny_kiln, "ort-cpu", out=out, log=messages.append)
    assert messages[-1] == f"{out} is up to date (use --force to re-optimize)"
    with pytest.raises(OutputError, match="pass --force"):
        optimize(tiny_kiln, "tensorrt", out=out, log=messages.append)
    with pytest.raises(DiffkilnError, match="unknown target 'cuda'"):
        optimize(tiny_kiln, "cuda", out=tmp_path / "x")
    with pytest.raises(DiffkilnError, match="--precision int8 needs calibration inputs recorded from the pipeline"):
        optimize(tiny_kiln, "ort-cpu", precision="int8", out=tmp_path / "x")
    with pytest.raises(DiffkilnError, match="unknown precision 'int4'"):
        optimize(tiny_kiln, "ort-cpu", precision="int4", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_prints_the_table(tiny_kiln, tmp_path):
    result = CliRunner().invoke(main, ["optimize", str(tiny_kiln), "--target", "ort-cpu", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "optimize_report.json").read_text())
    for name, record in report["components"].items():  # one row per component, with the report's own numbers
        row = next(line for line in result.output.splitlines() if line.startswith(name + " "))
        counts = record["counts"]
        assert f"{record['nodes_before']} → {record['nodes_after']}" in row
        assert row.split()[4:8] == [str(counts.get(k, 0)) for k in ("attention", "gelu", "groupnorm", "layernorm")]
    assert f"wrote {tmp_path / 'o'}" in result.output
    bad = CliRunner().invoke(main, ["optimize", str(tmp_path / "nope"), "--target", "ort-cpu"])
    assert bad.exit_code == 1 and "no such kiln directory" in bad.output


@pytest.mark.slow
@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
def test_sd15_optimizes_with_the_expected_counts(sd15_kiln, tmp_path, target):
    report = optimize(sd15_kiln, target, out=tmp_path / target, log=lambda _: None)["components"]
    groupnorms = {"unet": 61, "vae_decoder": 30, "vae_encoder": 22} if target == "tensorrt" else {}
    assert counts(report) == {
        "text_encoder": (12, 0, 0),  # CLIP-L: 12 layers, quick_gelu
        "unet": (32, 16, groupnorms.get("unet", 0)),  # 16 transformer blocks × (self + cross)
        "vae_decoder": (1, 0, groupnorms.get("vae_decoder", 0)),
        "vae_encoder": (1, 0, groupnorms.get("vae_encoder", 0)),
    }
    assert all(c["parity"]["worst_rel_err"] <= 1e-4 for c in report.values())


def test_stale_output_of_the_same_kind_is_replaced(tiny_kiln, tmp_path):
    """A cached optimize output whose source kiln changed is redone without --force (it is ours to replace)."""
    import shutil

    base = shutil.copytree(tiny_kiln, tmp_path / "k")
    out, messages = tmp_path / "o", []
    optimize(base, "ort-cpu", out=out, log=messages.append)
    manifest = json.loads((base / kiln.MANIFEST).read_text())
    kiln.write_json(base / kiln.MANIFEST, {**manifest, "note": "changed"})
    optimize(base, "ort-cpu", out=out, log=messages.append)
    assert f"{out} is stale (its input changed): rewriting it" in messages
    assert json.loads((out / REPORT).read_text())["source_manifest"] == kiln.file_sha256(base / kiln.MANIFEST)


def test_a_short_or_full_disk_is_a_one_line_error_and_leaves_nothing(tiny_kiln, tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    import diffkiln.optimizers.optimize as opt

    need = kiln.components_bytes(tiny_kiln, kiln.read_manifest(tiny_kiln)["components"])
    usage = namedtuple("usage", "total used free")
    out = tmp_path / "o"
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(need * 10, need * 9, need - 1))
    with pytest.raises(OutputError, match=r"needs about \d+\.\d MB and its disk has \d+\.\d MB free"):
        optimize(tiny_kiln, "ort-cpu", out=out, log=lambda _: None)
    monkeypatch.undo()

    def full(*_args, **_kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(opt, "_save", full)
    result = CliRunner().invoke(main, ["optimize", str(tiny_kiln), "--target", "ort-cpu", "-o", str(out)])
    assert result.exit_code == 1
    full_disk = f"cannot write {out}: its disk is full; free some space or choose another output path"
    assert result.output == f"Error: {full_disk} (nothing was written)\n"
    assert not out.exists() and not list(tmp_path.glob(".o.*"))
