"""Single-file checkpoints (A1111/ComfyUI *.safetensors in the LDM/SGM key layout): detected, converted by
diffusers, exported exactly like the preset they were written from; every bad file is one line, never a traceback.

The files are written here from the tiny presets with a diffusers → LDM key table (the inverse of diffusers'
converters: `test_key_table_inverts_diffusers` proves it on the tiny presets' values and, on the meta device, on the
real sd15, sd21 and sdxl layouts, whose detection keys diffusers itself recognises).
"""

import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from diffkiln import kiln
from diffkiln.cli import export as export_command
from diffkiln.cli import main
from diffkiln.errors import SourceError
from diffkiln.exporter import open_source
from diffkiln.exporter.presets import PRESETS
from diffkiln.exporter.single_file import ARCHS, SingleFileSource
from diffkiln.exporter.sources import PresetSource, save_as_folder
from diffkiln.parity import ort_session
from diffkiln.specs import component_specs, parity_dims

# ---- diffusers -> LDM/SGM keys (as diffusers' scripts/convert_diffusers_to_original_*.py, for any block count) ----
RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
UNET_TOP = [
    ("time_embedding.linear_1.", "time_embed.0."),
    ("time_embedding.linear_2.", "time_embed.2."),
    ("conv_in.", "input_blocks.0.0."),
    ("conv_norm_out.", "out.0."),
    ("conv_out.", "out.2."),
    ("add_embedding.linear_1.", "label_emb.0.0."),
    ("add_embedding.linear_2.", "label_emb.0.2."),
]
VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
OPEN_CLIP = [
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
]
OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def _replace_prefix(key: str, pairs) -> tuple[str, str] | None:
    return next(((new, key[len(old) :]) for old, new in pairs if key.startswith(old)), None)


