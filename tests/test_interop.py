"""Kiln dirs in the ONNX Stable Diffusion ecosystem's layout, and that layout read back.

- every stage writes model_index.json and each component's config.json (what optimum's ORTStableDiffusionPipeline,
  optimum-intel and ONNX Runtime's optimize_pipeline.py read), and text encoders give hidden_states.0…L in order;
- an optimum folder (what `optimum-cli export onnx` writes: no manifest, int64 ids, scalar timestep) runs,
  optimizes and takes LoRAs like the kiln it was made from, pixel for pixel.

The optimum folders here are written by tools/make_optimum_fixture.py from tiny kilns; OPTIMUM_IO is the graph
I/O that real `optimum-cli export onnx` (optimum 2.1.0 + optimum-onnx 0.1.0, transformers 4.57.6, torch 2.13) wrote
for the same tiny pipelines, so the fixture is held to the real thing. With DIFFKILN_OPTIMUM_PYTHON pointing at
a Python that has optimum, `test_optimum_loads_kilns_unchanged` runs optimum itself on kiln dirs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from lora_helpers import make_lora, save_kohya

from diffkiln import interop, kiln
from diffkiln.errors import KilnError
from diffkiln.kiln_reader import graph_io
from diffkiln.lora import fold_loras
from diffkiln.runtime.pipeline import GenerationParams, Pipeline
from diffkiln.specs import PipelineInfo, component_specs, dims
from diffkiln.weight_map import map_from_graph

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a blue background"
SAMPLER = {"tiny": "ddim", "tiny-sdxl": "euler"}  # the schedulers the presets' configs name

F, I64 = "float32", "int64"
_SEQ = [(f"hidden_states.{i}", F, 3) for i in range(3)]  # the tiny CLIPs have 2 layers
OPTIMUM_IO = {  # graph_io of real optimum-cli exports of the tiny presets (opset aside)
    "tiny": {
        "text_encoder": ([("input_ids", I64, 2)], [("last_hidden_state", F, 3), ("pooler_output", F, 2)]),
        "unet": (
            [("sample", F, 4), ("timestep", F, 0), ("encoder_hidden_states", F, 3)],
            [("out_sample", F, 4)],
        ),
        "vae_decoder": ([("latent_sample", F, 4)], [("sample", F, 4)]),
        "vae_encoder": ([("sample", F, 4)], [("latent_parameters", F, 4)]),
    },
    "tiny-sdxl": {
        "text_encoder": ([("input_ids", I64, 2)], [("last_hidden_state", F, 3), ("pooler_output", F, 2), *_SEQ]),
        "text_encoder_2": ([("input_ids", I64, 2)], [("text_embeds", F, 2), ("last_hidden_state", F, 3), *_SEQ]),
        "unet": (
            [
                ("sample", F, 4),
                ("timestep", F, 0),
                ("encoder_hidden_states", F, 3),
                ("text_embeds", F, 2),
                ("time_ids", F, 2),
            ],
            [("out_sample", F, 4)],
        ),
        "vae_decoder": ([("latent_sample", F, 4)], [("sample", F, 4)]),
        "vae_encoder": ([("sample", F, 4)], [("latent_parameters", F, 4)]),
    },
}


def quiet(_msg):
    pass


def tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def images(kiln_dir: Path, preset: str, **kw) -> np.ndarray:
    """uint8 [B, H, W, 3] with guidance on (2·B UNet rows: a scalar timestep serves them all)."""
    params = GenerationParams(PROMPT, kw.pop("negative", ""), steps=3, scheduler=SAMPLER[preset], seed=4, **kw)
    with Pipeline(kiln_dir) as pipe:
        return pipe(params).to_uint8()


@pytest.fixture(scope="module")
def kilns(tiny_kiln, tiny_sdxl_kiln):
    return {"tiny": tiny_kiln, "tiny-sdxl": tiny_sdxl_kiln}


@pytest.fixture(scope="module")
def optimum_dirs(kilns, tmp_path_factory):
    """Each tiny kiln written out as an optimum folder."""
    convert = tool("make_optimum_fixture").convert
    root = tmp_path_factory.mktemp("optimum")
    return {preset: convert(k, root / preset) for preset, k in kilns.items()}


# --- writing: the interop files and the text encoders' hidden states -------------------------------------------


def test_text_encoders_give_every_hidden_state_in_index_order(tiny_sdxl_kiln):
    """hidden_states.i is transformers' hidden_states[i] (the order optimum-intel reads them by position)."""
    import torch

    from diffkiln.exporter import open_source
    from diffkiln.parity import ort_session

    manifest = kiln.read_manifest(tiny_sdxl_kiln)
    assert manifest["pipeline"]["text_layers"] == [2, 2] and manifest["pipeline"]["contract"] == "diffkiln"
    names = {c: [t["name"] for t in manifest["components"][c]["contract"]["outputs"]] for c in interop.TEXT_ENCODERS}
    states = ["hidden_states.0", "hidden_states.1", "hidden_states.2"]
    assert names["text_encoder"] == ["last_hidden_state", "pooler_output", *states, "penultimate_hidden_state"]
    assert names["text_encoder_2"] == ["text_embeds", "last_hidden_state", *states, "penultimate_hidden_state"]
    info = PipelineInfo.from_json(manifest["pipeline"])
    source = open_source("tiny-sdxl")
    for name in interop.TEXT_ENCODERS:
        session = ort_session(kiln.model_path(tiny_sdxl_kiln, name))
        assert [o.name for o in session.get_outputs()] == names[name]
        ids = component_specs(info)[name].sample_inputs(dims(2, 8, 8), info, seed=3)["input_ids"]
        got = dict(zip(names[name], session.run(None, {"input_ids": ids}), strict=True))
        with torch.no_grad():
            ref = source.load(name)(torch.from_numpy(ids).long(), output_hidden_states=True).hidden_states
        assert len(ref) == 3
        for i, state in enumerate(ref):
            np.testing.assert_allclose(got[f"hidden_states.{i}"], state.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_array_equal(got["penultimate_hidden_state"], got["hidden_states.1"])
        assert not np.allclose(got["hidden_states.1"], got["hidden_states.2"])


def read_interop(k: Path) -> dict:
    return {
        p.relative_to(k).as_posix(): json.loads(p.read_text())
        for p in [k / interop.INDEX, *sorted(k.glob(f"*/{interop.CONFIG}"))]
    }


def test_export_writes_what_optimum_reads(kilns):
    files = read_interop(kilns["tiny-sdxl"])
    assert sorted(files) == [
        "model_index.json",
        *(f"{c}/config.json" for c in ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")),
    ]
    index = files["model_index.json"]
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["scheduler"] == [
        "diffusers",
        "EulerDiscreteScheduler",
    ]
    assert files["text_encoder/config.json"]["num_hidden_layers"] == 2
    assert files["text_encoder_2/config.json"]["projection_dim"] == 32
    unet = files["unet/config.json"]
    assert (unet["_class_name"], unet["in_channels"], unet["sample_size"]) == ("UNet2DConditionModel", 4, 8)
    assert unet["addition_embed_type"] == "text_time"
    for part in interop.VAE_PARTS:
        vae = files[f"{part}/config.json"]
        assert vae["_class_name"] == "AutoencoderKL" and len(vae["block_out_channels"]) == 4  # VAE scale 8
        assert vae["scaling_factor"] == kiln.read_manifest(kilns["tiny-sdxl"])["pipeline"]["scaling_factor"]
    sd1 = read_interop(kilns["tiny"])["model_index.json"]
    assert sd1["_class_name"] == "StableDiffusionPipeline" and sd1["requires_safety_checker"] is False


def test_a_folder_sources_own_model_index_is_kept(tiny_folder, tmp_path):
    from diffkiln.exporter import ExportOptions, export, open_source

    export(open_source(str(tiny_folder)), tmp_path / "k", ExportOptions(components=("vae_decoder",)), quiet)
    ours = json.loads((tmp_path / "k" / interop.INDEX).read_text())
    assert ours == json.loads((tiny_folder / interop.INDEX).read_text())
    assert sorted(p.name for p in (tmp_path / "k").iterdir() if p.is_dir()) == ["scheduler", "tokenizer", "vae_decoder"]


def test_every_stage_writes_the_interop_files(tiny_kiln, tmp_path):
    from diffkiln.optimizers.optimize import optimize

    want = read_interop(tiny_kiln)
    optimized, folded = tmp_path / "opt", tmp_path / "lora"
    optimize(tiny_kiln, "ort-cpu", out=optimized, log=quiet)
    lora = save_kohya(make_lora(tiny_kiln, "attn+te", seed=2), tmp_path / "l.safetensors")
    fold_loras(optimized, [(lora, 1.0)], folded, log=quiet)
    for out in (optimized, folded):
        assert read_interop(out) == want, out
        kiln.read_manifest(out)  # every file record still matches its file


def test_a_manifest_without_the_interop_record_gets_configs_from_its_pipeline(tiny_sdxl_kiln, tmp_path):
    old = shutil.copytree(tiny_sdxl_kiln, tmp_path / "old")
    manifest = json.loads((old / kiln.MANIFEST).read_text())
    del manifest["interop"]
    with kiln.StageWriter(tmp_path / "out", "copy", None, log=quiet) as w:
        for name in manifest["components"]:
            shutil.copytree(old / name, w.tmp / name, ignore=shutil.ignore_patterns(interop.CONFIG))
        w.finish(manifest)
    files = read_interop(tmp_path / "out")
    assert files["model_index.json"]["_class_name"] == "StableDiffusionXLPipeline"
    assert files["text_encoder_2/config.json"]["num_hidden_layers"] == 2
    assert files["unet/config.json"]["in_channels"] == 4 and files["unet/config.json"]["sample_size"] == 8
    assert len(files["vae_decoder/config.json"]["block_out_channels"]) == 4
    assert files["vae_decoder/config.json"]["scaling_factor"] == manifest["pipeline"]["scaling_factor"]


def test_graph_names_give_the_value_matched_weight_map(kilns):
    """On our own exports, reading the map off node scopes and initializer names gives exactly what matching
    torch weight values gave: so it can be trusted on optimum folders, which come without torch weights."""
    for k in kilns.values():
        weight_map = kiln.read_weight_map(k)
        for name, entries in weight_map.items():
            assert map_from_graph(kiln.model_path(k, name), name) == entries, name
    assert any(e["transposed"] for e in weight_map["unet"].values())


# --- reading: optimum folders ----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_an_optimum_folder_runs_like_its_kiln(kilns, optimum_dirs, preset):
    folder = optimum_dirs[preset]
    assert not (folder / kiln.MANIFEST).exists() and not (folder / kiln.WEIGHT_MAP).exists()
    for name, (inputs, outputs) in OPTIMUM_IO[preset].items():
        io = graph_io(kiln.model_path(folder, name))
        assert (io["inputs"], io["outputs"]) == (inputs, outputs), name
    manifest = kiln.read_manifest(folder)
    assert kiln.is_kiln_dir(folder) and manifest["source"]["kind"] == "optimum"
    assert manifest["pipeline"] == {
        **kiln.read_manifest(kilns[preset])["pipeline"],
        "contract": "optimum",
        "text_layers": [2, 2] if preset == "tiny-sdxl" else [0],
    }
    ours, theirs = images(kilns[preset], preset, batch=2), images(folder, preset, batch=2)
    assert ours.shape[0] == 2 and np.array_equal(ours, theirs)
    with_negative = images(folder, preset, negative="blurry")
    assert not np.array_equal(with_negative, theirs[:1])


def test_optimize_and_lora_take_an_optimum_folder(tiny_kiln, optimum_dirs, tmp_path):
    from diffkiln.optimizers.optimize import optimize

    folder = optimum_dirs["tiny"]
    theirs = optimize(folder, "ort-cpu", out=tmp_path / "opt", log=quiet)
    ours = optimize(tiny_kiln, "ort-cpu", out=tmp_path / "opt-ours", log=quiet)
    assert kiln.read_manifest(tmp_path / "opt")["pipeline"]["contract"] == "optimum"
    counts = {c: r["counts"] for c, r in theirs["components"].items()}
    assert counts == {c: r["counts"] for c, r in ours["components"].items()}
    assert counts["unet"]["attention"] == 8 and counts["text_encoder"]["attention"] == 2
    assert np.array_equal(images(tmp_path / "opt", "tiny"), images(tmp_path / "opt-ours", "tiny"))

    lora = save_kohya(make_lora(tiny_kiln, "attn+te", seed=6, alpha=2.0), tmp_path / "l.safetensors")
    fold_loras(tiny_kiln, [(lora, 0.8)], tmp_path / "ours", log=quiet)
    fold_loras(folder, [(lora, 0.8)], tmp_path / "theirs", log=quiet)
    folded = images(tmp_path / "theirs", "tiny")
    assert np.array_equal(folded, images(tmp_path / "ours", "tiny"))
    assert not np.array_equal(folded, images(folder, "tiny"))  # the LoRA changed the image
    assert kiln.read_weight_map(tmp_path / "theirs") == kiln.read_weight_map(tiny_kiln)
    fold_loras(tmp_path / "theirs", [(lora, -0.8)], tmp_path / "undone", log=quiet)  # its weight map went along
    undone = images(tmp_path / "undone", "tiny")
    assert np.abs(undone.astype(int) - images(folder, "tiny").astype(int)).max() <= 1


def test_a_kiln_rewritten_by_ort_optimize_pipeline_reads_back(tiny_kiln, tmp_path):
    """ONNX Runtime's SD optimizer keeps model_index.json + */model.onnx + config.json and drops our files; the
    result is read with diffkiln's own contract (int32 ids). CPU-only fusions: the default ones are CUDA
    kernels, and its attention fusion fails under numpy 2.4 (int() of a 1-element array)."""
    pytest.importorskip("onnxruntime.transformers.models.stable_diffusion.optimize_pipeline")
    out = tmp_path / "ort"
    flags = ["--disable_attention", "--disable_nhwc_conv", "--disable_group_norm", "--disable_skip_group_norm"]
    flags += ["--disable_bias_splitgelu", "--disable_packed_kv", "--disable_packed_qkv", "--disable_bias_add"]
    module = "onnxruntime.transformers.models.stable_diffusion.optimize_pipeline"
    cmd = [sys.executable, "-m", module, "-i", str(tiny_kiln), "-o", str(out), *flags]
    subprocess.run(cmd, check=True, capture_output=True)
    assert not (out / kiln.MANIFEST).exists() and (out / "unet" / "config.json").is_file()
    assert kiln.read_manifest(out)["pipeline"]["contract"] == "diffkiln"
    assert np.array_equal(images(out, "tiny"), images(tiny_kiln, "tiny"))


def test_what_is_and_is_not_a_kiln_dir(tiny_kiln, tiny_folder, optimum_dirs, tmp_path):
    assert kiln.is_kiln_dir(tiny_kiln) and kiln.is_kiln_dir(optimum_dirs["tiny"])
    assert not kiln.is_kiln_dir(tiny_folder) and not kiln.is_kiln_dir(tmp_path)
    with pytest.raises(KilnError, match="nor an optimum ONNX folder"):
        kiln.read_manifest(tiny_folder)
    folder = shutil.copytree(optimum_dirs["tiny"], tmp_path / "copy")
    stamp = kiln.manifest_sha256(folder)  # what stages stamp: it must change when a file does
    assert kiln.file_sha256(folder / kiln.MANIFEST) == stamp
    os.utime(folder / "unet" / "model.onnx", ns=(1, 1))
    assert kiln.manifest_sha256(folder) != stamp


@pytest.mark.skipif(
    not os.environ.get("DIFFKILN_OPTIMUM_PYTHON"), reason="set DIFFKILN_OPTIMUM_PYTHON to a Python with optimum"
)
@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_optimum_loads_kilns_unchanged(kilns, preset, tmp_path):
    """optimum's ORTStableDiffusionPipeline[XL] on the kiln dir gives `diffkiln run`'s image (the float schedulers
    of torch and numpy may round one pixel differently)."""
    from diffkiln.runtime.generate import generate

    latents = tmp_path / "l.npy"
    np.save(latents, np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32))
    png = tmp_path / "d.png"
    run = {"prompt": PROMPT, "steps": 4, "scheduler": SAMPLER[preset], "guidance": 7.5}
    generate(kilns[preset], latents_path=latents, out=png, echo=quiet, **run)
    check = [str(ROOT / "tools" / "check_optimum.py"), str(kilns[preset]), PROMPT, "--steps", "4"]
    check += ["--latents", str(latents), "--expect", str(png), "--max-diff", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([os.environ["DIFFKILN_OPTIMUM_PYTHON"], *check], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
