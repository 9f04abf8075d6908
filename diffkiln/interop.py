"""The files other Stable Diffusion ONNX tools read, written into every kiln dir, and optimum folders read back.

Writing. optimum's `ORTStableDiffusionPipeline[XL]`, optimum-intel's `OVStableDiffusionPipeline(from_onnx=True)`
and ONNX Runtime's `optimize_pipeline.py` load a folder of

    model_index.json                  the diffusers pipeline index (`_class_name`, library + class per module)
    <component>/model.onnx            component names: text_encoder[_2], unet, vae_decoder, vae_encoder
    <component>/config.json           the torch module's config (what `save_pretrained` writes)
    tokenizer[_2]/  scheduler/

and a kiln dir is that folder plus diffkiln's own files. The export records the source's `model_index.json` and
each module's config in the manifest (`interop`), and `StageWriter.finish` writes them out of it, so every stage's
output (export, optimize, lora, and what comes later) carries them without knowing they exist. A manifest from
before this record gets configs made from its pipeline block (enough for these tools: sizes, channels, layers).

Reading. A folder with `model_index.json` and `unet/model.onnx` but no `manifest.json` is what `optimum-cli
export onnx` writes; `optimum_manifest` turns it into the manifest diffkiln would have written: the pipeline block
from the configs, each component's contract (`specs.component_specs` with `contract="optimum"`: int64
`input_ids`, a scalar `timestep`, `hidden_states.0…L` instead of `penultimate_hidden_state`) checked against the
graph's inputs and outputs as read from the protobuf wire format (no onnx import: the runtime reads kilns through
this), and file records by size. The folder is untrusted like any kiln dir: every file it names is a fixed name
confined to it, JSON files are size-capped, and anything unexpected is a one-line KilnError.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from diffkiln.errors import KilnError
from diffkiln.kiln_reader import COMPONENTS, MANIFEST, check_tree, graph_io, inside
from diffkiln.specs import PipelineInfo, component_specs

INDEX = "model_index.json"
CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
MAX_JSON_BYTES = 16 << 20
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
VAE_PARTS = ("vae_decoder", "vae_encoder")


# --- writing ------------------------------------------------------------------------------------------------


def block(model_index: dict, configs: dict[str, dict]) -> dict:
    """The manifest's `interop` record: the pipeline index and {component: config.json contents}."""
    return {"model_index": model_index, "configs": configs}