def unet_to_ldm(state: dict, config: dict) -> dict:
    """A diffusers UNet's tensors under LDM names: input_blocks (resnet .0, attention .1, downsampler .0.op),
    middle_block.0-2, output_blocks (upsampler after the attention, or after the resnet)."""
    per, n = config["layers_per_block"] + 1, len(config["block_out_channels"])
    blocks = [
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    for i in range(n):
        for j in range(per - 1):
            blocks += [
                (f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{i * per + j + 1}.0."),
                (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{i * per + j + 1}.1."),
            ]
        blocks.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * per}.0.op."))
        for j in range(per):
            blocks += [
                (f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * per + j}.0."),
                (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * per + j}.1."),
            ]
        slot = 2 if "CrossAttn" in config["up_block_types"][i] else 1
        blocks.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * per + per - 1}.{slot}."))
    out = {}
    for key, value in state.items():
        new, rest = _replace_prefix(key, blocks + UNET_TOP)
        if "resnets" in key:
            rest = next((b + rest[len(a) :] for a, b in RESNET if rest.startswith(a + ".")), rest)
        out[f"model.diffusion_model.{new}{rest}"] = value
    return out


def vae_to_ldm(state: dict, config: dict) -> dict:
    """A diffusers VAE under LDM names: down.i.block.j / up.(n-1-i).block.j, mid.block_1/2, mid.attn_1 with
    1x1-conv q/k/v/proj_out weights."""
    n = len(config["block_out_channels"])
    blocks = []
    for i in range(n):
        blocks += [
            (f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
            (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
            (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."),
            (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."),
        ]
    for part in ("encoder", "decoder"):
        blocks += [
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."),
            (f"{part}.conv_norm_out.", f"{part}.norm_out."),
        ]
    out = {}
    for key, value in state.items():
        new, rest = _replace_prefix(key, blocks) or ("", key)
        if new.endswith("attn_1."):
            rest = next(b + rest[len(a) :] for a, b in VAE_ATTN if rest.startswith(a))
            value = value[:, :, None, None] if value.ndim == 2 else value
        out[f"first_stage_model.{new}{rest.replace('conv_shortcut', 'nin_shortcut')}"] = value
    return out


def clip_to_ldm(state: dict, prefix: str) -> dict:
    """CLIP-L (SD 1.x, SDXL's first encoder): transformers' own names under `prefix`, with `text_model.`."""
    return {prefix + (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items()}


def open_clip_to_ldm(state: dict, prefix: str) -> dict:
    """OpenCLIP (SD 2.x, SDXL's second encoder): resblocks with fused in_proj q/k/v, text_projection transposed."""
    state = {
        (k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v for k, v in state.items()
    }
    out = {}
    for key, value in state.items():
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key in OPEN_CLIP_TOP:
            out[prefix + OPEN_CLIP_TOP[key]] = value
        else:
            layer, rest = key.removeprefix("text_model.encoder.layers.").split(".", 1)
            base = f"{prefix}transformer.resblocks.{layer}."
            if rest.startswith("self_attn.q_proj."):
                qkv = [state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                out[base + "attn.in_proj_" + rest.rsplit(".", 1)[1]] = torch.cat(qkv)
            elif not rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                new, rest = _replace_prefix(rest, OPEN_CLIP) or ("", rest)
                out[base + new + rest] = value
    return out


TE_PREFIX = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}


def ldm_state(source) -> dict:
    """Every module of `source` in one single-file state dict."""
    unet, vae, te = (source.load(m) for m in ("unet", "vae", "text_encoder"))
    state = unet_to_ldm(unet.state_dict(), dict(unet.config)) | vae_to_ldm(vae.state_dict(), dict(vae.config))
    if source.info.kind == "sd2":
        state |= open_clip_to_ldm(te.state_dict(), "cond_stage_model.model.")
    else:
        state |= clip_to_ldm(te.state_dict(), TE_PREFIX[source.info.kind])
    if source.info.is_sdxl:
        state |= open_clip_to_ldm(source.load("text_encoder_2").state_dict(), "conditioner.embedders.1.model.")
    return state


class Trained(PresetSource):
    """A preset whose weights moved away from its seeded init (as training would), so a single file that
    silently kept the preset's init weights cannot pass for one that loaded the file."""

    def load(self, module):
        model = super().load(module)
        gen = torch.Generator().manual_seed(["text_encoder", "text_encoder_2", "unet", "vae"].index(module))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        return model


def write_single_file(preset: str, path, change=None):
    state = ldm_state(Trained(PRESETS[preset]))
    state = change(state) if change else state
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    return {p: write_single_file(p, root / f"{p}.safetensors") for p in ("tiny", "tiny-sdxl")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The same trained weights as diffusers folders."""
    root = tmp_path_factory.mktemp("folders")
    return {p: save_as_folder(Trained(PRESETS[p]), root / p) for p in ("tiny", "tiny-sdxl")}


# ---- the key table against diffusers ----


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_key_table_inverts_diffusers(preset):
    """diffusers' converters map the written keys back to every original tensor, value for value."""
    from diffusers.loaders import single_file_utils as sfu

    source = open_source(preset)
    state = ldm_state(source)
    for module in ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if source.info.is_sdxl else []):
        model = source.load(module)
        if module == "unet":
            back = sfu.convert_ldm_unet_checkpoint(state, dict(model.config))
        elif module == "vae":
            back = sfu.convert_ldm_vae_checkpoint(state, dict(model.config))
        elif module == "text_encoder_2":
            back = sfu.convert_open_clip_checkpoint(model, state, prefix="conditioner.embedders.1.model.")
        else:
            back = {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(state).items()}
        want = model.state_dict()
        assert back.keys() == want.keys(), module
        assert all(torch.equal(back[k], want[k]) for k in want), module


@pytest.mark.parametrize(
    ("preset", "model_type", "count"), [("sd15", "v1", 1130), ("sd21", "v2", 1214), ("sdxl", "xl_base", 2513)]
)
def test_key_table_writes_the_real_layouts(preset, model_type, count):
    """On the meta device, the real architectures' files have the keys (and key counts, less the position_ids
    buffer real files carry) of real checkpoints: diffusers' own detection names their model type."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    with torch.device("meta"):
        state = ldm_state(open_source(preset))
    assert len(state) == count
    assert infer_diffusers_model_type(state) == model_type


# ---- loading and exporting ----


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_single_file_has_the_weights_and_the_preset_configs(files, preset):
    source, trained, init = open_source(str(files[preset])), Trained(PRESETS[preset]), open_source(preset)
    assert (source.kind, source.preset.name, source.info) == ("single-file", preset, init.info)
    assert source.scheduler_config() == init.scheduler_config()
    for module in ["text_encoder", "unet", "vae"] + (["text_encoder_2"] if init.info.is_sdxl else []):
        got, want, seeded = (s.load(module).state_dict() for s in (source, trained, init))
        assert got.keys() == want.keys(), module
        assert all(torch.equal(got[k], want[k]) for k in want), module
        assert not any(torch.equal(got[k], seeded[k]) for k in want), module  # the file's, not the preset's init


def test_loads_as_diffusers_from_single_file_does(files, folders, monkeypatch):
    """diffusers' own from_single_file, given a local config folder and no network, reads the same weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = open_source(str(files["tiny"]))
    for module, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        theirs = cls.from_single_file(
            str(files["tiny"]), config=str(folders["tiny"]), subfolder=module, local_files_only=True
        )
        ours, theirs = source.load(module).state_dict(), theirs.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), module


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_single_file_export_equals_the_folder_export(files, folders, preset, tmp_path):
    """`diffkiln export model.safetensors -o OUT` writes a kiln whose graphs give the outputs of the kiln exported
    from a diffusers folder holding the same weights."""
    kilns = {"file": tmp_path / "from-file", "folder": tmp_path / "from-folder"}
    for kind, src in (("file", files[preset]), ("folder", folders[preset])):
        result = CliRunner().invoke(main, ["export", str(src), "-o", str(kilns[kind])])
        assert result.exit_code == 0, result.output
    manifest = kiln.read_manifest(kilns["file"])
    assert manifest["source"]["kind"] == "single-file" and manifest["source"]["ref"] == str(files[preset])
    assert manifest["tokenizers"] == kiln.read_manifest(kilns["folder"])["tokenizers"]
    info = open_source(preset).info
    for name, spec in component_specs(info).items():
        feeds = spec.sample_inputs(parity_dims(info)[1], info, seed=3)
        ours, theirs = (ort_session(kiln.model_path(k, name)).run(spec.output_names, feeds) for k in kilns.values())
        for a, b in zip(ours, theirs, strict=True):
            assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(b).max()), name


def test_fingerprint_follows_the_file_and_the_arch(files, tmp_path):
    a = open_source(str(files["tiny"])).fingerprint()
    assert a.startswith("single-file:") and a == open_source(str(files["tiny"]), "sd15").fingerprint()  # the default
    changed = write_single_file("tiny", tmp_path / "b.safetensors", lambda s: {**s, "extra": torch.zeros(1)})
    assert open_source(str(changed)).fingerprint() != a


def test_cli_arch_choices_are_the_exporters():
    option = next(p for p in export_command.params if p.name == "arch")
    assert list(option.type.choices) == list(ARCHS)


# ---- bad files: one line each ----


def _drop(prefix):
    return lambda s: {k: v for k, v in s.items() if not k.startswith(prefix)}


def _as_sd2(state):
    """The tiny file with its CLIP-L text encoder rewritten in SD 2.x's OpenCLIP layout."""
    te = {k.removeprefix("cond_stage_model.transformer."): v for k, v in state.items() if "cond_stage_model" in k}
    return _drop("cond_stage_model.")(state) | open_clip_to_ldm(te, "cond_stage_model.model.")


def _widen_conv_in(state):
    key = "model.diffusion_model.input_blocks.0.0.weight"
    return {**state, key: torch.zeros(32, 9, 3, 3)}  # an inpainting UNet's 9 input channels


@pytest.mark.parametrize(
    ("change", "arch", "message"),
    [
        (_drop("first_stage_model."), None, "is not a Stable Diffusion single-file checkpoint .* has no VAE"),
        (_drop("model.diffusion_model."), None, "has no UNet"),
        (_drop("cond_stage_model."), None, "has no text encoder"),
        (None, "sdxl", r"is a Stable Diffusion 1\.x checkpoint, not sdxl: drop --arch or pass --arch sd15"),
        (None, "sd21-v", r"is a Stable Diffusion 1\.x checkpoint, not sd21-v"),
        (_as_sd2, None, "do not say whether it predicts noise .* pass --arch sd21 or --arch sd21-v"),
        (_as_sd2, "sd21", r"does not match the sd21 architecture: its unet lacks"),
        (_as_sd2, "sd15", r"is a Stable Diffusion 2\.x checkpoint, not sd15"),
        (_widen_conv_in, None, r"unet conv_in\.weight is \[32, 9, 3, 3\] in the file, \[32, 4, 3, 3\] in tiny"),
        (lambda s: {**s, "v_pred": torch.zeros(0)}, None, "marked v-prediction"),
        (lambda s: {**_as_sd2(s), "v_pred": torch.zeros(0)}, None, "does not match the sd21-v architecture"),
        (None, "sd14", "unknown --arch sd14"),
    ],
)
def test_bad_checkpoints_are_one_line(change, arch, message, tmp_path):
    path = write_single_file("tiny", tmp_path / "model.safetensors", change)
    with pytest.raises(SourceError, match=message) as err:
        open_source(str(path), arch)
    assert "\n" not in str(err.value)


def test_unknown_layouts_and_broken_files(files, tiny_folder, tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(lora))
    diffusers_unet = tmp_path / "unet.safetensors"
    diffusers_unet.write_bytes((tiny_folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(files["tiny"].read_bytes()[:100_000])
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    cases = [(lora, "not a Stable Diffusion single-file"), (diffusers_unet, "has no UNet, no VAE, no text encoder")]
    cases += [(truncated, "is not a valid safetensors file"), (empty, "is not a valid safetensors file")]
    for path, message in cases:
        with pytest.raises(SourceError, match=message) as err:
            open_source(str(path))
        assert "\n" not in str(err.value), path


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickles_are_refused_unopened(suffix, tmp_path):
    """A pickle that would run code when loaded is refused by its name, and the code never runs."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps(Payload()))
    result = CliRunner().invoke(main, ["export", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "is a pickle checkpoint" in result.output and "convert it to .safetensors" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_cli_errors(files, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(main, ["export", str(files["tiny"]), "--arch", "sdxl", "-o", str(tmp_path / "out")])
    assert bad.exit_code == 1 and bad.output.startswith("Error: ") and len(bad.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    not_a_file = runner.invoke(main, ["export", "tiny", "--arch", "sd15", "-o", str(tmp_path / "out")])
    assert not_a_file.exit_code == 1 and "--arch is for single-file checkpoints" in not_a_file.output
    no_out = runner.invoke(main, ["export", str(files["tiny"]), "--arch", "sd15"])
    assert no_out.exit_code == 2 and "need -o OUT" in no_out.output


def test_single_file_source_is_the_file(files):
    source = open_source(str(files["tiny"]))
    assert isinstance(source, SingleFileSource) and source.path == files["tiny"].resolve()
