"""Built-in presets: real (or deliberately tiny) architectures from configs, with seeded random weights.

Nothing is downloaded: the weights are random but the shapes, op counts, speed and memory are those of the real
models. Each preset also carries a CLIP tokenizer and a scheduler config, so a runtime can treat it exactly like a
diffusers folder: sd15, sd21 and sdxl ship OpenAI's real CLIP vocabulary (tools/make_clip_vocab.py), so they are the
real models in everything but weights; the tiny presets keep diffkiln's own 1,000-token BPE (tools/make_tokenizer.py),
which fits their 1,000-row token embeddings (the real vocabulary would make those 49x larger).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

TOKENIZER_DIR = Path(__file__).parent / "assets" / "clip_tokenizer"  # the tiny presets' small BPE
CLIP_VOCAB_DIR = Path(__file__).parent / "assets" / "clip_vocab"  # OpenAI's CLIP BPE, 49,408 tokens
SEED = 20261122


def tokenizer_eos_id(folder: Path = TOKENIZER_DIR) -> int:
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    return vocab["<|endoftext|>"]


@dataclass(frozen=True)
class Preset:
    name: str
    kind: str  # sd1 | sd2 | sdxl
    unet: dict
    vae: dict
    text_encoders: tuple[dict, ...]  # CLIPTextConfig kwargs; the SDXL second one has a projection
    scheduler: dict
    description: str = ""
    extra: dict = field(default_factory=dict)
    tokenizer: Path = TOKENIZER_DIR  # the folder every tokenizer[_2]/ is copied from
    pads: tuple[str | None, ...] = ()  # per tokenizer, a pad token other than eos (SD 2.x, SDXL's tokenizer_2: "!")


def _clip(hidden, layers, heads, intermediate, act="quick_gelu", projection=None, vocab=49408) -> dict:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "hidden_act": act,
        "projection_dim": projection or hidden,
        "vocab_size": vocab,
        "max_position_embeddings": 77,
    }


def _scheduler(cls: str, prediction: str = "epsilon", **kw) -> dict:
    return {
        "_class_name": cls,
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": prediction,
        "steps_offset": 1,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "timestep_spacing": "leading",
        **kw,
    }


_SD_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
_TINY_VAE = {
    "block_out_channels": [16, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}
_SD15_UNET = {
    "sample_size": 64,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "tiny",
            "sd1",
            unet={
                "sample_size": 8,
                "block_out_channels": [32, 64],
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                "layers_per_block": 1,
                "cross_attention_dim": 32,
                "attention_head_dim": 8,
                "norm_num_groups": 8,
            },
            vae=_TINY_VAE,
            text_encoders=(_clip(32, 2, 4, 64, vocab=1000),),
            scheduler=_scheduler("DDIMScheduler"),
            description="SD1.x-shaped toy, exports in seconds (the default for tests)",
        ),
        Preset(
            "tiny-sdxl",
            "sdxl",
            unet={
                "sample_size": 8,
                "block_out_channels": [32, 64],
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
                "layers_per_block": 1,
                "transformer_layers_per_block": [1, 2],
                "cross_attention_dim": 64,
                "attention_head_dim": [2, 4],
                "norm_num_groups": 8,
                "use_linear_projection": True,
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 6 * 8 + 32,
            },
            vae={**_TINY_VAE, "scaling_factor": 0.13025},
            text_encoders=(_clip(32, 2, 4, 64, vocab=1000), _clip(32, 2, 4, 64, act="gelu", vocab=1000)),
            scheduler=_scheduler("EulerDiscreteScheduler"),
            description="SDXL-shaped toy: two text encoders, pooled embeds, time_ids",
        ),
        Preset(
            "sd15",
            "sd1",
            unet=_SD15_UNET,
            vae=_SD_VAE,
            text_encoders=(_clip(768, 12, 12, 3072),),
            scheduler=_scheduler("DDIMScheduler"),
            description="Stable Diffusion 1.5 architecture (CLIP-L, 860M UNet), random weights",
            tokenizer=CLIP_VOCAB_DIR,
        ),
        Preset(
            "sd21",
            "sd2",
            unet={
                **_SD15_UNET,
                "sample_size": 96,
                "cross_attention_dim": 1024,
                "attention_head_dim": [5, 10, 20, 20],
                "use_linear_projection": True,
                "upcast_attention": True,
            },
            vae=_SD_VAE,
            text_encoders=(_clip(1024, 23, 16, 4096, act="gelu", projection=512),),
            scheduler=_scheduler("DDIMScheduler", prediction="v_prediction"),
            description="Stable Diffusion 2.1-v architecture (OpenCLIP-H text tower, v-prediction), random weights",
            tokenizer=CLIP_VOCAB_DIR,
            pads=("!",),
        ),
        Preset(
            "sdxl",
            "sdxl",
            unet={
                "sample_size": 128,
                "block_out_channels": [320, 640, 1280],
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "layers_per_block": 2,
                "transformer_layers_per_block": [1, 2, 10],
                "cross_attention_dim": 2048,
                "attention_head_dim": [5, 10, 20],
                "use_linear_projection": True,
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816,
            },
            vae={**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
            text_encoders=(_clip(768, 12, 12, 3072), _clip(1280, 32, 20, 5120, act="gelu")),
            scheduler=_scheduler("EulerDiscreteScheduler"),
            description="Stable Diffusion XL base architecture (CLIP-L + OpenCLIP-bigG, 2.6B UNet), random weights",
            tokenizer=CLIP_VOCAB_DIR,
            pads=(None, "!"),
        ),
    ]
}
