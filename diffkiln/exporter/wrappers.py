"""The exact export boundary of each component: small modules that call the diffusers/transformers model and
return plain tensors in the order of the component's `ComponentSpec` outputs."""

from __future__ import annotations

import torch

from diffkiln.weight_map import torch_name  # noqa: F401 (re-exported: the torch side names weights with it)


class TextEncoder(torch.nn.Module):
    """input_ids (B, 77) → (last_hidden_state, pooler_output, hidden_states.0 … hidden_states.L,
    penultimate_hidden_state); with a projection (SDXL's encoder 2) → (text_embeds, last_hidden_state,
    hidden_states.0 … L, penultimate_hidden_state). hidden_states.i (B, 77, D) is transformers' `hidden_states[i]`:
    0 the token + position embeddings, L the last layer before the final layer norm."""

    def __init__(self, model, with_projection: bool):
        super().__init__()
        self.model, self.with_projection = model, with_projection

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        states = tuple(out.hidden_states)  # L + 1 of (B, 77, D)
        first = (out.text_embeds, out.last_hidden_state) if self.with_projection else (out.last_hidden_state,)
        pooled = () if self.with_projection else (out.pooler_output,)
        return (*first, *pooled, *states, states[-2])


def text_layers(model) -> int:
    """L, the transformer layers of a CLIP text model (its hidden_states has L + 1 entries)."""
    return int(model.config.num_hidden_layers)


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
