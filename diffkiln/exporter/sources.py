"""Model sources, all offline: a local diffusers folder, a single-file checkpoint or a built-in preset.

A source answers four questions the exporter asks: what pipeline is this (`info`), give me module X (`load`),
where are its tokenizers, and what is its scheduler config. Modules are built one at a time so a big pipeline
never sits in memory whole.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

from diffkiln import __version__
from diffkiln.errors import SourceError
from diffkiln.exporter.presets import SEED, T5_TOKENIZER_DIR, Preset, tokenizer_eos_id
from diffkiln.specs import VAE_SCALE, PipelineInfo

BUNDLED = {"demo": Path(__file__).resolve().parents[1] / "assets" / "demo"}  # folders shipped in the package
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CLIP_BPE_FILES = ("vocab.json", "merges.txt")
PICKLES = (".ckpt", ".pt", ".pth", ".bin")  # torch pickles: loading one can run any code, so none is ever opened
# module (diffusers/transformers object) -> the exported components it yields
MODULE_OF = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "unet": "unet",
    "transformer": "transformer",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
}
FLUX_SEQUENCE = 512  # FluxPipeline's default max_sequence_length (FLUX.1-dev; schnell was trained with 256)


class Source:
    ref: str
    kind: str  # preset | folder | single-file
    info: PipelineInfo
    path: Path | None = None  # the folder or file a source reads: no stage may write into or around it

    @property
    def components(self) -> list[str]:
        if self.info.is_flux:
            return ["text_encoder", "text_encoder_2", "transformer", "vae_decoder", "vae_encoder"]
        names = ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
        return [n for n in names if n != "text_encoder_2" or self.info.is_sdxl]

    def load(self, module: str):
        """The torch module (fp32, eval mode) named as in a diffusers folder: text_encoder[_2], unet or
        transformer, vae."""
        raise NotImplementedError

    def copy_tokenizers(self, out: Path) -> list[str]:
        """Copy tokenizer folders into `out`; returns their names."""
        raise NotImplementedError

    def scheduler_config(self) -> dict:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A hash that changes whenever the weights or configs would."""
        raise NotImplementedError


class PresetSource(Source):
    kind = "preset"

    def __init__(self, preset: Preset):
        self.preset = preset
        self.ref = preset.name
        self.eos = tokenizer_eos_id(preset.tokenizer)
        texts = list(preset.text_encoders)
        if preset.kind == "flux":
            t5 = texts[1]
            texts[1] = {**t5, "vocab_size": t5["vocab_size"] or t5_vocab_size(T5_TOKENIZER_DIR)}
            self.info = _flux_info(preset.unet, preset.vae, texts, self.eos, preset.max_sequence_length)
        else:
            self.info = _info(preset.kind, preset.unet, preset.vae, texts, preset.scheduler, self.eos)
        self.texts = texts

    def load(self, module: str):
        import torch
        from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

        p = self.preset
        # one seed per module, so a component's weights do not depend on what was built before it
        offset = ["text_encoder", "text_encoder_2", "unet", "vae", "transformer"].index(module)
        torch.manual_seed(SEED + offset)
        if module == "unet":
            model = UNet2DConditionModel(**p.unet)
        elif module == "transformer":
            model = FluxTransformer2DModel(**p.unet)
        elif module == "vae":
            model = AutoencoderKL(**p.vae)
        elif self.info.is_flux and module == "text_encoder_2":
            model = T5EncoderModel(T5Config(**self.texts[1]))
        else:
            config = CLIPTextConfig(**self.text_config(offset))
            model = CLIPTextModelWithProjection(config) if offset == 1 else CLIPTextModel(config)
        return model.float().eval()

    def text_config(self, index: int) -> dict:
        """CLIPTextConfig kwargs of text encoder `index`, with the token ids of the preset's tokenizer."""
        eos = self.eos
        return {**self.preset.text_encoders[index], "eos_token_id": eos, "bos_token_id": eos - 1, "pad_token_id": eos}

    def copy_tokenizers(self, out: Path) -> list[str]:
        p = self.preset
        names = ["tokenizer", "tokenizer_2"][: len(p.text_encoders)]
        for i, (name, pad) in enumerate(zip(names, p.pads or [None] * len(names), strict=True)):
            shutil.copytree(T5_TOKENIZER_DIR if self.info.is_flux and i == 1 else p.tokenizer, out / name)
            for file in ("tokenizer_config.json", "special_tokens_map.json") if pad else ():
                config = json.loads((out / name / file).read_text(encoding="utf-8"))
                (out / name / file).write_text(json.dumps({**config, "pad_token": pad}, indent=2) + "\n")
        return names

    def scheduler_config(self) -> dict:
        return dict(self.preset.scheduler)

    def fingerprint(self) -> str:
        import torch

        p = self.preset
        tokens = [p.tokenizer.name, p.pads, self.eos, p.max_sequence_length]
        if self.info.is_flux:
            tokens.append(hash_folder(T5_TOKENIZER_DIR))
        blob = json.dumps([p.name, p.unet, p.vae, self.texts, tokens, SEED, torch.__version__.split("+")[0]])
        return "preset:" + hashlib.sha256((blob + __version__).encode()).hexdigest()[:32]


