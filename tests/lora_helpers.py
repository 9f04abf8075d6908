"""Test helpers for LoRA folding: random LoRAs written in kohya and diffusers formats, the diffusers reference
pipeline built from a preset, and running components in torch and ONNX Runtime on the same seeded feeds."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from diffkiln import kiln
from diffkiln.lora.initializers import ComponentGraph
from diffkiln.parity import ort_session
from diffkiln.specs import PipelineInfo, component_specs, parity_dims

ATTN = r"\.attn[12]\.to_(q|k|v|out\.0)\.weight$"
FF_CONV = r"(\.ff\.net\.(0\.proj|2)|proj_(in|out)|resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj))\.weight$"
TEXT = r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$"
TARGETS = {
    "attn": {"unet": ATTN},
    "attn+te": {"unet": ATTN, "text_encoder": TEXT, "text_encoder_2": TEXT},
    "attn+ff+conv+te": {"unet": f"{ATTN}|{FF_CONV}", "text_encoder": TEXT, "text_encoder_2": TEXT},
}


@dataclass
class Module:
    """One LoRA module for a torch weight: down [r, in(, kh, kw)], up [out, r(, 1, 1)], alpha."""

    down: np.ndarray
    up: np.ndarray
    alpha: float


def weight_shapes(kiln_dir: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """{component: {torch weight: torch shape}} from a kiln dir's weight map and graphs."""
    weight_map = json.loads((Path(kiln_dir) / kiln.WEIGHT_MAP).read_text())
    shapes = {}
    for component, entries in weight_map.items():
        if component.startswith("vae"):
            continue
        graph = ComponentGraph(Path(kiln_dir) / component)
        shapes[component] = {
            name: graph.shape(e["initializer"])[:: -1 if e["transposed"] else 1] for name, e in entries.items()
        }
    return shapes


def make_lora(kiln_dir: Path, targets: str, seed: int, alpha: float | None = None) -> dict[tuple[str, str], Module]:
    """Random modules for the weights `TARGETS[targets]` selects; ranks 4 or 2 per module, alphas too unless one
    `alpha` is given. 3×3 convs get LoCon modules (kernel on down, 1×1 up).

    diffusers 0.42 applies one alpha to every module of a kohya file (its alpha_pattern keys for kohya names never
    match a module), so kohya files compared against it use one alpha, as kohya's trainer writes them."""
    rng = np.random.default_rng(seed)
    lora = {}
    for component, shapes in weight_shapes(kiln_dir).items():
        pattern = TARGETS[targets].get(component)
        for i, (name, shape) in enumerate(sorted(shapes.items())):
            if not pattern or not re.search(pattern, name):
                continue
            rank, fan_in = (4, 2)[i % 2], int(np.prod(shape[1:]))
            down = rng.standard_normal((rank, *shape[1:])) / np.sqrt(fan_in)
            up = rng.standard_normal((shape[0], rank, *([1, 1] if len(shape) == 4 else []))) / np.sqrt(rank)
            module_alpha = alpha if alpha is not None else (2.0, 1.0, 3.0)[i % 3]
            lora[component, name] = Module(down.astype(np.float32), up.astype(np.float32), module_alpha)
    return lora


def save_kohya(lora: dict, path: Path, sgm_layers_per_block: int | None = None) -> Path:
    """`lora_unet_<flat name>.lora_down.weight` …; SDXL files (two text encoders) use `lora_te1_`/`lora_te2_` and,
    with `sgm_layers_per_block`, the SGM UNet's block names as kohya's SDXL trainer writes them."""
    sdxl = any(c == "text_encoder_2" for c, _ in lora)
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}
    tensors = {}
    for (component, name), m in lora.items():
        module = name.removesuffix(".weight")
        if component == "unet" and sgm_layers_per_block:
            module = to_sgm(module, sgm_layers_per_block)
        key = prefix[component] + module.replace(".", "_")
        tensors |= {f"{key}.lora_down.weight": m.down, f"{key}.lora_up.weight": m.up}
        tensors[f"{key}.alpha"] = np.array(m.alpha, dtype=np.float32)
    save_file(tensors, str(path))
    return Path(path)


