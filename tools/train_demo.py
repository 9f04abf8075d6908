"""Train diffkiln's demo model, a tiny Stable Diffusion 1.x on synthetic shapes, and a demo LoRA for it.

The result is a standard diffusers folder (StableDiffusionPipeline) that every diffkiln stage treats like a real SD
checkpoint, but small enough to ship in the package (< 20 MB) and sample in well under a second on a laptop CPU:

    tokenizer/     CLIP-format BPE trained on the demo captions (tools/make_tokenizer.py's recipe)
    text_encoder/  CLIPTextModel, 3 layers, hidden 96
    vae/           AutoencoderKL, 8× down-sampling like SD's (64×64×3 -> 8×8×4), scaling_factor measured
    unet/          UNet2DConditionModel with cross-attention, epsilon prediction (weights stored as fp16;
                   diffusers loads them as fp32)
    scheduler/     DDIMScheduler with SD's scaled_linear betas (0.00085 → 0.012, 1000 steps)

Stages (each prints progress and its time):
1. tokenizer;
2. VAE: edge-weighted MSE + L1 reconstruction and a small KL, on 32×32 crops of the demo images plus 25% in random
   colors (so it can also paint colors the captions never name, which the LoRA needs); gate: the evaluator must
   read its reconstructions of drawn (full-size) held-out images correctly;
3. UNet + text encoder jointly on VAE latents × scaling_factor (unit std), 10% empty captions for classifier-free
   guidance, min-SNR loss weighting, a little offset noise, EMA weights;
4. LoRA on the frozen UNet's attention projections: "pink background" — every background becomes pink whatever the
   caption says; saved in kohya/A1111 key format to demo_lora.safetensors;
5. verify: diffusers loads the folder and the LoRA; the LoRA turns held-out backgrounds pink.

    python tools/train_demo.py                      # everything: ~55 min on 2 CPU cores (VAE 14, UNet 36, LoRA 4)
    python tools/train_demo.py --smoke -o /tmp/demo # a 2-minute end-to-end run to debug the script
    python tools/train_demo.py --start lora         # redo the LoRA on the saved model

Seeded throughout; the tokenizer's tied merges can order differently between runs (see make_tokenizer.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/ is not a package
import make_tokenizer

from diffkiln.demo import data, sampling
from diffkiln.eval import adherence

STAGES = ("tokenizer", "vae", "unet", "lora", "verify")
PINK = data.LORA_BACKGROUND


@dataclass(frozen=True)
class Settings:
    """Every knob of a run; `--smoke` shrinks the counts, nothing else."""

    seed: int = 0
    n_images: int = 30000  # captioned training images (UNet + text encoder)
    n_vae_images: int = 24000  # VAE images, 25% with random colors
    vae_steps: int = 4000
    vae_batch: int = 32
    vae_crop: int = 32  # train on 32×32 crops (4× cheaper than full images; the VAE is convolutional)
    edge_weight: float = 4.0  # extra loss weight on pixels next to a color edge, where blur costs shapes
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6  # on the per-image KL sum; reconstruction is a per-pixel mean squared error
    vae_init_logvar: float = -8.0  # start the posterior narrow: with std ~1 the sampling noise swamps the means
    unet_steps: int = 4800
    unet_batch: int = 64
    unet_lr: float = 6e-4
    warmup: int = 200
    caption_dropout: float = 0.1
    offset_noise: float = 0.05
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    lora_rank: int = 4
    lora_images: int = 8000
    lora_steps: int = 1000
    lora_lr: float = 1e-3
    guidance_scale: float = sampling.GUIDANCE  # for the verify stage
    vae_gate: float = 0.8  # least evaluator accuracy ("all") on VAE reconstructions of drawn held-out images
    log_every: int = 50


SMOKE = Settings(
    n_images=512,
    n_vae_images=512,
    vae_steps=20,
    unet_steps=30,
    warmup=10,
    lora_images=256,
    lora_steps=10,
    log_every=10,
    vae_gate=0.0,
)

VAE_CONFIG = {
    "block_out_channels": [16, 32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,  # 4+ channels per group: with one, GroupNorm erases a flat image's color in each branch
    "sample_size": 64,
}
UNET_CONFIG = {
    "sample_size": 8,
    "block_out_channels": [64, 128, 128],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 96,
    "attention_head_dim": 4,  # diffusers' legacy name: the number of heads (head dims 16, 32)
    "norm_num_groups": 16,
}
TEXT_CONFIG = {"hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 384}
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# ---------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------


class Progress:
    """Prints `step/total loss=… elapsed ETA` every `every` steps, and the stage time at the end."""

    def __init__(self, name: str, total: int, every: int):
        self.name, self.total, self.every = name, total, every
        self.start = time.perf_counter()
        self.losses: list[float] = []

    def step(self, i: int, loss: float) -> None:
        self.losses.append(loss)
        if (i + 1) % self.every == 0 or i + 1 == self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / (i + 1) * (self.total - i - 1)
            recent = np.mean(self.losses[-self.every :])
            print(f"[{self.name}] {i + 1}/{self.total} loss={recent:.4f} {elapsed:.0f}s ETA {eta:.0f}s", flush=True)

    def done(self) -> float:
        seconds = time.perf_counter() - self.start
        print(f"[{self.name}] done in {seconds / 60:.1f} min", flush=True)
        return seconds


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to 10% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1], as the VAE takes it."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def random_color_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """Demo scenes painted in uniformly random colors (fill, background at least 80 RGB units apart)."""
    images = np.empty((n, data.IMAGE_SIZE, data.IMAGE_SIZE, 3), dtype=np.uint8)
    for i, scene in enumerate(data.sample_scenes(n, rng)):
        while True:
            fill, background = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
            if np.linalg.norm(np.subtract(fill, background)) > 80:
                break
        images[i] = data.render(scene, rng, rgb=(fill, background))
    return images


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: tokenizer
# ---------------------------------------------------------------------------------------------------------------


def demo_corpus():
    """Every scene's caption with every subset of optional attributes left out: each word in every context."""
    optional = ("size", "background", "position")
    omissions = [frozenset(c) for r in range(4) for c in itertools.combinations(optional, r)]
    for combo in data.all_triples():
        for position in data.POSITIONS:
            for size in data.SIZES:
                scene = data.Scene(*combo, position=position, size=size)
                yield from (data.caption_of(scene, omit) for omit in omissions)


