import json

import numpy as np
import onnx
import pytest
import torch

from diffkiln import kiln
from diffkiln.errors import DiffkilnError, OutputError, ParityError
from diffkiln.exporter import ExportOptions, export, open_source
from diffkiln.exporter import kiln_export as export_module
from diffkiln.exporter.sources import MODULE_OF
from diffkiln.exporter.torch_weights import lora_weights
from diffkiln.exporter.wrappers import wrap
from diffkiln.onnxio import iter_initializers, load_graph
from diffkiln.parity import ort_session
from diffkiln.specs import PipelineInfo, component_specs, dims

COMPONENTS = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]


def quiet(_msg):
    pass


def test_tiny_kiln_layout(tiny_kiln):
    manifest = kiln.read_manifest(tiny_kiln)
    assert list(manifest["components"]) == COMPONENTS
    assert manifest["pipeline"]["kind"] == "sd1"
    assert manifest["source"] == {"kind": "preset", "ref": "tiny", "fingerprint": open_source("tiny").fingerprint()}
    assert manifest["source"]["fingerprint"] != open_source("tiny-sdxl").fingerprint()
    for name, record in manifest["components"].items():
        assert (tiny_kiln / record["path"]).is_file() and (tiny_kiln / name / "config.json").is_file()
        assert record["parity"]["worst_rel_err"] <= 1e-4
        assert len(record["parity"]["cases"]) == 2
        assert not record["weights_unmapped"], name
    assert (tiny_kiln / "tokenizer" / "vocab.json").is_file()
    scheduler = json.loads((tiny_kiln / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler"
    assert not list(tiny_kiln.parent.glob(".tiny.*"))  # no staging leftovers


def test_graph_io_follows_the_contract(tiny_kiln):
    info = PipelineInfo.from_json(kiln.read_manifest(tiny_kiln)["pipeline"])
    assert info.text_layers == (2,)  # the tiny CLIP's layers: hidden_states.0 … hidden_states.2
    specs = component_specs(info)
    for name in COMPONENTS:
        graph = load_graph(kiln.model_path(tiny_kiln, name)).graph
        assert [i.name for i in graph.input] == specs[name].input_names
        assert [o.name for o in graph.output] == specs[name].output_names

    def shape(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    unet = load_graph(kiln.model_path(tiny_kiln, "unet")).graph
    assert shape(unet.input[0]) == ["batch", 4, "height", "width"] == shape(unet.output[0])
    assert shape(unet.input[2]) == ["batch", "sequence", 32]
    text = load_graph(kiln.model_path(tiny_kiln, "text_encoder")).graph
    assert [o.name for o in text.output] == [
        "last_hidden_state",
        "pooler_output",
        "hidden_states.0",
        "hidden_states.1",
        "hidden_states.2",
        "penultimate_hidden_state",
    ]
    assert [shape(o) for o in text.output] == [["batch", 77, 32], ["batch", 32], *[["batch", 77, 32]] * 4]


@pytest.mark.parametrize("component", ["unet", "vae_decoder", "vae_encoder", "text_encoder"])
def test_dynamic_shapes(tiny_kiln, component):
    """Run the graph at a shape it was neither traced nor checked at: batch 3, latent 16×24, 3 prompt chunks."""
    source = open_source("tiny")
    info = PipelineInfo.from_json(kiln.read_manifest(tiny_kiln)["pipeline"])
    spec = component_specs(info)[component]
    feeds = spec.sample_inputs(dims(3, 16, 24, chunks=3), info, seed=7)
    model = wrap(component, source.load(MODULE_OF[component]))
    with torch.no_grad():
        ref = export_module._run_torch(model, spec, feeds)
    got = ort_session(kiln.model_path(tiny_kiln, component)).run(spec.output_names, feeds)
    for name, array in zip(spec.output_names, got, strict=True):
        assert array.shape == ref[name].shape
        np.testing.assert_allclose(array, ref[name], rtol=0, atol=1e-4 * np.abs(ref[name]).max())


@pytest.mark.parametrize("component", COMPONENTS)
def test_weight_map_holds_the_torch_values(tiny_kiln, component):
    source = open_source("tiny")
    model = wrap(component, source.load(MODULE_OF[component]))
    weights = lora_weights(model, component)
    mapping = json.loads((tiny_kiln / kiln.WEIGHT_MAP).read_text())[component]
    assert sorted(mapping) == sorted(weights)
    path = kiln.model_path(tiny_kiln, component)
    inits = dict(iter_initializers(load_graph(path), path.parent))
    for name, entry in mapping.items():
        expected = weights[name].detach().numpy()
        expected = expected.T if entry["transposed"] else expected
        np.testing.assert_array_equal(inits[entry["initializer"]], expected, err_msg=name)
    if component == "unet":
        assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight" in mapping
        assert any(e["transposed"] for e in mapping.values())  # Linear → MatMul with Wᵀ
    if component == "text_encoder":
        assert "text_model.embeddings.token_embedding.weight" in mapping


def test_tiny_sdxl_has_both_encoders_and_added_conditioning(tiny_sdxl_kiln):
    manifest = kiln.read_manifest(tiny_sdxl_kiln)
    assert list(manifest["components"]) == ["text_encoder", "text_encoder_2", *COMPONENTS[1:]]
    contracts = {n: c["contract"] for n, c in manifest["components"].items()}
    assert [t["name"] for t in contracts["unet"]["inputs"]] == [
        "sample",
        "timestep",
        "encoder_hidden_states",
        "text_embeds",
        "time_ids",
    ]
    assert contracts["unet"]["inputs"][2]["shape"] == ["batch", "sequence", 64]
    assert [t["name"] for t in contracts["text_encoder_2"]["outputs"]] == [
        "text_embeds",
        "last_hidden_state",
        "hidden_states.0",
        "hidden_states.1",
        "hidden_states.2",
        "penultimate_hidden_state",
    ]
    assert all(c["parity"]["worst_rel_err"] <= 1e-4 for c in manifest["components"].values())
    assert [p.name for p in sorted(tiny_sdxl_kiln.iterdir())] == [
        "manifest.json",
        "model_index.json",
        "scheduler",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "unet",
        "vae_decoder",
        "vae_encoder",
        "weight_map.json",
    ]


def test_export_from_a_diffusers_folder(tiny_folder, tmp_path):
    manifest = export(open_source(str(tiny_folder)), tmp_path / "k", ExportOptions(components=("unet",)), quiet)
    assert list(manifest["components"]) == ["unet"]
    assert manifest["source"]["kind"] == "folder"
    assert manifest["components"]["unet"]["parity"]["worst_rel_err"] <= 1e-4


def test_up_to_date_and_force(tmp_path):
    out, messages = tmp_path / "k", []
    options = ExportOptions(components=("vae_decoder",))
    export(open_source("tiny"), out, options, quiet)
    stamp = (out / kiln.MANIFEST).stat().st_mtime_ns
    export(open_source("tiny"), out, options, messages.append)
    assert messages == [f"{out} is up to date with tiny (use --force to re-export)"]
    assert (out / kiln.MANIFEST).stat().st_mtime_ns == stamp
    with pytest.raises(OutputError, match="already holds another kiln dir"):
        export(open_source("tiny"), out, ExportOptions(components=("vae_encoder",)), quiet)
    export(open_source("tiny"), out, ExportOptions(components=("vae_encoder",), force=True), quiet)
    assert list(kiln.read_manifest(out)["components"]) == ["vae_encoder"]
    assert not (out / "vae_decoder").exists()


def test_parity_failure_fails_hard_and_leaves_nothing(tmp_path, monkeypatch):
    real = export_module._run_torch

    def off_by_a_bit(model, spec, feeds):
        return {k: v * 1.01 for k, v in real(model, spec, feeds).items()}

    monkeypatch.setattr(export_module, "_run_torch", off_by_a_bit)
    with pytest.raises(ParityError, match=r"export parity failed for text_encoder\.last_hidden_state: rel err"):
        export(open_source("tiny"), tmp_path / "k", log=quiet)
    assert list(tmp_path.iterdir()) == []


def test_opset_is_recorded_and_validated(tmp_path):
    manifest = export(open_source("tiny"), tmp_path / "k", ExportOptions(("vae_decoder",), opset=18), quiet)
    assert manifest["opset"] == 18
    model = onnx.load(str(tmp_path / "k" / "vae_decoder" / "model.onnx"))
    assert model.opset_import[0].version == 18
    with pytest.raises(DiffkilnError, match="--opset 9 is not supported"):
        export(open_source("tiny"), tmp_path / "k2", ExportOptions(opset=9), quiet)


@pytest.mark.slow
def test_sd15_exports_with_parity(sd15_kiln):
    """The real SD1.5 architecture: 3.4 GB UNet (external data), parity at two shapes."""
    manifest = kiln.read_manifest(sd15_kiln)
    assert list(manifest["components"]) == COMPONENTS
    unet = manifest["components"]["unet"]
    assert unet["external_data"] and set(unet["files"]) == {"model.onnx", "model.onnx.data"}
    assert unet["weights_mapped"] == 282 and not unet["weights_unmapped"]  # every Linear and Conv2d of the UNet
    for record in manifest["components"].values():
        assert record["parity"]["worst_rel_err"] <= 1e-4