class FolderSource(Source):
    """A diffusers folder: model_index.json plus one subfolder per module."""

    kind = "folder"
    REQUIRED = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
    text_encoders: tuple[Path, ...] | None = None  # Flux: single-file CLIP-L and T5 instead of the folder's

    def __init__(self, path: Path, text_encoders: tuple[Path, Path] | None = None):
        self.path = path.resolve()
        self.ref = str(self.path)
        self.text_encoders = tuple(Path(p) for p in text_encoders) if text_encoders else None
        index_file = self.path / "model_index.json"
        if not index_file.is_file():
            raise SourceError(f"{path} has no model_index.json; pass a diffusers model folder or a preset name")
        self.index = _read_json(index_file)
        if "transformer" in self.index:
            self._init_flux(path)
            return
        if self.text_encoders:
            raise SourceError("--text-encoders is for Flux folders (CLIP-L + T5 files); this folder is not one")
        sdxl = "text_encoder_2" in self.index
        required = self.REQUIRED + (("text_encoder_2", "tokenizer_2") if sdxl else ())
        missing = [m for m in required if not (self.path / m).is_dir()]
        if missing:
            raise SourceError(
                f"{path} is missing {', '.join(missing)}/; a diffusers folder needs {', '.join(required)}"
            )
        for weights in sorted(self.path.glob("*/*.safetensors")):
            _check_safetensors(weights)
        configs = {m: _read_json(self.path / m / "config.json") for m in ("unet", "vae", "text_encoder")}
        texts = [configs["text_encoder"]]
        if sdxl:
            texts.append(_read_json(self.path / "text_encoder_2" / "config.json"))
        scheduler = self.scheduler_config()
        kind = "sdxl" if sdxl else ("sd2" if texts[0].get("hidden_size") == 1024 else "sd1")
        for tokenizer in ("tokenizer", "tokenizer_2"):  # bad JSON here would only surface at `run` time
            for f in sorted((self.path / tokenizer).glob("*.json")):
                _read_json(f)
        eos = _eos_id(self.path / "tokenizer")
        if sdxl:
            _eos_id(self.path / "tokenizer_2")  # read now: a bad one would only surface at `run` time
        self.info = _info(kind, configs["unet"], configs["vae"], texts, scheduler, eos)

    def _init_flux(self, path: Path) -> None:
        """A FluxPipeline folder: CLIP + T5 text encoders, FluxTransformer2DModel, a 16-channel VAE."""
        required = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae", "scheduler")
        if self.text_encoders:  # ComfyUI's clip_l + t5xxl files instead of the folder's encoders
            required = tuple(m for m in required if not m.startswith("text_encoder"))
            if len(self.text_encoders) != 2 or not all(p.is_file() for p in self.text_encoders):
                raise SourceError("--text-encoders takes two existing files: CLIP_L.safetensors,T5.safetensors")
        missing = [m for m in required if not (self.path / m).is_dir()]
        if missing:
            raise SourceError(f"{path} is missing {', '.join(missing)}/; a Flux folder needs {', '.join(required)}")
        pipeline = self.index.get("_class_name", "")
        if pipeline != "FluxPipeline":
            raise SourceError(
                f"{path} holds a {pipeline or 'transformer'} pipeline; diffkiln reads FluxPipeline folders"
            )
        for weights in sorted(self.path.glob("*/*.safetensors")):
            _check_safetensors(weights)
        if self.text_encoders:
            from diffkiln.exporter import text_encoder_files

            texts = [
                text_encoder_files.clip_config(self.text_encoders[0]),
                text_encoder_files.t5_config(self.text_encoders[1]),
            ]
        else:
            texts = [_read_json(self.path / m / "config.json") for m in ("text_encoder", "text_encoder_2")]
        transformer = _read_json(self.path / "transformer" / "config.json")
        vae = _read_json(self.path / "vae" / "config.json")
        self.scheduler_config()
        eos = _eos_id(self.path / "tokenizer")
        t5_vocab_size(self.path / "tokenizer_2")  # read now: a bad one would only surface at `run` time
        self.info = _flux_info(transformer, vae, texts, eos, FLUX_SEQUENCE)

    def load(self, module: str):
        from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

        folder = self.path / module
        if self.text_encoders and module.startswith("text_encoder"):
            from diffkiln.exporter import text_encoder_files

            index = int(module == "text_encoder_2")
            return text_encoder_files.load(self.text_encoders[index], ("clip", "t5")[index], self.info.eos_token_id)
        try:
            if module == "unet":
                model = UNet2DConditionModel.from_pretrained(folder, local_files_only=True)
            elif module == "transformer":
                model = FluxTransformer2DModel.from_pretrained(folder, local_files_only=True)
            elif module == "text_encoder_2" and self.info.is_flux:
                model, report = T5EncoderModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
            elif module == "vae":
                model = AutoencoderKL.from_pretrained(folder, local_files_only=True)
            else:
                cls = self.index.get(module, [None, "CLIPTextModel"])[1]
                loader = CLIPTextModelWithProjection if cls == "CLIPTextModelWithProjection" else CLIPTextModel
                model, report = loader.from_pretrained(folder, local_files_only=True, output_loading_info=True)
        except Exception as e:  # diffusers/transformers raise many kinds; the user needs one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SourceError(f"cannot load {module} from {folder}: {first}") from e
        if module.startswith("text_encoder") and report["missing_keys"]:  # transformers only warns, then random
            missing = sorted(report["missing_keys"])
            raise SourceError(
                f"{folder} lacks {len(missing)} weights of its text encoder (e.g. {missing[0]}); its weights file "
                "is incomplete or in a layout this transformers version cannot read: re-save it"
            )
        return model.float().eval()

    def copy_tokenizers(self, out: Path) -> list[str]:
        names = [n for n in ("tokenizer", "tokenizer_2") if (self.path / n).is_dir()]
        for name in names:
            shutil.copytree(self.path / name, out / name)
        return names

    def scheduler_config(self) -> dict:
        path = self.path / "scheduler" / "scheduler_config.json"
        return _read_json(path)

    def fingerprint(self) -> str:
        """sha256 over every config and weight file (weights are streamed, never held in memory)."""
        h = hashlib.sha256(b"diffkiln-folder/2")
        files = sorted((f.relative_to(self.path).as_posix(), f) for f in self.path.rglob("*") if f.is_file())
        files += [(f"--text-encoders/{i}", p) for i, p in enumerate(self.text_encoders or ())]
        for rel, f in files:  # every field length-framed: no two different folders hash the same stream
            name = rel.encode("utf-8", "surrogateescape")
            h.update(len(name).to_bytes(8, "little") + name)
            hash_file(h, f)
        return "folder:" + h.hexdigest()


