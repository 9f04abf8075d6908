"""The exact export boundary of each component: small modules that call the diffusers/transformers model and
return plain tensors in the order of the component's `ComponentSpec` outputs."""

from __future__ import annotations

import contextlib

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
        self.post_quant_conv, self.decoder = vae.post_quant_conv or torch.nn.Identity(), vae.decoder  # Flux: none

    def forward(self, latent_sample):
        return self.decoder(self.post_quant_conv(latent_sample))


class VaeEncoder(torch.nn.Module):
    """sample (B, 3, H, W) in [-1, 1] → latent_parameters (B, 8, H/8, W/8): mean and log-variance."""

    def __init__(self, vae):
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv or torch.nn.Identity()

    def forward(self, sample):
        return self.quant_conv(self.encoder(sample))


class T5Encoder(torch.nn.Module):
    """input_ids (B, S) → last_hidden_state (B, S, D): T5's encoder, attending to the padding as FluxPipeline
    does (it passes no attention mask)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, return_dict=True).last_hidden_state


class Fp32RotaryEmbedding(torch.nn.Module):
    """FluxPosEmbed with fp32 angles. diffusers computes them in float64, which TensorRT has no kernels for; here
    the per-axis frequencies are float64-exact fp32 constants and only `position × frequency` runs in fp32 (for
    positions ≤ 128 an angle error near 1e-5 rad; the export's parity check against diffusers proves the result)."""

    def __init__(self, theta: float, axes_dim: list[int]):
        super().__init__()
        freqs = [1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d) for d in axes_dim]
        self.freqs = [f.float() for f in freqs]  # plain tensors: traced as constants, not weights

    def forward(self, ids):
        pos = ids.float()
        angles = torch.cat([pos[:, i : i + 1] * f[None, :] for i, f in enumerate(self.freqs)], dim=-1)  # (S, D/2)
        size = (angles.shape[0], 2 * angles.shape[1])
        cos, sin = angles.cos(), angles.sin()
        return torch.stack([cos, cos], dim=-1).reshape(size), torch.stack([sin, sin], dim=-1).reshape(size)


def _rotary(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=1):
    """diffusers' `apply_rotary_emb` for Flux ([B, S, H, D] with cos/sin [S, D], pairs interleaved), with the
    pairs split by `unflatten`: diffusers reshapes with `*x.shape[:-1]`, which the TorchScript exporter bakes into
    a constant, so the graph would only take the traced token count. Same arithmetic, same dtypes."""
    cos, sin = freqs_cis
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    pairs = x.unflatten(-1, (-1, 2))
    x_real, x_imag = pairs[..., 0], pairs[..., 1]
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(-2)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


@contextlib.contextmanager
def _traceable_rotary():
    from diffusers.models.transformers import transformer_flux

    original = transformer_flux.apply_rotary_emb
    transformer_flux.apply_rotary_emb = _rotary
    try:
        yield
    finally:
        transformer_flux.apply_rotary_emb = original


class FluxTransformer(torch.nn.Module):
    """(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids[, guidance]) →
    out_hidden_states: the velocity for the packed latents. `timestep` is the sigma in (0, 1] (FluxPipeline
    passes t / 1000; the model scales it back), `guidance` the distilled guidance scale."""

    def __init__(self, model):
        super().__init__()
        if not isinstance(model.pos_embed, Fp32RotaryEmbedding):
            model.pos_embed = Fp32RotaryEmbedding(model.pos_embed.theta, list(model.pos_embed.axes_dim))
        self.model = model

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None):  # fmt: skip
        with _traceable_rotary():
            return self.model(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance,
                return_dict=False,
            )[0]


def wrap(component: str, model) -> torch.nn.Module:
    if component == "unet":
        return UNet(model)
    if component == "transformer":
        return FluxTransformer(model)
    if component == "text_encoder_2" and type(model).__name__.startswith("T5"):
        return T5Encoder(model)
    if component == "vae_decoder":
        return VaeDecoder(model)
    if component == "vae_encoder":
        return VaeEncoder(model)
    return TextEncoder(model, with_projection=component == "text_encoder_2")
