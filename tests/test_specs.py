import numpy as np

from diffkiln.exporter.presets import tokenizer_eos_id
from diffkiln.specs import SEQUENCE_LENGTH, PipelineInfo, component_specs, dims

SDXL = PipelineInfo("sdxl", (768, 1280), 49408, 49407, 2048, text_embeds_dim=1280, time_ids_dim=6, sample_size=128)


def test_sdxl_contracts():
    specs = component_specs(SDXL)
    assert list(specs) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    unet = specs["unet"]
    assert unet.input_names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert unet.dynamic_axes() == {
        "sample": {0: "batch", 2: "height", 3: "width"},
        "timestep": {0: "batch"},
        "encoder_hidden_states": {0: "batch", 1: "sequence"},
        "text_embeds": {0: "batch"},
        "time_ids": {0: "batch"},
        "out_sample": {0: "batch", 2: "height", 3: "width"},
    }
    assert unet.profile == {
        "batch": (1, 2, 8),
        "height": (64, 128, 256),
        "width": (64, 128, 256),
        "sequence": (77, 77, 231),
    }
    feeds = unet.sample_inputs(dims(2, 16, 24, chunks=2), SDXL, seed=0)
    assert {k: v.shape for k, v in feeds.items()} == {
        "sample": (2, 4, 16, 24),
        "timestep": (2,),
        "encoder_hidden_states": (2, 154, 2048),
        "text_embeds": (2, 1280),
        "time_ids": (2, 6),
    }
    assert specs["vae_encoder"].outputs[0].resolve(dims(1, 16, 24)) == (1, 8, 16, 24)
    assert specs["vae_decoder"].outputs[0].resolve(dims(1, 16, 24)) == (1, 3, 128, 192)


def test_token_samples_look_like_clip_prompts():
    ids = component_specs(SDXL)["text_encoder"].sample_inputs(dims(4, 8, 8), SDXL, seed=3)["input_ids"]
    assert ids.shape == (4, SEQUENCE_LENGTH) and ids.dtype == np.int32
    for row in ids:
        assert row[0] == 49406  # <|startoftext|>
        first_eos = int(np.argmax(row == 49407))
        assert first_eos > 1 and (row[first_eos:] == 49407).all() and (row[:first_eos] < 49407).all()


def test_samples_are_seeded():
    spec = component_specs(SDXL)["unet"]
    a, b = (spec.sample_inputs(dims(1, 8, 8), SDXL, seed=5) for _ in range(2))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_shipped_tokenizer_matches_transformers(tmp_path):
    """The presets' tokenizer is a real CLIP-format tokenizer that transformers reads."""
    from transformers import CLIPTokenizer

    from diffkiln.exporter.presets import TOKENIZER_DIR

    tok = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    ids = tok("a red circle on a blue background", padding="max_length", max_length=77).input_ids
    eos = tokenizer_eos_id()
    assert len(ids) == 77 and ids[0] == eos - 1 and ids[8:] == [eos] * 69
    assert tok.convert_ids_to_tokens(ids[1:8]) == [
        "a</w>",
        "red</w>",
        "circle</w>",
        "on</w>",
        "a</w>",
        "blue</w>",
        "background</w>",
    ]
