"""The TensorRT build stage around the GPU call: profiles, the engine manifest and its stale-engine rules, the
stage writer for engine folders, and the one-line refusals where TensorRT or a GPU is missing (this machine)."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from diffkiln import engines, kiln
from diffkiln.builder import build as build_mod
from diffkiln.builder.build import BuildRequest, parse_gpu, plan_build
from diffkiln.builder.profiles import ShapeRequest, dim_ranges, input_profiles, is_static, parse_range
from diffkiln.cli import main
from diffkiln.errors import DiffkilnError, KilnError, OutputError

DEVICE = engines.Device("10.13.0.35", "NVIDIA L4", "8.9")


def test_parse_range():
    assert parse_range("1:2:4", "--batch") == (1, 2, 4)
    assert parse_range("3", "--batch") == (3, 3, 3)
    assert parse_range(None, "--batch") is None
    for bad in ("4:2:1", "0", "1:2", "a:b:c", "1:2:3:4"):
        with pytest.raises(DiffkilnError, match="--batch must be"):
            parse_range(bad, "--batch")


def test_unet_profile_doubles_batch_for_cfg(tiny_kiln):
    manifest = kiln.read_manifest(tiny_kiln)
    contract = manifest["components"]["unet"]["contract"]
    request = ShapeRequest(batch=(1, 1, 4), height=(256, 512, 768), width=(512, 512, 512))
    profiles = input_profiles("unet", contract, request)
    sample = profiles["sample"]
    assert sample == ((1, 4, 32, 64), (2, 4, 64, 64), (8, 4, 96, 64))  # min 1: a run without guidance
    assert profiles["timestep"] == ((1,), (2,), (8,))
    seq = contract["profile"]["sequence"]
    assert profiles["encoder_hidden_states"][2][1] == seq[2]
    vae = input_profiles("vae_decoder", manifest["components"]["vae_decoder"]["contract"], request)
    assert vae["latent_sample"][0][0] == 1 and vae["latent_sample"][2][0] == 4  # no CFG batch in the VAE
    text = input_profiles("text_encoder", manifest["components"]["text_encoder"]["contract"], request)
    assert text["input_ids"] == ((1, 77), (2, 77), (8, 77))  # prompts are encoded [uncond; cond] in one call
    static = input_profiles("unet", contract, ShapeRequest(batch=(1, 1, 1), static=True))
    assert static["sample"][0] == static["sample"][2] == (2, 4, 8, 8)  # static: the CFG batch only


def test_static_profile_and_image_dims():
    ranges = dim_ranges("vae_encoder", {"batch": (1, 1, 8), "height": (4, 8, 16), "width": (4, 8, 16)},
                        ShapeRequest(static=True))  # fmt: skip
    assert ranges["batch"] == (1, 1, 1) and ranges["height"] == (8, 8, 8)
    assert ranges["image_height"] == (64, 64, 64)
    assert is_static({"x": ((1, 2), (1, 2), (1, 2))})
    assert not is_static({"x": ((1, 2), (1, 3), (1, 4))})
    with pytest.raises(DiffkilnError, match="multiples of 8"):
        dim_ranges("unet", {"height": (4, 8, 16)}, ShapeRequest(height=(100, 100, 100)))


def test_plan_refuses_other_target_and_unknown_component(tiny_kiln):
    manifest = kiln.read_manifest(tiny_kiln)
    plans = plan_build(tiny_kiln, manifest, BuildRequest())
    assert set(plans) == set(manifest["components"])
    assert plans["unet"]["source_sha256"] == manifest["components"]["unet"]["files"]["model.onnx"]["sha256"]
    cpu = {**manifest, "optimized": {"target": "ort-cpu", "precision": "int8"}}
    with pytest.raises(KilnError, match=r"optimized for ort-cpu.*--target tensorrt"):
        plan_build(tiny_kiln, cpu, BuildRequest())
    with pytest.raises(DiffkilnError, match="no component 'transformer'"):
        plan_build(tiny_kiln, manifest, BuildRequest(components=("transformer",)))


def test_parse_gpu():
    assert parse_gpu("NVIDIA H200, 9.0") == ("NVIDIA H200", "9.0")
    with pytest.raises(DiffkilnError, match="cannot read the GPU"):
        parse_gpu("")
    assert engines.engine_key("10.13.0.35", "9.0") == "10.13.0.35-sm90"
    assert DEVICE.key == "10.13.0.35-sm89"


def _engine_dir(tmp_path, manifest, components=("unet",)):
    """An engine folder written through the stage writer, as build() writes it (the plan bytes are fake)."""
    out = tmp_path / "engines" / DEVICE.key
    out.parent.mkdir(exist_ok=True)
    records = {}
    writer = kiln.StageWriter(out, "build", {"x": 1}, reader=engines.read_engine_manifest, **engines.WRITER_OPTIONS)
    with writer as w:
        for name in components:
            (w.tmp / f"{name}.plan").write_bytes(b"plan" * 10)
            records[name] = engines.component_record(
                plan=f"{name}.plan",
                size=40,
                source_sha256=manifest["components"][name]["files"]["model.onnx"]["sha256"],
                precision="fp32",
                profiles={"sample": ((2, 4, 8, 8),) * 3},
                refit=False,
                stripped=False,
            )
        w.finish(engines.engine_manifest(DEVICE, "m" * 64, manifest.get("lora"), records, {}))
    return out


def test_engine_manifest_round_trip_and_stale_rules(tiny_kiln, tmp_path):
    manifest = kiln.read_manifest(tiny_kiln)
    folder = _engine_dir(tmp_path, manifest)
    assert not list(folder.glob("model_index.json"))  # no interop files in an engine folder
    engine = engines.read_engine_manifest(folder)
    assert engines.find_engine_dir(tmp_path / "engines", DEVICE) == folder
    assert engines.mismatch(engine, "unet", device=DEVICE, kiln_manifest=manifest) is None

    def reason(device=DEVICE, kiln_manifest=manifest, component="unet"):
        return engines.mismatch(engine, component, device=device, kiln_manifest=kiln_manifest)

    assert "TensorRT 10.13.0.35, this is TensorRT 11.4.0" in reason(engines.Device("11.4.0", "NVIDIA L4", "8.9"))
    assert "sm8.9" in reason(engines.Device("10.13.0.35", "NVIDIA H200", "9.0"))
    assert reason(component="vae_decoder") == "has no vae_decoder engine"
    changed = json.loads(json.dumps(manifest))
    changed["components"]["unet"]["files"]["model.onnx"]["sha256"] = "0" * 64
    assert "built from another graph" in reason(kiln_manifest=changed)
    fp16 = json.loads(json.dumps(manifest))
    fp16["components"]["unet"]["precision"] = "fp16"
    assert "engine is fp32, the kiln's graph is fp16" in reason(kiln_manifest=fp16)
    lora = {**manifest, "lora": {"loras": [{"name": "pink"}]}}
    assert "other LoRAs" in reason(kiln_manifest=lora)
    with pytest.raises(KilnError, match=r"stale engine: .*diffkiln build .* --force"):
        engines.check_engine(engine, "unet", device=DEVICE, kiln_manifest=changed, kiln_dir=tiny_kiln)
    with pytest.raises(KilnError, match=r"no engines for 11.4.0-sm90 \(it holds engines for 10.13.0.35-sm89\)"):
        engines.find_engine_dir(tmp_path / "engines", engines.Device("11.4.0", "H200", "9.0"))


def test_engine_manifest_refuses_hostile_files(tiny_kiln, tmp_path):
    folder = _engine_dir(tmp_path, kiln.read_manifest(tiny_kiln))
    path = folder / engines.ENGINE_MANIFEST
    good = json.loads(path.read_text())
    cases = {
        "outside": {**good, "components": {"unet": {**good["components"]["unet"], "plan": "../../x.plan"}}},
        "format": {**good, "format": "other"},
        "device": {**good, "device": {"trt_version": 10}},
        "empty": {**good, "components": {}},
        "size": {**good, "components": {"unet": {**good["components"]["unet"], "bytes": 41}}},
    }
    for case, data in cases.items():
        path.write_text(json.dumps(data))
        with pytest.raises(KilnError) as e:
            engines.read_engine_manifest(folder)
        assert "\n" not in str(e.value), case
    path.write_text("{not json")
    with pytest.raises(KilnError, match="not readable JSON"):
        engines.read_engine_manifest(folder)


def test_engine_folder_is_never_replaced_without_force(tiny_kiln, tmp_path):
    manifest = kiln.read_manifest(tiny_kiln)
    folder = _engine_dir(tmp_path, manifest)
    with pytest.raises(OutputError, match="--force"), kiln.StageWriter(
        folder, "build", {"x": 2}, reader=engines.read_engine_manifest, **engines.WRITER_OPTIONS,
    ):  # fmt: skip
        pass
    writer = kiln.StageWriter(folder, "build", {"x": 1}, reader=engines.read_engine_manifest, **engines.WRITER_OPTIONS)
    with writer as w:
        assert w.up_to_date


def test_check_shapes_names_the_profile():
    profile = {"sample": [[2, 4, 8, 8], [2, 4, 8, 8], [8, 4, 16, 16]]}
    engines.check_shapes("unet", profile, {"sample": (4, 4, 12, 12)})
    with pytest.raises(KilnError, match=r"shape \[16, 4, 8, 8\], outside the engine's profile \[2, 4, 8, 8\]"):
        engines.check_shapes("unet", profile, {"sample": (16, 4, 8, 8)})


def test_build_without_tensorrt_is_one_line(tiny_kiln, monkeypatch):
    monkeypatch.setattr(build_mod, "missing_requirements", lambda: "TensorRT is not installed: pip install x")
    result = CliRunner().invoke(main, ["build", str(tiny_kiln), "--batch", "1:2:4"])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: TensorRT is not installed: pip install x"
    bad = CliRunner().invoke(main, ["build", str(tiny_kiln), "--height", "1:2"])
    assert bad.exit_code == 1 and "--height must be" in bad.output
    assert not (tiny_kiln / "engines").exists()


def test_import_never_loads_tensorrt():
    code = (
        "import sys, diffkiln, diffkiln.cli, diffkiln.builder.build, diffkiln.engines; print('tensorrt' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
