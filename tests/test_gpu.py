"""TensorRT on a real GPU (`pytest -m gpu`; skipped with the reason where nvidia-smi finds no GPU, see conftest).

Engines for every component of the demo model at fp32, fp16 and int8 (the precision stage's tensorrt-target
graphs, built strongly typed), compared with ONNX Runtime on the same feeds and images; `diffkiln run --backend
tensorrt`; LoRA refit A → B → A giving exactly A's outputs and the base's after a reset; a stale engine refused.
The same code paths run on CPU through a stand-in TensorRT in test_trt_runner.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from lora_helpers import make_lora, save_diffusers, save_kohya
from PIL import Image

from diffkiln import kiln
from diffkiln.bench.fidelity import psnr
from diffkiln.builder.build import BuildRequest, build
from diffkiln.builder.trt import BuildOptions
from diffkiln.cli import main
from diffkiln.lora import fold_loras
from diffkiln.runtime import refit
from diffkiln.runtime.backends import runner_factory
from diffkiln.runtime.pipeline import GenerationParams, Pipeline
from diffkiln.runtime.runners import OrtRunner
from diffkiln.specs import PipelineInfo, component_specs, dims

pytestmark = pytest.mark.gpu
COMPONENT_BARS = {"fp32": 60.0, "fp16": 40.0, "int8": 30.0}  # dB against fp32 ONNX Runtime, per component output
IMAGE_BARS = {"fp32": 50.0, "fp16": 35.0, "int8": 28.0}  # dB against the fp32 ORT image (the precision issue's)


def quiet(_msg):
    pass


@pytest.fixture(scope="module")
def engines_for(demo_kiln, tmp_path_factory):
    """{precision: kiln dir with engines in KILN/engines} for the demo model."""
    pytest.importorskip("tensorrt")
    from diffkiln.calibration import optimize_with_calibration

    made = {}
    for precision in COMPONENT_BARS:
        out = tmp_path_factory.mktemp("trt") / precision
        optimize_with_calibration(demo_kiln, "tensorrt", precision, out=out, count=2, log=quiet)
        build(out, BuildRequest(), log=quiet)
        made[precision] = out
    return made


def _feeds(kiln_dir: Path, component: str) -> dict:
    info = PipelineInfo.from_json(kiln.read_manifest(kiln_dir)["pipeline"])
    return component_specs(info)[component].sample_inputs(dims(2, 8, 8), info, seed=5)


@pytest.mark.parametrize("precision", list(COMPONENT_BARS))
def test_every_component_engine_matches_onnx_runtime(engines_for, demo_kiln, precision):
    factory = runner_factory("tensorrt")
    for component in ("text_encoder", "unet", "vae_decoder"):
        feeds = _feeds(demo_kiln, component)
        with OrtRunner(kiln.model_path(demo_kiln, component)) as ort:
            ref = ort.infer(feeds)
        with factory(kiln.model_path(engines_for[precision], component)) as trt:
            got = trt.infer(feeds)
        for name, value in ref.items():
            scale = float(np.abs(value).max()) or 1.0
            db = psnr(got[name].astype(np.float32) / scale, value / scale)
            assert db >= COMPONENT_BARS[precision], (precision, component, name, db)


@pytest.mark.parametrize("precision", list(IMAGE_BARS))
def test_run_backend_tensorrt_meets_the_image_bars(engines_for, demo_kiln, tmp_path, precision):
    args = ["run", "a red circle on a blue background", "--steps", "10", "--seed", "3"]
    trt = CliRunner().invoke(main, [*args, "-m", str(engines_for[precision]), "--backend", "tensorrt",
                                    "-o", str(tmp_path / "trt.png")])  # fmt: skip
    assert trt.exit_code == 0, trt.output
    ort = CliRunner().invoke(main, [*args, "-m", str(demo_kiln), "-o", str(tmp_path / "ort.png")])
    assert ort.exit_code == 0, ort.output
    got, ref = (np.asarray(Image.open(tmp_path / f), np.float32) / 255 for f in ("trt.png", "ort.png"))
    assert psnr(got, ref) >= IMAGE_BARS[precision]


def test_refit_a_b_a_gives_a_and_reset_gives_base(tiny_kiln, tmp_path):
    pytest.importorskip("tensorrt")
    import shutil

    base = shutil.copytree(tiny_kiln, tmp_path / "kiln")
    build(base, BuildRequest(options=BuildOptions(refit=True)), log=quiet)
    a = save_kohya(make_lora(base, "attn", seed=6, alpha=2.0), tmp_path / "a.safetensors")
    b = save_diffusers(make_lora(base, "attn+ff+conv+te", seed=7), tmp_path / "b.safetensors")
    pa, pb = tmp_path / "a.refit", tmp_path / "b.refit"
    folded = Path(fold_loras(base, [(a, 0.9)], tmp_path / "folded", refit_payload=pa, log=quiet)["out"])
    fold_loras(base, [(b, 0.5)], None, refit_payload=pb, log=quiet)
    sha = kiln.manifest_sha256(base)
    params = GenerationParams("a cat", steps=3, seed=1)

    with Pipeline(base, runner_factory("tensorrt")) as pipe:
        before = pipe(params).images
        state = refit.RefitState()
        refit.apply(pipe.runners, state, refit.read_payload(pa), sha, pa)
        once = pipe(params).images
        for path in (pb, pa):
            refit.apply(pipe.runners, state, refit.read_payload(path), sha, path)
        assert np.array_equal(pipe(params).images, once)  # A → B → A: exactly A again
        refit.apply(pipe.runners, state, None, sha, pa)
        assert np.array_equal(pipe(params).images, before)  # and the base, bit for bit
    with Pipeline(folded, runner_factory("ort")) as pipe:
        assert psnr(once, pipe(params).images) >= 50  # refitting A = folding A


def test_stale_engine_is_refused(tiny_kiln, tmp_path):
    pytest.importorskip("tensorrt")
    import shutil

    base = shutil.copytree(tiny_kiln, tmp_path / "kiln")
    build(base, BuildRequest(), log=quiet)
    a = save_kohya(make_lora(base, "attn", seed=6, alpha=2.0), tmp_path / "a.safetensors")
    folded = fold_loras(base, [(a, 0.9)], tmp_path / "folded", log=quiet)["out"]
    result = CliRunner().invoke(main, ["run", "a cat", "-m", str(folded), "--backend", "tensorrt", "--engines",
                                       str(base / "engines"), "-o", str(tmp_path / "x.png")])  # fmt: skip
    assert result.exit_code == 1 and "stale engine: built with other LoRAs" in result.output, result.output
    assert not (tmp_path / "x.png").exists()
