"""Single-file checkpoints: the A1111/ComfyUI `*.safetensors` holding UNet, VAE and text encoder(s) in the original
LDM/SGM key layout.

The family comes from the text encoders' keys (CLIP-L: SD 1.x; OpenCLIP-H: SD 2.x; CLIP-L + OpenCLIP-bigG: SDXL
base). Within it, the preset whose every tensor shape the file has gives all configs (UNet, VAE, text encoders,
tokenizer, scheduler), so a single file exports like the preset, with the file's weights. diffusers' own converters
(`diffusers.loaders.single_file_utils`) rename each module's keys to diffusers' layout. They are called on one
module's tensors at a time rather than through `from_single_file`, which reads the whole file for every module,
needs a config folder on disk and, when both text encoders have one width, may load the first into the second.

The keys cannot tell SD 2.x's noise-predicting 512 px models from its 768 px v-prediction ones, so those need
`--arch sd21` or `--arch sd21-v`. Nothing is ever unpickled: `.ckpt`/`.pt`/`.pth`/`.bin` are refused by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from diffkiln.errors import SourceError, first_line
from diffkiln.exporter.presets import PRESETS, Preset
from diffkiln.exporter.sources import PresetSource, _check_safetensors, hash_file

_SD21_BASE = dataclasses.replace(  # SD 2.x base: the 2.1-v architecture at 512 px, predicting noise
    PRESETS["sd21"],
    name="sd21-base",
    unet={**PRESETS["sd21"].unet, "sample_size": 64, "upcast_attention": False},
    scheduler={**PRESETS["sd21"].scheduler, "prediction_type": "epsilon"},
)
# --arch -> (family, the presets of that family a file may match, first the real one)
ARCHS: dict[str, tuple[str, tuple[Preset, ...]]] = {
    "sd15": ("sd1", (PRESETS["sd15"], PRESETS["tiny"])),
    "sd21": ("sd2", (_SD21_BASE,)),
    "sd21-v": ("sd2", (PRESETS["sd21"],)),
    "sdxl": ("sdxl", (PRESETS["sdxl"], PRESETS["tiny-sdxl"])),
}
FAMILIES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL"}
FAMILY_ARCH = {"sd1": "sd15", "sd2": "sd21 or --arch sd21-v", "sdxl": "sdxl"}  # what --arch to suggest
# family -> module -> the key prefix of its tensors in the file (LDM for SD 1.x/2.x, SGM for SDXL)
PREFIXES = {
    "sd1": {"text_encoder": "cond_stage_model.transformer."},
    "sd2": {"text_encoder": "cond_stage_model.model."},
    "sdxl": {
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
}
UNET, VAES = "model.diffusion_model.", ("first_stage_model.", "vae.")


class SingleFileSource(PresetSource):
    """A single-file checkpoint, exported with the configs of the preset its tensor shapes match."""

    kind = "single-file"

    def __init__(self, path: Path, arch: str | None = None):
        from safetensors import safe_open

        self.path = Path(path).resolve()
        _check_safetensors(self.path)
        with safe_open(str(self.path), framework="pt") as f:
            self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        family, v_pred = _family(self.path, self.shapes), "v_pred" in self.shapes  # ComfyUI's v-prediction mark
        if arch is None and family == "sd2" and not v_pred:
            raise SourceError(
                f"{path} is a Stable Diffusion 2.x checkpoint, and its keys do not say whether it predicts noise "
                "(512 px) or velocity (768 px): pass --arch sd21 or --arch sd21-v"
            )
        arch = arch or ("sd21-v" if family == "sd2" else FAMILY_ARCH[family])
        if arch not in ARCHS:
            raise SourceError(f"unknown --arch {arch}; use one of {', '.join(ARCHS)}")
        if ARCHS[arch][0] != family:
            raise SourceError(
                f"{path} is a {FAMILIES[family]} checkpoint, not {arch}: drop --arch or pass --arch "
                f"{FAMILY_ARCH[family]}"
            )
        if v_pred and arch != "sd21-v":
            raise SourceError(f"{path} is marked v-prediction (a v_pred key), which diffkiln's {arch} cannot export")
        self.arch, self.prefixes = arch, {"unet": UNET, "vae": _vae_prefix(self.shapes), **PREFIXES[family]}
        problems = [(self._mismatch(p), p) for p in ARCHS[arch][1]]
        preset = next((p for problem, p in problems if problem is None), None)
        if preset is None:  # name the closest preset's problem: a wrong shape before missing or extra keys
            (_, problem), _ = min(problems, key=lambda item: item[0][0])
            raise SourceError(f"{path} does not match the {arch} architecture: {problem}")
        super().__init__(preset)
        self.ref = str(self.path)

    def load(self, module: str):
        """The preset's module with the file's weights: converted by diffusers, loaded strictly, fp32."""
        from safetensors import safe_open

        model = super().load(module)
        prefix = self.prefixes[module]
        try:  # the shapes were checked when the source opened; a file changed since, or odd dtypes, end here
            with safe_open(str(self.path), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in self.shapes if k.startswith(prefix)}
            model.load_state_dict(self._convert(module, state, model), strict=True)
        except Exception as e:
            raise SourceError(f"cannot load {module} from {self.path}: {first_line(e)}") from None
        return model.float().eval()

    def fingerprint(self) -> str:
        """sha256 over the configs diffkiln gives the file and the file itself (streamed)."""
        p = self.preset
        configs = [self.arch, p.name, p.unet, p.vae, p.text_encoders, p.scheduler, p.tokenizer.name, p.pads]
        h = hashlib.sha256(json.dumps(["diffkiln-single-file/1", configs]).encode())
        hash_file(h, self.path)
        return "single-file:" + h.hexdigest()

    def _mismatch(self, preset: Preset) -> tuple[int, str] | None:
        """Why the file's tensors do not fit `preset`, or None: (1, missing or extra keys) or (0, a wrong shape).
        The conversion runs on meta tensors, so nothing is read."""
        import torch

        source = PresetSource(preset)
        for module, prefix in self.prefixes.items():
            with torch.device("meta"):
                model = source.load(module)
                state = {k: torch.empty(s) for k, s in self.shapes.items() if k.startswith(prefix)}
                try:
                    have = self._convert(module, state, model)
                except Exception as e:  # diffusers' converters index keys they expect; a short file trips them
                    return 1, f"its {module} keys ({prefix}*) do not convert ({type(e).__name__}: {e})"
            want = model.state_dict()
            missing = [k for k in want if have.get(k) is None]
            extra = [k for k in have if k not in want]
            shaped = [k for k in want if k in have and have[k] is not None and have[k].shape != want[k].shape]
            if missing or extra:
                k = (missing or extra)[0]
                what = "lacks" if missing else "has an extra"
                return 1, f"its {module} {what} {k} ({len(missing)} missing, {len(extra)} extra in diffusers' names)"
            if shaped:
                k = shaped[0]
                return 0, f"{module} {k} is {list(have[k].shape)} in the file, {list(want[k].shape)} in {preset.name}"
        return None

    def _convert(self, module: str, state: dict, model) -> dict:
        """`state` (one module's tensors, file keys) in `model`'s parameter names, by diffusers' converters."""
        from diffusers.loaders import single_file_utils as sfu

        prefix = self.prefixes[module]
        if module == "unet":
            return sfu.convert_ldm_unet_checkpoint(state, dict(model.config))
        if module == "vae":
            return sfu.convert_ldm_vae_checkpoint(state, dict(model.config))
        if prefix.endswith(".model."):  # OpenCLIP (SD 2.x, SDXL's second encoder): fused q/k/v, resblocks
            out = sfu.convert_open_clip_checkpoint(model, state, prefix=prefix)
        else:
            out = sfu.convert_ldm_clip_checkpoint(state, remove_prefix=prefix)
        flat = not hasattr(model, "text_model")  # transformers >= 5.6 flattened CLIPTextModel
        return {_clip_key(k, flat): v for k, v in out.items() if not k.endswith("position_ids")}  # an old buffer


def _family(path: Path, shapes: dict) -> str:
    """sd1 | sd2 | sdxl from which text encoders the file holds; a one-line error for anything else."""
    has = {p for family in PREFIXES.values() for p in family.values() if any(k.startswith(p) for k in shapes)}
    unet, vae = any(k.startswith(UNET) for k in shapes), _vae_prefix(shapes) is not None
    family = next((f for f in ("sdxl", "sd2", "sd1") if set(PREFIXES[f].values()) <= has), None)
    if not (unet and vae and family):
        lacks = [name for name, ok in (("UNet", unet), ("VAE", vae), ("text encoder", family)) if not ok]
        raise SourceError(
            f"{path} is not a Stable Diffusion single-file checkpoint diffkiln knows: it has no {', no '.join(lacks)} "
            f"in the LDM/SGM key layout ({UNET}*, {VAES[0]}*, cond_stage_model.* or conditioner.embedders.*); "
            "diffkiln reads full SD 1.x, 2.x and SDXL base checkpoints (not LoRAs, VAEs or refiners)"
        )
    return family


def _clip_key(key: str, flat: bool) -> str:
    """A CLIP text-model key in the model's naming, from either layout (with or without `text_model.`)."""
    key = key.removeprefix("text_model.")
    return key if flat or key.startswith("text_projection") else f"text_model.{key}"


def _vae_prefix(shapes: dict) -> str | None:
    return next((p for p in VAES if any(k.startswith(p) for k in shapes)), None)