def model_index(info: PipelineInfo, configs: dict[str, dict], scheduler: dict, base: dict | None = None) -> dict:
    """A diffusers `model_index.json` for this pipeline: `base` (the source's own) when given, else one made from
    the components' configs, as `DiffusionPipeline.save_pretrained` writes it."""
    if base:
        return dict(base)
    if info.is_flux:
        version = str(configs.get("transformer", {}).get("_diffusers_version", "0.30.0"))
        return flux_model_index(version, str(scheduler.get("_class_name", "FlowMatchEulerDiscreteScheduler")))
    sdxl = info.is_sdxl
    index = {
        "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
        "_diffusers_version": str(configs.get("unet", {}).get("_diffusers_version", "0.30.0")),
        "scheduler": ["diffusers", str(scheduler.get("_class_name", "PNDMScheduler"))],
        "text_encoder": ["transformers", _architecture(configs.get("text_encoder"), "CLIPTextModel")],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if sdxl:
        index |= {
            "text_encoder_2": [
                "transformers",
                _architecture(configs.get("text_encoder_2"), "CLIPTextModelWithProjection"),
            ],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "force_zeros_for_empty_prompt": True,
        }
    else:
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    return dict(sorted(index.items()))


def flux_model_index(diffusers_version: str, scheduler: str = "FlowMatchEulerDiscreteScheduler") -> dict:
    """A FluxPipeline folder's model_index.json (diffkiln's exports and `save_as_folder` write the same)."""
    return {
        "_class_name": "FluxPipeline",
        "_diffusers_version": diffusers_version,
        "scheduler": ["diffusers", scheduler],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _architecture(config: dict | None, default: str) -> str:
    names = (config or {}).get("architectures")
    return names[0] if isinstance(names, list) and names and isinstance(names[0], str) else default


def files(manifest: dict, components_present: set[str]) -> tuple[dict, dict[str, dict]]:
    """(the `interop` record — the manifest's own, or one made from its pipeline block —, {relative path: JSON}
    for `model_index.json` and the `config.json` of every component in `components_present`). The stage writer
    writes them (kiln.StageWriter.finish): this module builds content and reads optimum folders, never writes."""
    record = manifest.get("interop") or fallback_block(manifest)
    out = {INDEX: record["model_index"]}
    for name in manifest["components"]:
        if name in components_present:
            out[f"{name}/{CONFIG}"] = record["configs"].get(name) or fallback_config(name, manifest)
    return record, out


def fallback_block(manifest: dict) -> dict:
    """An `interop` record for a manifest written before it existed: configs made from the pipeline block."""
    info = PipelineInfo.from_json(manifest["pipeline"])
    configs = {name: fallback_config(name, manifest) for name in manifest["components"]}
    return block(model_index(info, configs, {}), configs)


def fallback_config(component: str, manifest: dict) -> dict:
    """The config fields diffusers' pipelines and optimum read of a component, from the pipeline block."""
    info = PipelineInfo.from_json(manifest["pipeline"])
    if component in TEXT_ENCODERS:
        encoder = TEXT_ENCODERS.index(component)
        config = {
            "architectures": ["CLIPTextModelWithProjection" if encoder else "CLIPTextModel"],
            "model_type": "clip_text_model",
            "hidden_size": info.text_hidden[encoder],
            "vocab_size": info.vocab_size,
            "eos_token_id": info.eos_token_id,
            "max_position_embeddings": 77,
        }
        if info.layers(encoder):
            config["num_hidden_layers"] = info.layers(encoder)
        if encoder:
            config["projection_dim"] = info.text_embeds_dim
        return config
    if component == "unet":
        config = {
            "_class_name": "UNet2DConditionModel",
            "in_channels": info.latent_channels,
            "out_channels": info.latent_channels,
            "sample_size": info.sample_size,
            "cross_attention_dim": info.cross_attention_dim,
            "time_cond_proj_dim": None,
            "addition_embed_type": "text_time" if info.is_sdxl else None,
        }
        if info.is_sdxl:
            config |= {"projection_class_embeddings_input_dim": None, "requires_aesthetics_score": False}
        return config
    return {  # both VAE halves: 2**(len(block_out_channels) - 1) is the pipelines' VAE scale factor (8)
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": info.latent_channels,
        "block_out_channels": [128, 256, 512, 512],
        "scaling_factor": info.scaling_factor,
        "force_upcast": False,
        "sample_size": info.sample_size * 8,
    }


# --- reading optimum folders --------------------------------------------------------------------------------


def is_optimum_dir(path: Path) -> bool:
    """`path` looks like what `optimum-cli export onnx` writes: an index and a UNet graph, no diffkiln manifest."""
    path = Path(path)
    return (path / INDEX).is_file() and (path / "unet" / "model.onnx").is_file() and not (path / MANIFEST).exists()


def optimum_manifest(folder: Path) -> dict:
    """The manifest of an optimum ONNX pipeline folder (see the module docstring)."""
    folder = Path(folder)
    index = read_json(folder, INDEX)
    pipeline_class = index.get("_class_name")
    if not isinstance(pipeline_class, str) or not pipeline_class.startswith("StableDiffusion"):
        raise KilnError(
            f"{folder}/{INDEX} is a {pipeline_class!r} pipeline; diffkiln reads Stable Diffusion 1/2/XL ONNX "
            "folders only"
        )
    sdxl = pipeline_class.startswith("StableDiffusionXL")
    if pipeline_class.startswith("StableDiffusion3"):
        raise KilnError(f"{folder}/{INDEX} is a {pipeline_class} pipeline; diffkiln reads SD 1/2/XL only")
    needed = [*TEXT_ENCODERS[: 2 if sdxl else 1], "unet", "vae_decoder"]
    present = [c for c in COMPONENTS if (folder / c / "model.onnx").is_file()]
    missing = [c for c in needed if c not in present]
    if missing:
        raise KilnError(
            f"{folder} has no {', '.join(f'{c}/model.onnx' for c in missing)}; an optimum {pipeline_class} folder "
            "needs them (re-run `optimum-cli export onnx`)"
        )
    configs = {c: read_json(folder, f"{c}/{CONFIG}") for c in present}
    scheduler = read_json(folder, SCHEDULER_CONFIG)
    tokenizers = ["tokenizer", "tokenizer_2"][: 2 if sdxl else 1]
    for t in tokenizers:
        if not (folder / t).is_dir():
            raise KilnError(f"{folder} has no {t}/ folder; an optimum {pipeline_class} folder has one")
    info = _pipeline_info(folder, configs, scheduler, sdxl, tokenizers[0])
    layers = tuple(_hidden_layers(folder, c) for c in TEXT_ENCODERS[: len(info.text_hidden)] if c in present)
    contract = _contract(folder)
    info = PipelineInfo.from_json({**info.to_json(), "text_layers": list(layers), "contract": contract})
    if sdxl and contract == "optimum" and min(layers) < 2:
        raise KilnError(
            f"{folder}: an SDXL text encoder gives no hidden_states outputs (SDXL conditions on the penultimate "
            "one); re-export it with `optimum-cli export onnx`"
        )
    specs = component_specs(info)
    components = {c: _component(folder, c, specs[c]) for c in present}
    manifest = {
        "format_version": 1,
        "created_by": f"an optimum-layout folder (diffusers {index.get('_diffusers_version', '?')}), read by diffkiln",
        "pipeline": info.to_json(),
        "source": {"kind": "optimum", "ref": str(folder.resolve()), "fingerprint": fingerprint(folder, present)},
        "opset": graph_io(folder / "unet" / "model.onnx")["opset"],
        "precision": "fp32",
        "scheduler": SCHEDULER_CONFIG,
        "tokenizers": tokenizers,
        "components": components,
        "interop": block(index, configs),
    }
    return json.loads(json.dumps(manifest))  # exactly what reading it back from a file would give


def read_json(folder: Path, rel: str) -> dict:
    """A JSON object file of the folder, confined and size-capped; KilnError naming it otherwise."""
    path = inside(folder, rel, rel)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise KilnError(f"{path} is {size} bytes, too large for a config: do not use this folder")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KilnError(
            f"{folder} has no {rel}; an optimum ONNX folder has one (re-run `optimum-cli export onnx`)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise KilnError(f"{path} is not readable JSON; the folder is damaged: re-export or re-download it") from None
    if not isinstance(data, dict):
        raise KilnError(f"{path} is a JSON {type(data).__name__}, not an object; the folder is damaged")
    return data


def _field(config: dict, key: str, kind: type | tuple[type, ...], default, where: str):
    value = config.get(key, default)
    if not isinstance(value, kind) or isinstance(value, bool):
        what = "number" if kind == (int, float) else kind.__name__
        raise KilnError(f"{where}: {key} is {value!r}, not a {what}; the folder is damaged or crafted")
    return value


def _pipeline_info(folder: Path, configs: dict, scheduler: dict, sdxl: bool, tokenizer: str) -> PipelineInfo:
    unet, vae = configs["unet"], configs["vae_decoder"]
    texts = [configs[c] for c in TEXT_ENCODERS[: 2 if sdxl else 1]]
    hidden = [_field(t, "hidden_size", int, 512, f"{c}/{CONFIG}") for c, t in zip(TEXT_ENCODERS, texts, strict=False)]
    down = _field(unet, "down_block_types", list, [], f"unet/{CONFIG}")
    vocab = folder / tokenizer / "vocab.json"
    eos = read_json(folder, f"{tokenizer}/vocab.json").get("<|endoftext|>", 49407) if vocab.is_file() else 49407
    return PipelineInfo(
        kind="sdxl" if sdxl else ("sd2" if hidden[0] == 1024 else "sd1"),
        text_hidden=tuple(hidden),
        vocab_size=_field(texts[0], "vocab_size", int, 49408, f"text_encoder/{CONFIG}"),
        eos_token_id=eos if isinstance(eos, int) and not isinstance(eos, bool) else 49407,
        cross_attention_dim=_field(unet, "cross_attention_dim", int, 768, f"unet/{CONFIG}"),
        latent_channels=_field(unet, "in_channels", int, 4, f"unet/{CONFIG}"),
        text_embeds_dim=_field(texts[1], "projection_dim", int, 0, f"text_encoder_2/{CONFIG}") if sdxl else 0,
        time_ids_dim=6 if sdxl else 0,
        sample_size=_field(unet, "sample_size", int, 64, f"unet/{CONFIG}"),
        num_down=max(len(down) - 1, 0),
        scaling_factor=float(_field(vae, "scaling_factor", (int, float), 0.18215, f"vae_decoder/{CONFIG}")),
        prediction_type=_field(scheduler, "prediction_type", str, "epsilon", SCHEDULER_CONFIG),
        contract="optimum",
    )


def _contract(folder: Path) -> str:
    """Whose contract the graphs follow: optimum's (int64 ids), or diffkiln's (int32 ids: a kiln dir another
    tool rewrote and saved without our manifest, such as ONNX Runtime's optimize_pipeline.py)."""
    inputs = graph_io(folder / "text_encoder" / "model.onnx")["inputs"]
    return "diffkiln" if [(n, d) for n, d, _ in inputs] == [("input_ids", "int32")] else "optimum"


def _hidden_layers(folder: Path, component: str) -> int:
    """L when the graph gives hidden_states.0…L, else 0 (optimum's SD1/2 exports give none)."""
    names = [name for name, _, _ in graph_io(folder / component / "model.onnx")["outputs"]]
    return max(sum(n.startswith("hidden_states.") for n in names) - 1, 0)


def _component(folder: Path, name: str, spec) -> dict:
    """The manifest record of one optimum component, after checking its graph takes and gives what optimum's
    contract says (names in order, dtypes, ranks)."""
    path = folder / name / "model.onnx"
    check_tree(folder, folder / name)
    io = graph_io(path)
    for kind, wanted in (("inputs", spec.inputs), ("outputs", spec.outputs)):
        got = [(n, d, r) for n, d, r in io[kind]]
        want = [(t.name, t.dtype, len(t.shape)) for t in wanted]
        if [g[0] for g in got] != [w[0] for w in want]:
            raise KilnError(
                f"{path} has {kind} {', '.join(g[0] for g in got) or 'none'}, but an optimum {name} has "
                f"{', '.join(w[0] for w in want)}: it is not an optimum export diffkiln reads (re-export it)"
            )
        for (n, dtype, rank), (_, want_dtype, want_rank) in zip(got, want, strict=True):
            if dtype != want_dtype or rank not in (want_rank, -1):
                raise KilnError(
                    f"{path}: {n} is {dtype} of rank {rank}, but an fp32 optimum export has {want_dtype} of rank "
                    f"{want_rank}; diffkiln reads fp32 optimum exports only (re-export without --dtype fp16)"
                )
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": ""}  # not hashed: the folder is read on every run
        for p in sorted((folder / name).iterdir())
        if p.is_file()
    }
    return {
        "path": f"{name}/model.onnx",
        "files": files,
        "external_data": any(f != "model.onnx" and f != CONFIG for f in files),
        "contract": spec.to_json(),
    }


def fingerprint(folder: Path, components: list[str]) -> str:
    """A hash of every file's name, size and modification time: changes whenever a file does, costs no reads."""
    h = hashlib.sha256(b"diffkiln-optimum/1")
    roots = [INDEX, "scheduler", "tokenizer", "tokenizer_2", *components]
    for root in roots:
        top = folder / root
        if top.is_dir():
            check_tree(folder, top)  # no link out of the folder, before anything under it is looked at
        paths = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else []
        for p in paths:
            st = os.stat(p)
            h.update(f"{p.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "optimum:" + h.hexdigest()[:32]