def save_diffusers(lora: dict, path: Path) -> Path:
    """peft format as diffusers' `save_lora_weights` writes it: `unet.<module>.lora_A.weight` (down), `lora_B`
    (up), module paths as transformers 5 names them (CLIPTextModel has no `text_model.` level any more,
    CLIPTextModelWithProjection still has), alphas and ranks in `lora_adapter_metadata`."""
    tensors, meta = {}, {}
    for (component, name), m in lora.items():
        module = name.removesuffix(".weight")
        module = module.removeprefix("text_model.") if component == "text_encoder" else module
        tensors[f"{component}.{module}.lora_A.weight"] = m.down
        tensors[f"{component}.{module}.lora_B.weight"] = m.up
        config = meta.setdefault(component, {"alpha": {}, "rank": {}})
        config["alpha"][module], config["rank"][module] = m.alpha, m.down.shape[0]
    flat = {}
    for component, config in meta.items():
        flat |= {
            f"{component}.r": 4,
            f"{component}.lora_alpha": 2.0,
            f"{component}.alpha_pattern": {k: v for k, v in config["alpha"].items() if v != 2.0},
            f"{component}.rank_pattern": {k: v for k, v in config["rank"].items() if v != 4},
            f"{component}.target_modules": sorted(config["alpha"]),
            f"{component}.use_dora": False,
            f"{component}.use_rslora": False,
        }
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(flat)})
    return Path(path)


def to_sgm(module: str, layers: int) -> str:
    """diffusers UNet module path → the SGM (original SDXL) one, the inverse of what kohya-trained files need."""
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}
    resnet["conv_shortcut"] = "skip_connection"
    top = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0"}
    top |= {"time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0"}
    top["add_embedding.linear_2"] = "label_emb.0.2"
    if module in top:
        return top[module]
    m = re.fullmatch(
        r"(down_blocks|up_blocks|mid_block)\.?(\d*)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", module
    )
    kind, block, inner, k, rest = m.groups()
    rest = resnet.get(rest, rest) if inner == "resnets" else rest
    if kind == "mid_block":
        return f"middle_block.{(0, 2)[int(k)] if inner == 'resnets' else 1}.{rest}"
    block, k = int(block or 0), int(k)
    if kind == "down_blocks":
        if inner == "downsamplers":
            return f"input_blocks.{1 + block * (layers + 1) + layers}.0.op"
        return f"input_blocks.{1 + block * (layers + 1) + k}.{0 if inner == 'resnets' else 1}.{rest}"
    if inner == "upsamplers":
        return f"output_blocks.{block * (layers + 1) + layers}.2.{rest}"
    return f"output_blocks.{block * (layers + 1) + k}.{0 if inner == 'resnets' else 1}.{rest}"


def reference_pipeline(preset: str):
    """The diffusers pipeline of a preset, built in memory from the exact modules and tokenizers diffkiln exports."""
    from diffkiln.bench.torch_ref import pipeline_from_modules
    from diffkiln.exporter import open_source

    return pipeline_from_modules(open_source(preset))


def feeds(kiln_dir: Path, component: str) -> list[dict[str, np.ndarray]]:
    """Seeded sample inputs at the export's two parity shapes."""
    info = PipelineInfo.from_json(kiln.read_manifest(kiln_dir)["pipeline"])
    spec = component_specs(info)[component]
    return [spec.sample_inputs(d, info, seed=i) for i, d in enumerate(parity_dims(info))]


def run_onnx(kiln_dir: Path, component: str, inputs: list[dict]) -> list[dict[str, np.ndarray]]:
    session = ort_session(kiln.model_path(Path(kiln_dir), component))
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, f), strict=True)) for f in inputs]


def run_torch(pipe, component: str, inputs: list[dict], output_names: list[str]) -> list[dict[str, np.ndarray]]:
    import torch

    from diffkiln.exporter.wrappers import wrap

    module = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}.get(component) or pipe.text_encoder_2
    model = wrap(component, module)
    results = []
    with torch.no_grad():
        for f in inputs:
            out = model(*(torch.from_numpy(v) for v in f.values()))
            out = out if isinstance(out, tuple) else (out,)
            results.append({n: o.numpy() for n, o in zip(output_names, out, strict=True)})
    return results