def hash_file(h, path: Path) -> None:
    """Feed `path`'s size and bytes to the hash `h`, streamed."""
    h.update(path.stat().st_size.to_bytes(8, "little"))
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)


def hash_folder(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode())
        hash_file(h, f)
    return h.hexdigest()


def t5_vocab_size(folder: Path) -> int:
    """Tokens in a T5 tokenizer folder's `tokenizer.json` (its Unigram vocabulary plus added tokens)."""
    config = _read_json(folder / "tokenizer.json")
    vocab = config.get("model", {}).get("vocab") if isinstance(config, dict) else None
    if not isinstance(vocab, list) or not vocab:
        raise SourceError(f"{folder}/tokenizer.json is not a T5 (Unigram) tokenizer; the model folder is incomplete")
    added = [
        t.get("id") for t in config.get("added_tokens", []) if isinstance(t, dict) and isinstance(t.get("id"), int)
    ]
    return max([len(vocab) - 1, *added]) + 1


def _eos_id(folder: Path) -> int:
    """The eos id of a CLIP tokenizer folder in either form transformers writes (vocab.json + merges.txt, or
    tokenizer.json alone), read by the runtime's own tokenizer so export and `run` agree."""
    from diffkiln.runtime.tokenizer import ClipTokenizer, TokenizerFilesError

    if not (folder / "tokenizer.json").is_file() and not all((folder / f).is_file() for f in CLIP_BPE_FILES):
        raise SourceError(
            f"{folder} has no tokenizer.json (nor vocab.json + merges.txt); the model folder is incomplete"
        )
    try:
        return ClipTokenizer.from_dir(folder).eos_id
    except TokenizerFilesError as e:
        raise SourceError(str(e)) from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"missing {path}; the model folder is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path} is not valid JSON ({e.__class__.__name__}); the model folder is corrupt") from None


