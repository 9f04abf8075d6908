"""Which torch weight a LoRA key modifies, resolved against the names the kiln's weight map knows.

LoRA files spell module paths three ways:

* kohya / A1111: `lora_unet_down_blocks_0_attentions_0_proj_in` — the module path with every `.` turned into `_`
  (so `to_out_0` cannot be split back by guessing). We flatten every weight-map name the same way and look the
  key up. SDXL kohya files use the original SGM UNet's block names (`input_blocks_4_1_…`, `middle_block_1_…`,
  `output_blocks_2_2_conv`, resnet `in_layers_2` …); those are renumbered to diffusers' blocks first.
* diffusers / peft: `unet.down_blocks.0.…attn1.to_q` — the module path itself, after a component prefix.
  transformers 5 drops CLIP's `text_model.` level, so `text_encoder.encoder.layers.0…` is tried with it too.
* old diffusers attention processors: `…attn1.processor.to_q_lora` (UNet) or `…self_attn.to_q_lora` (CLIP).
* Flux: diffusers `transformer.single_transformer_blocks.0.attn.to_q`, kohya-flattened diffusers names
  (`lora_transformer_…`), and the original (BFL) names kohya's sd-scripts and ComfyUI write,
  `lora_unet_double_blocks_0_img_attn_qkv`, whose fused q/k/v (and single blocks' q/k/v/mlp `linear1`) update is
  split by rows onto diffusers' separate projections (`FLUX_FUSED`, `bfl`).
"""

from __future__ import annotations

import re

KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"))
KOHYA_PREFIXES += (("lora_te_", "text_encoder"), ("lora_transformer_", "transformer"))
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
# BFL block parts → diffusers modules; several targets share the LoRA's down and split its up by rows, in order
# (single blocks' linear1 is q, k, v and the 4×-wide MLP input: rows 1/7, 1/7, 1/7, 4/7)
FLUX_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
FLUX_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
FLUX_SHARES = {4: (1, 1, 1, 4), 3: (1, 1, 1), 1: (1,)}  # row shares of the fused up, by target count
# SGM resnet submodules → diffusers names (flattened)
_SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj"}
_SGM_RESNET |= {"skip_connection": "conv_shortcut"}
_SGM_TOP = {"time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2"}
_SGM_TOP |= {"label_emb_0_0": "add_embedding_linear_1", "label_emb_0_2": "add_embedding_linear_2"}
_SGM_TOP |= {"out_2": "conv_out", "input_blocks_0_0": "conv_in"}
# old attention-processor LoRA names → the projection they wrap, for the UNet and for CLIP
_PROCESSOR = {
    "unet": {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"},
    "text": {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"},
}


def flat(torch_name: str) -> str:
    """`down_blocks.0.attentions.0.proj_in.weight` → `down_blocks_0_attentions_0_proj_in` (kohya's spelling)."""
    return torch_name.removesuffix(".weight").replace(".", "_")


class Resolver:
    """Maps LoRA module names to (component, torch weight name) using only names the weight map holds."""

    def __init__(self, weight_map: dict[str, dict]):
        self.names = {c: set(m) for c, m in weight_map.items()}
        self.flat = {c: {flat(n): n for n in m} for c, m in weight_map.items()}
        resnets = [
            re.fullmatch(r"down_blocks\.0\.resnets\.(\d+)\.conv1\.weight", n) for n in self.names.get("unet", ())
        ]
        self.layers_per_block = max([int(m.group(1)) + 1 for m in resnets if m], default=2)

    def kohya(self, lora_name: str) -> tuple[str, str] | None:
        """`lora_te1_text_model_encoder_layers_0_mlp_fc1` →
        ("text_encoder", "text_model.encoder.layers.0.mlp.fc1.weight"); None when it names no weight of the kiln."""
        for prefix, component in KOHYA_PREFIXES:
            if lora_name.startswith(prefix):
                rest = lora_name.removeprefix(prefix)
                table = self.flat.get(component, {})
                candidates = [rest] + (self._sgm(rest) if component == "unet" else [])
                for name in candidates:
                    if name in table:
                        return component, table[name]
                return None
        return None

    def bfl(self, lora_name: str) -> list[tuple[str, str, tuple[int, int]]] | None:
        """`lora_unet_double_blocks_0_img_attn_qkv` → [(transformer, torch weight, (row share, of shares)), …]
        for a Flux kiln; None when the name is not a BFL block part this kiln has."""
        m = re.fullmatch(r"lora_unet_(double|single)_blocks_(\d+)_(\w+)", lora_name)
        if m is None or "transformer" not in self.names:
            return None
        kind, index, part = m.groups()
        modules = (FLUX_DOUBLE if kind == "double" else FLUX_SINGLE).get(part)
        prefix = "transformer_blocks" if kind == "double" else "single_transformer_blocks"
        if modules is None:
            return None
        weights = [f"{prefix}.{index}.{name}.weight" for name in modules]
        if not all(w in self.names["transformer"] for w in weights):
            return None
        shares = FLUX_SHARES[len(modules)]
        return [("transformer", w, (share, sum(shares))) for w, share in zip(weights, shares, strict=True)]

    def diffusers(self, module: str) -> tuple[str, str] | None:
        """`unet.down_blocks.0.….to_q` / `text_encoder.encoder.layers.0.self_attn.q_proj` → (component, weight)."""
        module = module.removeprefix("base_model.model.")
        component, _, rest = module.partition(".")
        order = [component] if component in COMPONENTS else list(COMPONENTS)
        rest = rest if component in COMPONENTS else module
        for comp in order:
            path = _processor_free(rest, "text" if comp.startswith("text_encoder") else "unet")
            for candidate in (path, "text_model." + path) if comp.startswith("text_encoder") else (path,):
                if candidate + ".weight" in self.names.get(comp, ()):
                    return comp, candidate + ".weight"
        return None

    def _sgm(self, name: str) -> list[str]:
        """Candidate diffusers names (flattened) for an SGM UNet name; several where SGM is ambiguous."""
        if name in _SGM_TOP:
            return [_SGM_TOP[name]]
        per = self.layers_per_block + 1  # SGM input/output blocks per diffusers block
        if m := re.fullmatch(r"input_blocks_(\d+)_(\d+)_(.+)", name):
            i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            block, k = divmod(i - 1, per)
            if k == self.layers_per_block:  # the block's downsampler: input_blocks.i.0.op
                return [f"down_blocks_{block}_downsamplers_0_conv"] if rest == "op" else []
            return [f"down_blocks_{block}_{_sgm_inner(j, k, rest)}"]
        if m := re.fullmatch(r"middle_block_(\d+)_(.+)", name):
            i, rest = int(m.group(1)), m.group(2)
            inner = {0: _sgm_inner(0, 0, rest), 1: f"attentions_0_{rest}", 2: _sgm_inner(0, 1, rest)}.get(i)
            return [f"mid_block_{inner}"] if inner else []
        if m := re.fullmatch(r"output_blocks_(\d+)_(\d+)_(.+)", name):
            i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            block, k = divmod(i, per)
            # index 1 is the attention in blocks that have one, else the upsampler; index 2 is always the upsampler
            inner = [_sgm_inner(j, k, rest)] if j < 2 else []
            if j >= 1:
                inner.append(f"upsamplers_0_{rest}")
            return [f"up_blocks_{block}_{s}" for s in inner]
        return []


def _sgm_inner(j: int, k: int, rest: str) -> str:
    """Submodule j of SGM layer k: 0 is the resnet (its parts renamed), 1 the transformer (names kept)."""
    if j == 0:
        return f"resnets_{k}_{_SGM_RESNET.get(rest, rest)}"
    return f"attentions_{k}_{rest}"


def _processor_free(path: str, kind: str) -> str:
    parts = [p for p in path.split(".") if p != "processor"]
    return ".".join(_PROCESSOR[kind].get(p, p) for p in parts)
