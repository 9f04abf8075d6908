"""FLOPs of one call of each component at the bench shape, counted by torch's FlopCounterMode on the meta device.

The modules are built from the source's configs on `torch.device("meta")`: no weights are allocated and nothing is
computed, so counting even the SDXL UNet takes under a second. FlopCounterMode counts matmuls, convolutions and
attention (2 FLOPs per multiply-add); normalizations and activations are left out, as in every MFU figure.
Flux counts its transformer on packed latents (batch rows: its guidance is distilled, no CFG batch), CLIP on 77
tokens and T5 on the kiln's `text_sequence` tokens, one prompt row each (FluxPipeline repeats their outputs).
"""

from __future__ import annotations

from pathlib import Path

from diffkiln.specs import SEQUENCE_LENGTH, VAE_SCALE

METHOD = "torch.utils.flop_counter.FlopCounterMode (meta device)"


def _meta_modules(source) -> dict:
    """{text_encoder[, text_encoder_2], unet | transformer, vae} built on the meta device from the source's
    configs."""
    import torch

    from diffkiln.exporter.sources import PresetSource

    info = source.info
    texts = ["text_encoder", "text_encoder_2"] if info.is_sdxl or info.is_flux else ["text_encoder"]
    names = [*texts, info.denoiser, "vae"]
    with torch.device("meta"):
        if source.kind == "preset":
            return {n: source.load(n) for n in names}
        if source.kind == "single-file":  # the configs are those of the preset its shapes matched; no weights read
            return {n: PresetSource(source.preset).load(n) for n in names}
        return {n: _from_config(Path(source.ref) / n, n, info.is_flux) for n in names}


def _from_config(folder: Path, name: str, flux: bool = False):
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if name == "unet":
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
    if name == "transformer":
        return FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(folder))
    if name == "vae":
        return AutoencoderKL.from_config(AutoencoderKL.load_config(folder))
    if flux and name == "text_encoder_2":
        return T5EncoderModel(T5Config.from_pretrained(folder))
    config = CLIPTextConfig.from_pretrained(folder)
    return (CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel)(config)


def _count(fn) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def count_pipeline_flops(source_ref: str, height: int, width: int, batch: int, cfg: bool) -> dict:
    """FLOPs per call: UNet on 2·batch rows with guidance (batch without), VAE decode on batch latents,
    each text encoder on the prompt rows (2 with guidance); Flux: `_flux_flops`."""
    import torch

    from diffkiln.exporter.resolve import open_source

    source = open_source(source_ref)
    modules = _meta_modules(source)
    if source.info.is_flux:
        return _flux_flops(modules, source.info, height, width, batch)
    rows = 2 * batch if cfg else batch
    h, w = height // VAE_SCALE, width // VAE_SCALE
    meta = {"device": "meta"}
    unet = modules["unet"]
    added = None
    if "text_encoder_2" in modules:  # SDXL: pooled text embeds and the 6 size/crop ids
        pooled = modules["text_encoder_2"].config.projection_dim
        added = {"text_embeds": torch.empty(rows, pooled, **meta), "time_ids": torch.empty(rows, 6, **meta)}
    unet_args = (
        torch.empty(rows, unet.config.in_channels, h, w, **meta),
        torch.empty(rows, **meta),
        torch.empty(rows, SEQUENCE_LENGTH, unet.config.cross_attention_dim, **meta),
    )
    latents = torch.empty(batch, modules["vae"].config.latent_channels, h, w, **meta)
    ids = torch.zeros(rows if cfg else 1, SEQUENCE_LENGTH, dtype=torch.long, **meta)
    counts = {
        "unet": _count(lambda: unet(*unet_args, added_cond_kwargs=added)),
        "vae_decoder": _count(lambda: modules["vae"].decode(latents)),
    }
    for name in ("text_encoder", "text_encoder_2"):
        if name in modules:
            counts[name] = _count(lambda m=modules[name]: m(input_ids=ids))
    return {"per_call": counts, "unet_rows": rows, "method": METHOD}


def _flux_flops(modules: dict, info, height: int, width: int, batch: int) -> dict:
    """FLOPs per call of Flux's components: the transformer on batch rows of packed latents, (h/2)(w/2) tokens of
    4·C values (guidance distilled: no CFG rows), the VAE decoder on batch latents, CLIP and T5 on one prompt row."""
    import torch

    from diffkiln.runtime import flow

    meta = {"device": "meta"}
    h, w = height // VAE_SCALE, width // VAE_SCALE
    seq, transformer = info.text_sequence, modules["transformer"]
    img_ids = torch.from_numpy(flow.image_ids(h, w)).to("meta")  # (tokens, 3): values are not needed on meta
    feeds = {
        "hidden_states": torch.empty(batch, (h // 2) * (w // 2), 4 * info.latent_channels, **meta),
        "encoder_hidden_states": torch.empty(batch, seq, info.cross_attention_dim, **meta),
        "pooled_projections": torch.empty(batch, info.text_embeds_dim, **meta),
        "timestep": torch.empty(batch, **meta),
        "img_ids": img_ids,
        "txt_ids": torch.empty(seq, 3, **meta),
        "guidance": torch.empty(batch, **meta) if info.guidance_embeds else None,
    }
    latents = torch.empty(batch, info.latent_channels, h, w, **meta)
    counts = {
        "transformer": _count(lambda: transformer(**feeds, return_dict=False)),
        "vae_decoder": _count(lambda: modules["vae"].decode(latents)),
        "text_encoder": _count(
            lambda: modules["text_encoder"](input_ids=torch.zeros(1, SEQUENCE_LENGTH, dtype=torch.long, **meta))
        ),
        "text_encoder_2": _count(
            lambda: modules["text_encoder_2"](input_ids=torch.zeros(1, seq, dtype=torch.long, **meta))
        ),
    }
    return {"per_call": counts, "unet_rows": batch, "method": METHOD}
