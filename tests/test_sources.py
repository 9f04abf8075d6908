import json

import pytest

from diffkiln.errors import SourceError
from diffkiln.exporter import open_source
from diffkiln.exporter.presets import PRESETS


def test_presets_describe_their_pipelines():
    assert set(PRESETS) == {"tiny", "tiny-sdxl", "sd15", "sd21", "sdxl"}
    tiny, xl, sd21, sd15 = (open_source(n).info for n in ("tiny", "tiny-sdxl", "sd21", "sd15"))
    assert (tiny.kind, tiny.text_hidden, tiny.cross_attention_dim) == ("sd1", (32,), 32)
    assert (xl.kind, xl.text_hidden, xl.text_embeds_dim, xl.time_ids_dim) == ("sdxl", (32, 32), 32, 6)
    assert (sd21.prediction_type, sd21.text_hidden, sd21.cross_attention_dim) == ("v_prediction", (1024,), 1024)
    assert (sd15.text_hidden, sd15.vocab_size, sd15.num_down) == ((768,), 49408, 3)
    assert open_source("sdxl").info.text_embeds_dim == 1280


def test_preset_weights_are_seeded():
    a, b = open_source("tiny").load("unet"), open_source("tiny").load("unet")
    assert all((pa == pb).all() for pa, pb in zip(a.parameters(), b.parameters(), strict=True))


def test_real_architecture_sizes():
    """sd15's UNet has the real SD1.5 parameter count (859.5M), so speed and memory are real."""
    from diffusers import UNet2DConditionModel

    config = PRESETS["sd15"].unet
    with __import__("torch").device("meta"):
        unet = UNet2DConditionModel(**config)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


def test_folder_source_matches_the_preset(tiny_folder):
    folder = open_source(str(tiny_folder))
    assert folder.kind == "folder"
    assert folder.info == open_source("tiny").info
    assert folder.components == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    assert folder.fingerprint().startswith("folder:")


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("runwayml/stable-diffusion-v1-5", "looks like a Hugging Face hub id"),
        ("/no/such/model", "no such folder: /no/such/model"),
    ],
)
def test_unusable_references(ref, message):
    with pytest.raises(SourceError, match=message):
        open_source(ref)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(SourceError, match=r"has no model_index\.json"):
        open_source(str(tmp_path))


def test_folder_missing_a_module(folder_copy):
    import shutil

    shutil.rmtree(folder_copy / "vae")
    with pytest.raises(SourceError, match=r"missing vae/"):
        open_source(str(folder_copy))


def test_corrupt_safetensors(folder_copy):
    weights = folder_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
    with pytest.raises(SourceError, match="is not a valid safetensors file"):
        open_source(str(folder_copy))


def test_corrupt_config(folder_copy):
    (folder_copy / "unet" / "config.json").write_text("{not json")
    with pytest.raises(SourceError, match="is not valid JSON"):
        open_source(str(folder_copy))


def test_fingerprint_follows_the_weights(folder_copy):
    before = open_source(str(folder_copy)).fingerprint()
    config = folder_copy / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "steps_offset": 0}))
    assert open_source(str(folder_copy)).fingerprint() != before
