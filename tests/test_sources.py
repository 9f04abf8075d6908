import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from diffkiln.cli import main
from diffkiln.errors import SourceError
from diffkiln.exporter import open_source
from diffkiln.exporter.presets import CLIP_VOCAB_DIR, PRESETS, TOKENIZER_DIR
from diffkiln.exporter.sources import BUNDLED, save_as_folder
from diffkiln.runtime.tokenizer import ClipTokenizer

PROMPTS = ["a photo of a cat", "A RED circle, on a blue background!!", "it's 8k 日本", "", "a cat " * 50]


def test_presets_describe_their_pipelines():
    assert set(PRESETS) == {"tiny", "tiny-sdxl", "sd15", "sd21", "sdxl", "tiny-flux", "flux-shaped"}
    flux = open_source("flux-shaped").info
    assert (flux.kind, flux.text_hidden, flux.cross_attention_dim, flux.latent_channels) == (
        "flux",
        (768, 4096),
        4096,
        16,
    )
    assert (flux.text_sequence, flux.t5_vocab_size, flux.guidance_embeds, flux.sample_size) == (512, 32128, True, 128)
    assert (flux.text_embeds_dim, flux.scaling_factor, flux.shift_factor) == (768, 0.3611, 0.1159)
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
        ("/no/such/model", "no such folder or file: /no/such/model"),
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


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_folder_saved_by_current_diffusers_exports(tmp_path):
    """`StableDiffusionPipeline(...).save_pretrained(D)` with transformers 5 writes tokenizer.json only (no
    vocab.json/merges.txt) and the text encoder without `text_model.`: `diffkiln export D` reads both, the kiln keeps
    the tokenizer as the source had it, and the runtime's ids equal those of the vocab.json + merges.txt form."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    preset = open_source("tiny")
    modules = {m: preset.load(m) for m in ("text_encoder", "unet", "vae")}
    pipe = StableDiffusionPipeline(
        **modules,
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        scheduler=DDIMScheduler.from_config(preset.scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "model")
    tok = tmp_path / "model" / "tokenizer"
    assert (tok / "tokenizer.json").is_file() and not (tok / "vocab.json").exists()
    assert not any(
        k.startswith("text_model.") for k in load_file(tmp_path / "model" / "text_encoder" / "model.safetensors")
    )

    source = open_source(str(tmp_path / "model"))
    assert source.info == preset.info
    assert _same_weights(source.load("text_encoder"), modules["text_encoder"])
    result = CliRunner().invoke(main, ["export", str(tmp_path / "model"), "-o", str(tmp_path / "kiln")])
    assert result.exit_code == 0, result.output
    kiln_tok = tmp_path / "kiln" / "tokenizer"
    assert sorted(p.name for p in kiln_tok.iterdir()) == sorted(p.name for p in tok.iterdir())
    ids = ClipTokenizer.from_dir(kiln_tok).encode(PROMPTS)
    np.testing.assert_array_equal(ids, ClipTokenizer.from_dir(TOKENIZER_DIR).encode(PROMPTS))
    reference = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)(
        PROMPTS, padding="max_length", max_length=77, truncation=True
    )
    np.testing.assert_array_equal(ids, reference.input_ids)


def test_folder_without_tokenizer_files(folder_copy):
    for name in ("vocab.json", "merges.txt"):
        (folder_copy / "tokenizer" / name).unlink()
    with pytest.raises(SourceError, match=r"tokenizer has no tokenizer\.json \(nor vocab\.json \+ merges\.txt\)"):
        open_source(str(folder_copy))


def _strip_text_model(path):
    state = load_file(path)
    save_file({k.removeprefix("text_model."): v for k, v in state.items()}, str(path), {"format": "pt"})


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_save_as_folder_writes_the_canonical_text_encoder_layout(preset, tmp_path):
    """The keys real SD folders have (`text_model.…`, which transformers 4 needs too); both layouts read back to
    the preset's weights."""
    source = open_source(preset)
    folder = save_as_folder(source, tmp_path / "model")
    names = ["text_encoder", "text_encoder_2"] if source.info.is_sdxl else ["text_encoder"]
    for name in names:
        keys = load_file(folder / name / "model.safetensors").keys()
        assert keys and all(k.startswith(("text_model.", "text_projection.")) for k in keys), name
        assert _same_weights(open_source(str(folder)).load(name), source.load(name)), name
    _strip_text_model(folder / "text_encoder" / "model.safetensors")  # what transformers 5 writes
    assert _same_weights(open_source(str(folder)).load("text_encoder"), source.load("text_encoder"))


def test_text_encoder_with_foreign_keys_is_refused(folder_copy):
    """transformers only warns about weights it cannot place and starts them random; diffkiln refuses."""
    path = folder_copy / "text_encoder" / "model.safetensors"
    save_file({f"clip.{k}": v for k, v in load_file(path).items()}, str(path), {"format": "pt"})
    with pytest.raises(SourceError, match=r"text_encoder lacks 36 weights of its text encoder \(e\.g\. "):
        open_source(str(folder_copy)).load("text_encoder")


# sha256 over the demo text encoder's tensors (names without `text_model.`, dtype, shape, bytes) as trained and
# first saved by tools/train_demo.py, before the re-save in the canonical layout.
DEMO_TEXT_ENCODER_VALUES = "c8fce59df5efae0b07fc32af28834e0cd12b9d510790bde33bd874769601dd9c"


def test_demo_text_encoder_is_in_the_canonical_layout_with_its_trained_values():
    from transformers import CLIPTextModel

    folder = BUNDLED["demo"] / "text_encoder"
    state = load_file(folder / "model.safetensors")
    assert len(state) == 52 and all(k.startswith("text_model.") for k in state)
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        h.update(key.removeprefix("text_model.").encode() + f"{t.dtype}{tuple(t.shape)}".encode() + t.numpy().tobytes())
    assert h.hexdigest() == DEMO_TEXT_ENCODER_VALUES
    model, report = CLIPTextModel.from_pretrained(folder, output_loading_info=True)
    assert not report["missing_keys"] and not report["unexpected_keys"]
    manual = CLIPTextModel(model.config)
    flat = not hasattr(manual, "text_model")
    manual.load_state_dict({(k.removeprefix("text_model.") if flat else k): v for k, v in state.items()}, strict=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model.eval()(ids), manual.eval()(ids)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state) and torch.equal(a.pooler_output, b.pooler_output)


def test_real_presets_ship_the_real_clip_vocabulary(tmp_path):
    """sd15, sd21 and sdxl tokenize as the real models do (SD 2.x and SDXL's second tokenizer pad with "!", id 0);
    the tiny presets keep their 1,000-token BPE, which fits their text encoders."""
    expected = {"sd15": [49407], "sd21": [0], "sdxl": [49407, 0]}
    for name, pads in expected.items():
        source = open_source(name)
        assert source.preset.tokenizer == CLIP_VOCAB_DIR and source.info.eos_token_id == 49407
        assert source.text_config(0)["eos_token_id"] == 49407 and source.text_config(0)["bos_token_id"] == 49406
        folders = source.copy_tokenizers(tmp_path / name)
        for folder, pad in zip(folders, pads, strict=True):
            tok = ClipTokenizer.from_dir(tmp_path / name / folder)
            assert tok.encode("a photo of a cat")[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, pad]
    tiny = open_source("tiny")
    assert tiny.preset.tokenizer == TOKENIZER_DIR and tiny.info.vocab_size == 1000 and tiny.info.eos_token_id < 1000
