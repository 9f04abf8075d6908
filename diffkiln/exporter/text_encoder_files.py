"""Text encoders as single files, as ComfyUI's DualCLIPLoader takes them for Flux: `clip_l.safetensors` (CLIP-L,
transformers' `text_model.…` keys) and `t5xxl_fp16.safetensors` (T5's encoder, `encoder.block.N.…` + `shared`).

Their configs are read off the tensor shapes (hidden size, layers, heads, feed-forward width, vocabulary), the
weights loaded into transformers' CLIPTextModel / T5EncoderModel strictly (a key missing or left over is an
error, save T5's tied `encoder.embed_tokens`), in fp32 whatever the file's dtype. Used by FolderSource for a Flux
folder that lacks `text_encoder/` and `text_encoder_2/` (or to replace them): `--text-encoders CLIP,T5`.
"""

from __future__ import annotations

import re
from pathlib import Path

from diffkiln.errors import SourceError

# a CLIP file does not say its head count: CLIP-L (768), OpenCLIP-H (1024) and -bigG (1280) use 64-wide heads;
# widths under 64 are diffkiln's toy presets, which use 8-wide heads
CLIP_HEADS = {768: 12, 1024: 16, 1280: 20}


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises several kinds for a damaged header
        raise SourceError(f"{path} is not a valid safetensors file ({type(e).__name__}); re-download it") from None


def clip_config(path: Path) -> dict:
    shapes = {k.removeprefix("text_model."): v for k, v in _shapes(path).items()}
    table = shapes.get("embeddings.token_embedding.weight")
    if table is None:
        raise SourceError(
            f"{path} has no CLIP token embedding (text_model.embeddings.…): it is not a CLIP text encoder"
        )
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    vocab, hidden = table
    return {
        "hidden_size": hidden,
        "intermediate_size": shapes["encoder.layers.0.mlp.fc1.weight"][0],
        "num_hidden_layers": len(layers),
        "num_attention_heads": CLIP_HEADS.get(hidden, hidden // 64 if hidden >= 64 else max(hidden // 8, 1)),
        "hidden_act": "quick_gelu",
        "projection_dim": shapes.get("text_projection.weight", (hidden,))[0],
        "vocab_size": vocab,
        "max_position_embeddings": shapes["embeddings.position_embedding.weight"][0],
    }


def t5_config(path: Path) -> dict:
    shapes = _shapes(path)
    table = shapes.get("shared.weight") or shapes.get("encoder.embed_tokens.weight")
    bias = shapes.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    if table is None or bias is None:
        raise SourceError(f"{path} has no T5 encoder (shared.weight, encoder.block.0.…): it is not a T5 text encoder")
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    ff = shapes["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"][0]
    heads = bias[1]
    return {
        "vocab_size": table[0],
        "d_model": table[1],
        "d_kv": shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
        "d_ff": ff,
        "num_layers": len(blocks),
        "num_heads": heads,
        "relative_attention_num_buckets": bias[0],
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "is_encoder_decoder": False,
        "use_cache": False,
    }


def load(path: Path, kind: str, eos_token_id: int | None = None):
    """The fp32 transformers module a single file holds: kind "clip" or "t5". CLIP pools at its eos token,
    which only the tokenizer knows (`eos_token_id`, the folder's)."""
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if kind == "clip":
        ids = {"eos_token_id": eos_token_id, "bos_token_id": eos_token_id - 1} if eos_token_id else {}
        model = CLIPTextModel(CLIPTextConfig(**clip_config(path), **ids))
    else:
        model = T5EncoderModel(T5Config(**t5_config(path)))
    state = {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}
    own = model.state_dict()
    if kind == "clip" and not any(k.startswith("text_model.") for k in own):  # transformers 5 flattened CLIP
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k in own or k != "text_projection.weight"}
    if kind == "t5":
        table = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
        state |= {"shared.weight": table, "encoder.embed_tokens.weight": table}
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which a {kind.upper()} encoder does not"
        raise SourceError(f"{path} {what} ({len(missing)} missing, {len(extra)} unexpected): not a {kind} file")
    model.load_state_dict(state, strict=True)
    return model.float().eval()