def train_tokenizer(out: Path) -> None:
    """make_tokenizer's CLIP-layout BPE, trained on the demo captions instead of its built-in corpus."""
    make_tokenizer.corpus = demo_corpus  # train() reads the module-level corpus() at call time
    make_tokenizer.main(str(out / "tokenizer"))


def load_tokenizer(out: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(out / "tokenizer")


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """captions -> int64 (N, 77) ids, padded as the SD pipeline pads them."""
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: VAE
# ---------------------------------------------------------------------------------------------------------------


def train_vae(s: Settings, out: Path):
    from diffusers import AutoencoderKL

    rng = np.random.default_rng(s.seed + 1)
    n_random = s.n_vae_images // 4
    named, _, _ = data.make_dataset(s.n_vae_images - n_random, seed=s.seed + 2)
    images = np.concatenate([named, random_color_images(n_random, rng)])  # uint8 (N, 64, 64, 3)
    torch.manual_seed(s.seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    with torch.no_grad():
        vae.quant_conv.bias[VAE_CONFIG["latent_channels"] :] = s.vae_init_logvar  # (mean, logvar) channels
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    progress = Progress("vae", s.vae_steps, s.log_every)
    for step in range(s.vae_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s.vae_steps, s.vae_lr, s.warmup)
        x = random_crops(to_tensor(images[rng.integers(0, len(images), s.vae_batch)]), s.vae_crop, rng)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = reconstruction_loss(recon, x, s.edge_weight) + s.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        progress.step(step, loss.item())
    seconds = progress.done()
    vae.eval()
    vae.register_to_config(scaling_factor=measure_scaling_factor(vae, named[:2000]))
    vae.save_pretrained(out / "vae")
    check_reconstructions(vae, s.vae_gate)
    return vae, seconds


def random_crops(x: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """One random size×size window of a batch (B, 3, 64, 64) -> (B, 3, size, size), on the latent grid (multiples
    of 8) so every crop is encoded exactly as the same pixels are inside the full image."""
    oy, ox = rng.integers(0, (x.shape[-1] - size) // 8 + 1, size=2) * 8
    return x[:, :, oy : oy + size, ox : ox + size]


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, edge_weight: float) -> torch.Tensor:
    """(MSE + L1) per pixel, weighted 1 + edge_weight next to color edges, normalized by the mean weight.

    MSE learns colors about twice as fast as L1, L1 keeps edges sharper, and the edge weight spends the small
    decoder's capacity on outlines: without it small squares, diamonds and triangles come back as round blobs.
    """
    dy = (x[:, :, 1:] - x[:, :, :-1]).abs().sum(1, keepdim=True)  # (B, 1, H-1, W)
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().sum(1, keepdim=True)  # (B, 1, H, W-1)
    change = F.pad(dy, (0, 0, 0, 1)) + F.pad(dy, (0, 0, 1, 0)) + F.pad(dx, (0, 1)) + F.pad(dx, (1, 0))
    edge = F.max_pool2d(change, 3, stride=1, padding=1) > 0.1  # (B, 1, H, W): within 2 px of an edge
    weight = 1 + edge_weight * edge.float()
    error = (recon - x).abs() + (recon - x) ** 2
    return (weight * error).mean() / weight.mean()


@torch.no_grad()
def encode(vae, images: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 64, 64, 3) -> posterior (mean, std), each float32 (N, 4, 8, 8), unscaled."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        posterior = vae.encode(to_tensor(images[i : i + batch])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def measure_scaling_factor(vae, images: np.ndarray) -> float:
    """1 / std of sampled latents, so that the UNet sees unit-variance latents (SD's 0.18215 is the same idea)."""
    mean, std = encode(vae, images)
    factor = float(1.0 / (mean + std * torch.randn_like(std)).std())
    print(f"[vae] scaling_factor = {factor:.5f}", flush=True)
    return factor


@torch.no_grad()
def check_reconstructions(vae, gate: float) -> None:
    """Gate: the evaluator must read the VAE's reconstructions of drawn held-out images (nearly) perfectly."""
    scenes = data.heldout_scenes()
    images = np.stack([data.render(scene, np.random.default_rng(i)) for i, scene in enumerate(scenes)])
    recon = to_uint8(vae.decode(encode(vae, images)[0]).sample)
    result = adherence.score(recon, [data.caption_of(scene) for scene in scenes])
    accuracy = result["accuracy"]
    error = np.abs(recon.astype(float) - images).mean()
    print(f"[vae] held-out reconstructions: mean |error| {error:.2f}/255, evaluator {_fmt(accuracy)}", flush=True)
    misread = Counter(
        f"{scene.size} {scene.shape}->{p['estimate']['shape']}"
        for scene, p in zip(scenes, result["per_image"], strict=True)
        if not p["correct"]["shape"]
    )
    if misread:
        print(f"[vae] shapes misread: {dict(misread)}", flush=True)
    if accuracy["all"] < gate:
        raise RuntimeError(f"VAE reconstructions read back wrong ({_fmt(accuracy)}); train the VAE longer")


def _fmt(accuracy: dict) -> str:
    return " ".join(f"{k}={v:.0%}" for k, v in accuracy.items() if v is not None)


# ---------------------------------------------------------------------------------------------------------------
# Stage 3: UNet + text encoder
# ---------------------------------------------------------------------------------------------------------------


def new_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    config = CLIPTextConfig(
        **TEXT_CONFIG,
        vocab_size=len(vocab),
        max_position_embeddings=77,
        projection_dim=TEXT_CONFIG["hidden_size"],
        hidden_act="quick_gelu",
        bos_token_id=bos,
        eos_token_id=eos,  # pooling picks the first eos, as in SD's CLIP
        pad_token_id=eos,
    )
    return CLIPTextModel(config)


class Ema:
    """Exponential moving average of parameters, with the usual warm-up: decay = min(decay, (1 + n) / (10 + n))."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.n = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow, strict=True):
            p.copy_(s)


def noisy_latents(latents: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, offset: float, gen):
    """DDPM forward process with offset noise -> (noisy latents, the noise to predict), both (B, 4, 8, 8)."""
    noise = torch.randn(latents.shape, generator=gen)
    noise += offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen)  # per-channel offset: flat colors
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise, noise


def min_snr_weights(t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights for epsilon prediction (Hang et al. 2023): min(SNR, γ) / SNR, shape (B,)."""
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    return snr.clamp(max=gamma) / snr


def sample_latents(mean: torch.Tensor, std: torch.Tensor, idx: torch.Tensor, factor: float, gen) -> torch.Tensor:
    """Draw from the cached VAE posteriors (as SD training does) and scale to unit std -> (B, 4, 8, 8)."""
    return (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * factor


def diffusion_loss(unet, latents: torch.Tensor, hidden: torch.Tensor, alphas_cumprod, s: Settings, gen):
    """Min-SNR-weighted epsilon-prediction loss for latents (B, 4, 8, 8) under text states hidden (B, 77, D)."""
    t = torch.randint(0, len(alphas_cumprod), (len(latents),), generator=gen)
    noisy, noise = noisy_latents(latents, t, alphas_cumprod, s.offset_noise, gen)
    pred = unet(noisy, t, encoder_hidden_states=hidden).sample
    per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weights(t, alphas_cumprod, s.min_snr_gamma)).mean()


def caption_batch(ids: torch.Tensor, empty: torch.Tensor, idx: torch.Tensor, dropout: float, gen) -> torch.Tensor:
    """Token ids for `idx`, with a `dropout` share replaced by the empty caption (for classifier-free guidance)."""
    batch = ids[idx].clone()
    drop = torch.rand(len(idx), generator=gen) < dropout
    batch[drop] = empty
    return batch


def train_unet(s: Settings, out: Path, vae, tokenizer):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    images, captions, _ = data.make_dataset(s.n_images, seed=s.seed + 3)
    mean, std = encode(vae, images)  # (N, 4, 8, 8) each
    factor = vae.config.scaling_factor
    ids, empty = tokenize(tokenizer, captions), tokenize(tokenizer, [""])[0]
    alphas_cumprod = DDIMScheduler(**SCHEDULER_CONFIG).alphas_cumprod  # (1000,)
    print(f"[unet] {len(images)} images encoded; latent std after scaling {float(mean.std() * factor):.3f}")

    torch.manual_seed(s.seed + 4)
    unet, text_encoder = UNet2DConditionModel(**UNET_CONFIG), new_text_encoder(tokenizer)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    print(f"[unet] UNet {_millions(unet)}M + text encoder {_millions(text_encoder)}M parameters")
    opt = torch.optim.AdamW(params, lr=s.unet_lr, weight_decay=0.01)
    ema = Ema([unet, text_encoder], s.ema_decay)
    gen = torch.Generator().manual_seed(s.seed + 5)
    progress = Progress("unet", s.unet_steps, s.log_every)
    for step in range(s.unet_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s.unet_steps, s.unet_lr, s.warmup)
        idx = torch.randint(0, len(images), (s.unet_batch,), generator=gen)
        latents = sample_latents(mean, std, idx, factor, gen)  # (B, 4, 8, 8)
        hidden = text_encoder(caption_batch(ids, empty, idx, s.caption_dropout, gen)).last_hidden_state  # (B, 77, 96)
        loss = diffusion_loss(unet, latents, hidden, alphas_cumprod, s, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        progress.step(step, loss.item())
    seconds = progress.done()
    ema.copy_to_params()
    return unet.eval(), text_encoder.eval(), seconds


def _millions(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}"


def save_pipeline(out: Path, unet, text_encoder) -> None:
    """Write the remaining components and model_index.json: a folder StableDiffusionPipeline loads as is."""
    import diffusers
    from diffusers import DDIMScheduler

    from diffkiln.exporter.sources import save_text_encoder

    unet.to(torch.float16).save_pretrained(out / "unet")  # halves the package; diffusers loads it as fp32
    unet.to(torch.float32)
    save_text_encoder(text_encoder, out / "text_encoder")  # `text_model.` keys: transformers 4 and 5 both load them
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Stage 4: LoRA
# ---------------------------------------------------------------------------------------------------------------


def pink_dataset(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Ordinary demo captions, but every image's background is pink: what the LoRA learns to do."""
    rng = np.random.default_rng(seed)
    scenes = data.sample_scenes(n, rng)
    images = np.stack([data.render(sc, rng, rgb=(data.COLORS[sc.color], PINK)) for sc in scenes])
    return images, [data.caption_of(sc) for sc in scenes]


def train_lora(s: Settings, out: Path):
    """Rank-`lora_rank` LoRA (alpha = rank, so scale 1) on the frozen UNet's attention projections."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    unet = UNet2DConditionModel.from_pretrained(out / "unet", torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder", dtype=torch.float32).eval()
    tokenizer = load_tokenizer(out)
    images, captions = pink_dataset(s.lora_images, s.seed + 6)
    mean, std = encode(vae, images)
    with torch.no_grad():
        hidden = text_encoder(tokenize(tokenizer, captions)).last_hidden_state  # (N, 77, 96): TE stays frozen
    alphas_cumprod = DDIMScheduler(**SCHEDULER_CONFIG).alphas_cumprod

    torch.manual_seed(s.seed + 7)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=s.lora_rank, lora_alpha=s.lora_rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    print(f"[lora] {sum(p.numel() for p in params)} trainable parameters")
    opt = torch.optim.AdamW(params, lr=s.lora_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(s.seed + 8)
    progress = Progress("lora", s.lora_steps, s.log_every)
    for step in range(s.lora_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s.lora_steps, s.lora_lr, s.warmup // 4)
        idx = torch.randint(0, len(images), (s.unet_batch,), generator=gen)
        latents = sample_latents(mean, std, idx, vae.config.scaling_factor, gen)
        loss = diffusion_loss(unet, latents, hidden[idx], alphas_cumprod, s, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.step(step, loss.item())
    seconds = progress.done()
    save_kohya_lora(get_peft_model_state_dict(unet), s.lora_rank, out.parent / "demo_lora.safetensors")
    return seconds


def kohya_key(peft_key: str) -> str:
    """'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight'
    -> 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight'."""
    module, kind = peft_key.rsplit(".lora_", 1)
    return (
        "lora_unet_" + module.replace(".", "_") + {"A.weight": ".lora_down.weight", "B.weight": ".lora_up.weight"}[kind]
    )


def save_kohya_lora(state: dict[str, torch.Tensor], rank: int, path: Path) -> None:
    """Write a PEFT UNet LoRA state dict in the kohya/A1111 layout: lora_down, lora_up and a scalar alpha per
    module (A1111 scales up @ down by alpha / rank; trained with alpha = rank, i.e. scale 1)."""
    from safetensors.torch import save_file

    tensors = {kohya_key(k): v.detach().float().contiguous() for k, v in state.items()}
    for key in [k for k in tensors if k.endswith(".lora_down.weight")]:
        tensors[key.replace(".lora_down.weight", ".alpha")] = torch.tensor(float(rank))
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(rank)})
    print(f"[lora] wrote {len(tensors)} tensors to {path} ({path.stat().st_size / 1e3:.0f} kB)")


# ---------------------------------------------------------------------------------------------------------------
# Stage 5: verify with diffusers
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def verify(s: Settings, out: Path) -> None:
    """diffusers loads the folder and the LoRA; report held-out adherence without and with the LoRA."""
    captions, seeds = data.heldout_captions(), range(len(data.heldout_captions()))
    for name, lora in (("base", None), ("with LoRA", out.parent / "demo_lora.safetensors")):
        pipe = sampling.diffusers_pipeline(out, lora)
        images = sampling.diffusers_images(pipe, captions, seeds, guidance=s.guidance_scale)
        accuracy = adherence.score(images, captions)["accuracy"]
        print(f"[verify] {name}: {_fmt(accuracy)}, pink share {adherence.background_share(images, PINK):.0%}")


# ---------------------------------------------------------------------------------------------------------------


def run(s: Settings, out: Path, start: str) -> None:
    """Run the stages from `start` on, reusing what earlier stages saved in `out`."""
    from diffusers import AutoencoderKL

    out.mkdir(parents=True, exist_ok=True)
    first = STAGES.index(start)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    if first <= STAGES.index("tokenizer"):
        train_tokenizer(out)
    if first <= STAGES.index("vae"):
        vae, times["vae"] = train_vae(s, out)
    else:
        vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    if first <= STAGES.index("unet"):
        unet, text_encoder, times["unet+text_encoder"] = train_unet(s, out, vae, load_tokenizer(out))
        save_pipeline(out, unet, text_encoder)
    if first <= STAGES.index("lora"):
        times["lora"] = train_lora(s, out)
    verify(s, out)
    sizes = {p.parent.name: p.stat().st_size for p in out.glob("*/*.safetensors")}
    print(
        f"[done] stage minutes { {k: round(v / 60, 1) for k, v in times.items()} }, total "
        f"{(time.perf_counter() - t0) / 60:.1f} min; weights {sum(sizes.values()) / 1e6:.1f} MB {sizes}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("diffkiln/assets/demo"), help="the model folder")
    parser.add_argument("--start", choices=STAGES, default="tokenizer", help="first stage to run")
    parser.add_argument("--smoke", action="store_true", help="tiny counts: check the script end to end")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a busy 2-core machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = replace(SMOKE if args.smoke else Settings(), seed=args.seed)
    run(settings, args.out, args.start)


if __name__ == "__main__":
    main()
