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
T5_TOKENIZER_DIR = Path(__file__).parent / "assets" / "t5_tokenizer"  # a small T5-style Unigram (tools/)
CLIP_VOCAB_DIR = Path(__file__).parent / "assets" / "clip_vocab"  # OpenAI's CLIP BPE, 49,408 tokens
SEED = 20261122


def tokenizer_eos_id(folder: Path = TOKENIZER_DIR) -> int:
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    return vocab["<|endoftext|>"]


@dataclass(frozen=True)
class Preset:
    name: str
    kind: str  # sd1 | sd2 | sdxl | flux
    unet: dict  # UNet2DConditionModel kwargs; Flux: FluxTransformer2DModel kwargs
    vae: dict
    text_encoders: tuple[dict, ...]  # CLIPTextConfig kwargs (SDXL's second has a projection); Flux's second: T5Config
    scheduler: dict
    description: str = ""
    extra: dict = field(default_factory=dict)
    tokenizer: Path = TOKENIZER_DIR  # the folder every tokenizer[_2]/ is copied from
    pads: tuple[str | None, ...] = ()  # per tokenizer, a pad token other than eos (SD 2.x, SDXL's tokenizer_2: "!")
    max_sequence_length: int = 0  # Flux: T5 tokens per prompt (FluxPipeline's max_sequence_length)


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


def _t5(d_model, layers, heads, d_kv, d_ff, vocab=0) -> dict:
    """T5 v1.1 encoder kwargs (gated GELU feed-forward, as FLUX's and SD3's T5-XXL); vocab 0: the tokenizer's."""
    return {
        "d_model": d_model,
        "num_layers": layers,
        "num_heads": heads,
        "d_kv": d_kv,
        "d_ff": d_ff,
        "vocab_size": vocab,
        "feed_forward_proj": "gated-gelu",
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "dropout_rate": 0.0,
        "is_encoder_decoder": False,
        "use_cache": False,
    }


_FLUX_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
_FLUX_VAE = {  # FLUX.1's VAE: 16 latent channels, no quant convs, a shift before the scale
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
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
        Preset(
            "tiny-flux",
            "flux",
            unet={  # diffusers' own FLUX test configuration, with guidance embeddings (FLUX.1-dev's form)
                "patch_size": 1,
                "in_channels": 16,
                "num_layers": 1,
                "num_single_layers": 1,
                "attention_head_dim": 16,
                "num_attention_heads": 2,
                "joint_attention_dim": 32,
                "pooled_projection_dim": 32,
                "guidance_embeds": True,
                "axes_dims_rope": [4, 4, 8],
            },
            vae={
                **_TINY_VAE,
                "scaling_factor": 0.3611,
                "shift_factor": 0.1159,
                "use_quant_conv": False,
                "use_post_quant_conv": False,
            },
            text_encoders=(_clip(32, 2, 4, 64, vocab=1000), _t5(32, 2, 4, 8, 64)),
            scheduler=_FLUX_SCHEDULER,
            description="FLUX.1-shaped toy: CLIP + T5, a dual- and a single-stream block, flow matching",
            max_sequence_length=32,
        ),
        Preset(
            "flux-shaped",
            "flux",
            unet={  # FLUX.1-dev's widths (3072 hidden, 24 heads, 4096 T5 width) with 1 + 2 of its 19 + 38 blocks
                "patch_size": 1,
                "in_channels": 64,
                "num_layers": 1,
                "num_single_layers": 2,
                "attention_head_dim": 128,
                "num_attention_heads": 24,
                "joint_attention_dim": 4096,
                "pooled_projection_dim": 768,
                "guidance_embeds": True,
                "axes_dims_rope": [16, 56, 56],
            },
            vae=_FLUX_VAE,
            text_encoders=(_clip(768, 12, 12, 3072), _t5(4096, 2, 64, 64, 10240, vocab=32128)),
            scheduler=_FLUX_SCHEDULER,
            description="FLUX.1-dev widths with 1 + 2 transformer blocks and 2 T5-XXL layers (per-block cost)",
            tokenizer=CLIP_VOCAB_DIR,
            max_sequence_length=512,
        ),
    ]
}
