"""The exact export boundary of each component: small modules that call the diffusers/transformers model and
return plain tensors in the order of the component's `ComponentSpec` outputs."""

from __future__ import annotations

import torch


class TextEncoder(torch.nn.Module):
    """input_ids (B, 77) → (last_hidden_state, pooler_output, penultimate_hidden_state); with a projection
    (SDXL's encoder 2) → (text_embeds, last_hidden_state, penultimate_hidden_state)."""

    def __init__(self, model, with_projection: bool):
        super().__init__()
        self.model, self.with_projection = model, with_projection

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        penultimate = out.hidden_states[-2]  # (B, 77, D)
        if self.with_projection:
            return out.text_embeds, out.last_hidden_state, penultimate
        return out.last_hidden_state, out.pooler_output, penultimate


class UNet(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states[, text_embeds, time_ids]) → out_sample (the model's prediction)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.model(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class VaeDecoder(torch.nn.Module):
    """latent_sample (B, 4, h, w), already divided by the scaling factor → sample (B, 3, 8h, 8w) in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, latent_sample):
        return self.decoder(self.post_quant_conv(latent_sample))


class VaeEncoder(torch.nn.Module):
    """sample (B, 3, H, W) in [-1, 1] → latent_parameters (B, 8, H/8, W/8): mean and log-variance."""

    def __init__(self, vae):
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv

    def forward(self, sample):
        return self.quant_conv(self.encoder(sample))


def wrap(component: str, model) -> torch.nn.Module:
    if component == "unet":
        return UNet(model)
    if component == "vae_decoder":
        return VaeDecoder(model)
    if component == "vae_encoder":
        return VaeEncoder(model)
    return TextEncoder(model, with_projection=component == "text_encoder_2")


def torch_name(component: str, name: str) -> str:
    """The parameter name as checkpoints and LoRA files spell it, whatever the library version: the wrapper's
    `model.` prefix removed, and CLIP weights under `text_model.` (transformers 5 flattened CLIPTextModel)."""
    if component in ("unet", "text_encoder", "text_encoder_2"):
        name = name.removeprefix("model.")
    if component.startswith("text_encoder") and not name.startswith(("text_model.", "text_projection.")):
        name = "text_model." + name
    return name
