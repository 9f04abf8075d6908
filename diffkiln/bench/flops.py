"""FLOPs of one call of each component at the bench shape, counted by torch's FlopCounterMode on the meta device.

The modules are built from the source's configs on `torch.device("meta")`: no weights are allocated and nothing is
computed, so counting even the SDXL UNet takes under a second. FlopCounterMode counts matmuls, convolutions and
attention (2 FLOPs per multiply-add); normalizations and activations are left out, as in every MFU figure.
"""

from __future__ import annotations

from pathlib import Path

from diffkiln.specs import SEQUENCE_LENGTH, VAE_SCALE


def _meta_modules(source_ref: str) -> dict:
    """{text_encoder[, text_encoder_2], unet, vae} built on the meta device from the source's configs."""
    import torch

    from diffkiln.exporter.resolve import open_source
    from diffkiln.exporter.sources import PresetSource

    source = open_source(source_ref)
    names = (
        ["text_encoder", "text_encoder_2", "unet", "vae"] if source.info.is_sdxl else ["text_encoder", "unet", "vae"]
    )
    with torch.device("meta"):
        if source.kind == "preset":
            return {n: source.load(n) for n in names}
        if source.kind == "single-file":  # the configs are those of the preset its shapes matched; no weights read
            return {n: PresetSource(source.preset).load(n) for n in names}
        return {n: _from_config(Path(source.ref) / n, n) for n in names}


def _from_config(folder: Path, name: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if name == "unet":
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
    if name == "vae":
        return AutoencoderKL.from_config(AutoencoderKL.load_config(folder))
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
    each text encoder on the prompt rows (2 with guidance)."""
    import torch

    modules = _meta_modules(source_ref)
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
    return {"per_call": counts, "unet_rows": rows, "method": "torch.utils.flop_counter.FlopCounterMode (meta device)"}