def _check_safetensors(path: Path) -> None:
    """Read the header and check every tensor lies inside the file, without loading the weights."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                f.get_slice(key)
    except Exception as e:
        raise SourceError(f"{path} is not a valid safetensors file ({e}); re-download or re-save it") from None


def _info(kind: str, unet: dict, vae: dict, texts: list[dict], scheduler: dict, eos: int) -> PipelineInfo:
    sdxl = kind == "sdxl"
    n_down = len(unet.get("down_block_types", ())) - 1
    return PipelineInfo(
        kind=kind,
        text_hidden=tuple(t.get("hidden_size", 512) for t in texts),
        vocab_size=texts[0].get("vocab_size", 49408),
        eos_token_id=eos,  # from the tokenizer: old CLIP configs say 2 and pool at argmax(ids) instead
        cross_attention_dim=unet.get("cross_attention_dim", 768),
        latent_channels=unet.get("in_channels", 4),
        text_embeds_dim=texts[1].get("projection_dim", 0) if sdxl else 0,
        time_ids_dim=6 if sdxl else 0,
        sample_size=unet.get("sample_size", 64),
        num_down=max(n_down, 0),
        scaling_factor=vae.get("scaling_factor", 0.18215),
        prediction_type=scheduler.get("prediction_type", "epsilon"),
    )


def _flux_info(transformer: dict, vae: dict, texts: list[dict], eos: int, text_sequence: int) -> PipelineInfo:
    clip, t5 = texts
    return PipelineInfo(
        kind="flux",
        text_hidden=(clip.get("hidden_size", 768), t5.get("d_model", 4096)),
        vocab_size=clip.get("vocab_size", 49408),
        eos_token_id=eos,
        cross_attention_dim=transformer.get("joint_attention_dim", 4096),
        latent_channels=transformer.get("in_channels", 64) // 4,
        text_embeds_dim=transformer.get("pooled_projection_dim", 768),
        sample_size=max(vae.get("sample_size", 1024) // VAE_SCALE, 2),
        num_down=1,  # latents are packed in 2×2 patches
        scaling_factor=vae.get("scaling_factor", 0.3611),
        prediction_type="flow",
        text_sequence=text_sequence,
        t5_vocab_size=t5.get("vocab_size", 32128),
        shift_factor=vae.get("shift_factor") or 0.0,
        guidance_embeds=bool(transformer.get("guidance_embeds", False)),
    )


def save_as_folder(source: PresetSource, path: Path) -> Path:
    """Write a preset as a standard diffusers folder (diffusers' `DiffusionPipeline.from_pretrained` loads it),
    so references and other tools can run exactly the weights diffkiln exports."""
    import diffusers

    path = Path(path)
    if source.info.is_flux:
        return _save_flux_folder(source, path)
    sdxl = source.info.is_sdxl
    index = {
        "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", source.scheduler_config()["_class_name"]],
    }
    if sdxl:
        index |= {
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "force_zeros_for_empty_prompt": True,
        }
    else:
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    path.mkdir(parents=True, exist_ok=True)
    for module in {MODULE_OF[c] for c in source.components}:
        model = source.load(module)
        if module.startswith("text_encoder"):
            save_text_encoder(model, path / module)
        else:
            model.save_pretrained(path / module)
    source.copy_tokenizers(path)
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(source.scheduler_config(), indent=2))
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def _save_flux_folder(source: PresetSource, path: Path) -> Path:
    import diffusers

    from diffkiln.interop import flux_model_index

    index = {
        **flux_model_index(diffusers.__version__),
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }
    path.mkdir(parents=True, exist_ok=True)
    for module in ("text_encoder", "text_encoder_2", "transformer", "vae"):
        model = source.load(module)
        if module == "text_encoder":
            save_text_encoder(model, path / module)
        else:
            model.save_pretrained(path / module)
        del model
    source.copy_tokenizers(path)
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(source.scheduler_config(), indent=2))
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def save_text_encoder(model, folder: Path) -> None:
    """Save a transformers CLIP text model with the keys real SD folders have (`text_model.…`).

    transformers 5 saves CLIPTextModel without that prefix, and transformers 4 then loads such a file as random
    weights with only a warning; transformers 4 and 5 both load this layout.
    """
    from safetensors.torch import save_file

    state = model.state_dict()
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        state = {f"text_model.{k}": v for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), {"format": "pt"})
