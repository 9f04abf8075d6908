"""TrtRunner and LoRA refit, driven on CPU through a stand-in TensorRT (tests/fake_trt.py: the kiln's own graph in
ONNX Runtime behind TensorRT's and cuda-python's calls, "device" buffers in host memory).

What is proven here: engines found and checked before they run (TensorRT version, GPU, source graph), tensors
bound by name through real buffer copies, images equal to ONNX Runtime's, CUDA graphs captured once and replayed
for static profiles, feeds outside a profile refused with its range, weight-stripped plans refitted at load, and
LoRA refits A → B → A leaving exactly A's bytes. On a GPU the same paths run in test_gpu.py (-m gpu).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fake_trt
import numpy as np
import pytest
from click.testing import CliRunner
from lora_helpers import make_lora, save_diffusers, save_kohya
from PIL import Image

from diffkiln import engines
from diffkiln.builder import build as build_mod
from diffkiln.builder.build import BuildRequest, build
from diffkiln.builder.profiles import ShapeRequest
from diffkiln.builder.trt import BuildOptions
from diffkiln.cli import main
from diffkiln.errors import DiffkilnError
from diffkiln.lora import fold_loras
from diffkiln.lora.initializers import ComponentGraph
from diffkiln.runtime import refit
from diffkiln.runtime.backends import runner_factory
from diffkiln.runtime.pipeline import GenerationParams, Pipeline

DEVICE = engines.Device(fake_trt.__version__, "NVIDIA Fake GPU", "8.9")


def quiet(_msg):
    pass


@pytest.fixture
def fake(monkeypatch):
    """The fake TensorRT installed; `build` makes fake plans (JSON naming the graph) in-process."""
    state = fake_trt.install(monkeypatch)
    monkeypatch.setattr(build_mod, "missing_requirements", lambda: None)
    monkeypatch.setattr(build_mod, "this_device", lambda: DEVICE)
    monkeypatch.setattr(engines.shutil, "which", lambda name: "/usr/bin/" + name)  # nvidia-smi "exists"
    monkeypatch.setattr(
        build_mod,
        "_build_in_subprocess",
        lambda plan, path, request: fake_trt.write_plan(path, plan["onnx"], request.options.strip_weights),
    )
    return state


@pytest.fixture
def kiln_copy(tiny_kiln, tmp_path):
    return shutil.copytree(tiny_kiln, tmp_path / "kiln")


def run(*args):
    return CliRunner().invoke(main, ["run", *[str(a) for a in args]])


def image(path):
    return np.asarray(Image.open(path))


def one_line_error(result, fragment):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], result.output


def test_run_tensorrt_gives_onnx_runtimes_image(fake, kiln_copy, tmp_path):
    build(kiln_copy, BuildRequest(), log=quiet)
    args = ("a red circle", "-m", kiln_copy, "--steps", 3, "--seed", 5)
    trt = run(*args, "--backend", "tensorrt", "-o", tmp_path / "trt.png")
    assert trt.exit_code == 0, trt.output
    assert "tensorrt fp32" in trt.output  # the backend and the engines' precision, as the timing table shows it
    ort = run(*args, "--backend", "ort", "-o", tmp_path / "ort.png")
    assert ort.exit_code == 0, ort.output
    assert np.array_equal(image(tmp_path / "trt.png"), image(tmp_path / "ort.png"))
    assert fake.streams == 0 and not fake.buffers  # every stream and buffer released at the end


def test_static_profile_captures_one_cuda_graph_and_refuses_other_shapes(fake, kiln_copy, tmp_path):
    build(kiln_copy, BuildRequest(ShapeRequest(batch=(1, 1, 1), static=True)), log=quiet)
    factory = runner_factory("tensorrt")
    params = GenerationParams("a cat", steps=4, seed=2)
    with Pipeline(kiln_copy, factory) as pipe:
        graphed = pipe(params).images
        unet = pipe.runners["unet"]
        assert unet.static and unet.graph is not None
        assert fake.launches == 3 and unet.context.enqueues == 4  # step 1 ran and was captured; 2-4 replayed it
        with pytest.raises(DiffkilnError, match=r"outside the engine's profile \[2, 4, 8, 8\]\.\.\[2, 4, 8, 8\]"):
            pipe(GenerationParams("a cat", steps=2, height=128))
    with Pipeline(kiln_copy, runner_factory("ort")) as pipe:
        assert np.array_equal(graphed, pipe(params).images)


def test_stale_or_missing_engines_are_refused_with_the_rebuild_command(fake, kiln_copy, tmp_path, monkeypatch):
    args = ("a cat", "-m", kiln_copy, "--steps", 1, "--backend", "tensorrt", "-o", tmp_path / "x.png")
    one_line_error(run(*args), "has no engines for 10.13.0.35-sm89; build them with `diffkiln build`")
    build(kiln_copy, BuildRequest(), log=quiet)
    monkeypatch.setattr(fake_trt, "__version__", "10.14.1.48")
    one_line_error(run(*args), "no engines for 10.14.1.48-sm89 (it holds engines for 10.13.0.35-sm89)")
    monkeypatch.setattr(fake_trt, "__version__", DEVICE.trt_version)
    one_line_error(run(*args, "--engines", kiln_copy / "engines" / "10.13.0.35-sm90"), "has no engines for")
    assert run(*args, "--engines", kiln_copy / "engines" / DEVICE.key).exit_code == 0  # the key folder itself

    a = save_kohya(make_lora(kiln_copy, "attn", seed=6, alpha=2.0), tmp_path / "a.safetensors")
    folded = Path(fold_loras(kiln_copy, [(a, 0.9)], tmp_path / "folded", log=quiet)["out"])
    other = ("a cat", "-m", folded, "--steps", 1, "--backend", "tensorrt", "--engines", kiln_copy / "engines")
    one_line_error(run(*other, "-o", tmp_path / "y.png"), "stale engine: built with other LoRAs folded in")
    assert not (tmp_path / "y.png").exists()


def test_engines_root_must_be_a_real_folder(fake, kiln_copy, tmp_path):
    build(kiln_copy, BuildRequest(), log=quiet)
    link = tmp_path / "link"
    link.symlink_to(kiln_copy / "engines", target_is_directory=True)
    args = ("a cat", "-m", kiln_copy, "--steps", 1, "--backend", "tensorrt", "-o", tmp_path / "x.png")
    one_line_error(run(*args, "--engines", link), "is a symbolic link")
    (tmp_path / "file").write_text("x")
    one_line_error(run(*args, "--engines", tmp_path / "file"), "is not a folder of engines")


def test_stripped_plans_are_refitted_from_the_onnx_at_load(fake, kiln_copy):
    build(kiln_copy, BuildRequest(options=BuildOptions(strip_weights=True)), log=quiet)
    params = GenerationParams("a cat", steps=2, seed=1)
    with Pipeline(kiln_copy, runner_factory("tensorrt")) as pipe:
        assert all(r.loaded.record["stripped"] and r.loaded.engine.refits == 1 for r in pipe.runners.values())
        got = pipe(params).images
    with Pipeline(kiln_copy, runner_factory("ort")) as pipe:
        assert np.array_equal(got, pipe(params).images)


def test_refit_state_rules():
    payload = refit.Payload({}, {"unet": {"a": np.zeros(1), "b": np.zeros(1)}, "text_encoder": {"t": np.zeros(1)}})
    smaller = refit.Payload({}, {"unet": {"a": np.zeros(1)}})
    state = refit.RefitState()
    steps = state.steps(payload, ["text_encoder", "unet", "vae_decoder"])
    assert {k: (sorted(u), base) for k, (u, base) in steps.items()} == {
        "text_encoder": (["t"], False),
        "unet": (["a", "b"], False),
    }  # nothing changed yet: set the payload's keys, no need to start from base
    state.applied(payload)
    steps = state.steps(smaller, ["text_encoder", "unet", "vae_decoder"])
    assert {k: (sorted(u), base) for k, (u, base) in steps.items()} == {
        "text_encoder": ([], True),
        "unet": (["a"], True),
    }  # b and t were changed and are not in the new payload: those components start from the base
    state.applied(smaller)
    assert state.steps(smaller, ["unet"])["unet"][1] is False  # the same keys again: absolute values, no reset
    assert set(state.steps(None, ["text_encoder", "unet"])) == {"unet"}  # back to base where anything changed


def test_refit_a_b_a_leaves_exactly_a_and_base_restores_base(fake, kiln_copy, tmp_path, monkeypatch):
    build(kiln_copy, BuildRequest(options=BuildOptions(refit=True)), log=quiet)
    a = save_kohya(make_lora(kiln_copy, "attn", seed=6, alpha=2.0), tmp_path / "a.safetensors")
    b = save_diffusers(make_lora(kiln_copy, "attn+ff+conv+te", seed=7), tmp_path / "b.safetensors")
    pa, pb = tmp_path / "a.refit", tmp_path / "b.refit"
    folded = Path(fold_loras(kiln_copy, [(a, 0.9)], tmp_path / "folded-a", refit_payload=pa, log=quiet)["out"])
    fold_loras(kiln_copy, [(b, 0.5)], None, refit_payload=pb, log=quiet)
    sha = build_mod.kiln.manifest_sha256(kiln_copy)

    def weights(pipe, component):
        return pipe.runners[component].loaded.engine.weights

    with Pipeline(kiln_copy, runner_factory("tensorrt")) as pipe:
        state = refit.RefitState()
        for path in (pa, pb, pa):
            refit.apply(pipe.runners, state, refit.read_payload(path), sha, path)
        assert pipe.runners["text_encoder"].loaded.engine.refits == 2  # B's change undone from the base
        for component in ("text_encoder", "unet"):
            graph = ComponentGraph(folded / component)
            held = weights(pipe, component)
            assert all(held[n].tobytes() == graph.read(n).tobytes() for n in graph.tensors), component
        refit.apply(pipe.runners, state, None, sha, pa)
        base = ComponentGraph(kiln_copy / "unet")
        assert all(weights(pipe, "unet")[n].tobytes() == base.read(n).tobytes() for n in base.tensors)

    first = next(iter(refit.read_payload(pa).tensors["unet"]))
    monkeypatch.setitem(fake_trt.FUSED, first, "model.conv_in.bias")  # TensorRT fused a LoRA'd weight with another
    with Pipeline(kiln_copy, runner_factory("tensorrt")) as pipe:
        refit.apply(pipe.runners, refit.RefitState(), refit.read_payload(pa), sha, pa)
        held, graph = weights(pipe, "unet"), ComponentGraph(folded / "unet")
        assert all(held[n].tobytes() == graph.read(n).tobytes() for n in graph.tensors)  # refit from base + A
    monkeypatch.delitem(fake_trt.FUSED, first)

    args = ("a red circle", "--steps", 3, "--seed", 4)
    trt = run(*args, "-m", kiln_copy, "--backend", "tensorrt", "--refit-payload", pa, "-o", tmp_path / "t.png")
    assert trt.exit_code == 0 and "refitted 1 engine(s)" in trt.output, trt.output
    ort = run(*args, "-m", folded, "-o", tmp_path / "o.png")
    assert ort.exit_code == 0, ort.output
    assert np.array_equal(image(tmp_path / "t.png"), image(tmp_path / "o.png"))  # refit = folding, pixel for pixel


def test_refit_refusals(fake, kiln_copy, tmp_path, tiny_kiln):
    build(kiln_copy, BuildRequest(), log=quiet)
    a = save_kohya(make_lora(kiln_copy, "attn", seed=6, alpha=2.0), tmp_path / "a.safetensors")
    pa, other = tmp_path / "a.refit", tmp_path / "other.refit"
    fold_loras(kiln_copy, [(a, 0.9)], None, refit_payload=pa, log=quiet)
    args = ("a cat", "-m", kiln_copy, "--steps", 1, "--backend", "tensorrt", "-o", tmp_path / "x.png")
    one_line_error(run(*args, "--refit-payload", pa), "the unet engine was built without --refit")
    build(kiln_copy, BuildRequest(options=BuildOptions(refit=True)), log=quiet)
    shutil.copytree(tiny_kiln, tmp_path / "k2")
    (tmp_path / "k2" / "manifest.json").write_text((tmp_path / "k2" / "manifest.json").read_text() + "\n")
    fold_loras(tmp_path / "k2", [(a, 0.9)], None, refit_payload=other, log=quiet)
    one_line_error(run(*args, "--refit-payload", other), "was computed from another kiln dir")
    (tmp_path / "junk.refit").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    one_line_error(run(*args, "--refit-payload", tmp_path / "junk.refit"), "is not a diffkiln refit payload")
    assert not (tmp_path / "x.png").exists()


def test_without_tensorrt_run_says_what_to_install(tiny_kiln, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tensorrt" else real(n, *a))
    args = ("a cat", "-m", tiny_kiln, "--steps", 1, "-o", tmp_path / "x.png")
    one_line_error(
        run(*args, "--backend", "tensorrt"), "needs tensorrt, which is not installed: pip install diffkiln[tensorrt]"
    )
    one_line_error(run(*args, "--engines", tmp_path), "--engines is only used by --backend tensorrt")
    assert run(*args, "--refit-payload", tmp_path / "p").exit_code == 2  # a usage error: it needs tensorrt
    assert not (tmp_path / "x.png").exists()


def test_inspect_shows_engines_and_what_makes_them_stale(fake, kiln_copy, tmp_path):
    build(kiln_copy, BuildRequest(options=BuildOptions(refit=True)), log=quiet)
    shown = CliRunner().invoke(main, ["inspect", str(kiln_copy)])
    assert shown.exit_code == 0, shown.output
    assert f"TensorRT {DEVICE.trt_version}, NVIDIA Fake GPU (sm8.9)" in shown.output
    unet = [line for line in shown.output.splitlines() if line.strip().startswith("unet") and " kB " in line][-1]
    assert (
        "fp32" in unet
        and "sample [1, 4, 4, 4]..[16, 4, 16, 16]" in unet
        and " kB " in unet
        and "refit" in unet
        and "current" in unet
    )
    a = save_kohya(make_lora(kiln_copy, "attn", seed=6, alpha=2.0), tmp_path / "a.safetensors")
    folded = Path(fold_loras(kiln_copy, [(a, 0.9)], tmp_path / "folded", log=quiet)["out"])
    stale = CliRunner().invoke(main, ["inspect", str(folded), "--engines", str(kiln_copy / "engines"), "--json"])
    assert stale.exit_code == 0, stale.output
    (folder,) = json.loads(stale.output)["engines"]
    assert folder["key"] == DEVICE.key and folder["components"]["unet"]["stale"].startswith("unet was built from")
    one_line_error(CliRunner().invoke(main, ["inspect", str(folded), "--engines", str(tmp_path)]), "holds no engine")
