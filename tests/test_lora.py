"""LoRA folding, refit payloads and textual-inversion embeddings, checked against diffusers' own LoRA loading.

Parity: the folded graphs in ONNX Runtime vs the diffusers pipeline after `load_lora_weights` + `fuse_lora`, on
the export's seeded sample inputs, rel err ≤ 1e-4 (and far from the unfolded model, so the LoRA really acts).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from lora_helpers import (
    feeds,
    make_lora,
    reference_pipeline,
    run_onnx,
    run_torch,
    save_diffusers,
    save_kohya,
)
from safetensors.numpy import save_file

from diffkiln import kiln
from diffkiln.errors import OutputError
from diffkiln.lora import (
    LoraError,
    apply_payload,
    expand_prompt,
    fold_loras,
    multi_vector_tokens,
    parse_embedding,
    parse_lora,
)
from diffkiln.lora.initializers import ComponentGraph
from diffkiln.lora.names import Resolver
from diffkiln.lora.refit import read_payload
from diffkiln.parity import diff
from diffkiln.specs import PipelineInfo, component_specs

MAX_REL_ERR = 1e-4


def quiet(_msg):
    pass


def read_initializer(kiln_dir: Path, key: str) -> np.ndarray:
    """A payload key `component/initializer` read from a kiln dir's graph."""
    component, initializer = key.split("/", 1)
    return ComponentGraph(kiln_dir / component).read(initializer)


def assert_parity(pipe, folded: Path, base: Path, components) -> None:
    """Folded graphs match the fused diffusers modules, and differ from the unfolded graphs."""
    info = PipelineInfo.from_json(kiln.read_manifest(base)["pipeline"])
    for component in components:
        inputs = feeds(base, component)
        names = component_specs(info)[component].output_names
        refs = run_torch(pipe, component, inputs, names)
        for ref, got, before in zip(
            refs, run_onnx(folded, component, inputs), run_onnx(base, component, inputs), strict=True
        ):
            for name in names:
                assert diff(got[name], ref[name]).rel <= MAX_REL_ERR, (component, name)
                if name != "hidden_states.0":  # the token + position embeddings: no LoRA touches them
                    assert diff(before[name], ref[name]).rel > 1e-2, f"{component}.{name}: the LoRA changed nothing"


def nothing_written(out: Path) -> bool:
    """No output and no staged temp dir left beside it."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


@pytest.fixture(scope="module")
def tiny_opt_kiln(tiny_kiln, tmp_path_factory):
    from diffkiln.optimizers.optimize import optimize

    out = tmp_path_factory.mktemp("lora-opt") / "tiny-ort"
    optimize(tiny_kiln, "ort-cpu", out=out, log=quiet)
    return out


# ---- parity with diffusers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "fmt", "targets"),
    [
        ("tiny", "kohya", "attn"),
        ("tiny", "diffusers", "attn+ff+conv+te"),
        ("tiny-sdxl", "kohya", "attn+ff+conv+te"),  # SGM block names, as kohya's SDXL trainer writes them
        ("tiny-sdxl", "diffusers", "attn+te"),
    ],
)
def test_folded_graphs_match_diffusers_fuse_lora(preset, fmt, targets, tiny_kiln, tiny_sdxl_kiln, tmp_path):
    base = tiny_kiln if preset == "tiny" else tiny_sdxl_kiln
    lora = make_lora(base, targets, seed=1, alpha=2.0 if fmt == "kohya" else None)
    path = tmp_path / "lora.safetensors"
    if fmt == "kohya":
        save_kohya(lora, path, sgm_layers_per_block=1 if preset == "tiny-sdxl" else None)
    else:
        save_diffusers(lora, path)
    out = tmp_path / "folded"
    report = fold_loras(base, [(path, 0.8)], out, log=quiet)
    assert report["loras"][0]["format"] == fmt
    assert sum(report["loras"][0]["modules"].values()) == len(lora)

    pipe = reference_pipeline(preset)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.8)
    touched = sorted({c for c, _ in lora})
    assert_parity(pipe, out, base, touched)
    manifest = kiln.read_manifest(out)
    assert manifest["lora"]["loras"][0]["scale"] == 0.8
    assert manifest["lora"]["loras"][0]["sha256"] == kiln.file_sha256(path)
    # untouched components are the base's files (hard links or copies), byte for byte
    assert kiln.file_sha256(out / "vae_decoder" / "model.onnx") == kiln.file_sha256(base / "vae_decoder" / "model.onnx")


def test_two_loras_in_one_pass_match_diffusers(tiny_kiln, tmp_path):
    a = save_kohya(make_lora(tiny_kiln, "attn+te", seed=2, alpha=1.0), tmp_path / "a.safetensors")
    b = save_diffusers(make_lora(tiny_kiln, "attn+ff+conv+te", seed=3), tmp_path / "b.safetensors")
    out = tmp_path / "folded"
    fold_loras(tiny_kiln, [(a, 0.7), (b, -0.4)], out, log=quiet)

    pipe = reference_pipeline("tiny")
    pipe.load_lora_weights(str(a), adapter_name="a")
    pipe.load_lora_weights(str(b), adapter_name="b")
    # per-adapter scales via set_adapters: sequential fuse_lora(lora_scale=…) calls leave the first scale on the
    # UNet's other adapters in diffusers 0.42 (b would be fused at 0.7 · -0.4)
    pipe.set_adapters(["a", "b"], [0.7, -0.4])
    pipe.fuse_lora(adapter_names=["a", "b"])
    assert_parity(pipe, out, tiny_kiln, ["unet", "text_encoder"])
    assert [r["file"] for r in kiln.read_manifest(out)["lora"]["loras"]] == ["a.safetensors", "b.safetensors"]


def test_optimized_kiln_folds_to_the_same_outputs(tiny_kiln, tiny_opt_kiln, tmp_path):
    path = save_diffusers(make_lora(tiny_kiln, "attn+ff+conv+te", seed=4), tmp_path / "l.safetensors")
    raw, opt = tmp_path / "raw", tmp_path / "opt"
    fold_loras(tiny_kiln, [(path, 1.0)], raw, log=quiet)
    fold_loras(tiny_opt_kiln, [(path, 1.0)], opt, log=quiet)
    assert (opt / "optimize_report.json").is_file()
    for component in ("unet", "text_encoder"):
        inputs = feeds(tiny_kiln, component)
        for a, b in zip(run_onnx(opt, component, inputs), run_onnx(raw, component, inputs), strict=True):
            assert all(diff(a[k], b[k]).rel <= MAX_REL_ERR for k in b), component


@pytest.mark.slow
def test_sd15_fold_matches_diffusers(sd15_kiln, tmp_path):
    """The real SD1.5 shapes, its UNet weights in external data; torch runs first and is freed before ONNX
    Runtime loads the 3.4 GB UNet, so the test stays within ~8 GB."""
    import gc

    lora = make_lora(sd15_kiln, "attn+te", seed=5, alpha=8.0)
    path = save_kohya(lora, tmp_path / "sd15.safetensors")
    out = tmp_path / "folded"
    report = fold_loras(sd15_kiln, [(path, 0.6)], out, log=quiet)
    assert report["components"]["unet"]["initializers"] == 128  # 16 transformer blocks × 8 attention projections
    assert report["components"]["text_encoder"]["initializers"] == 72  # 12 layers × (q, k, v, out, fc1, fc2)

    pipe = reference_pipeline("sd15")
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.6)
    info = PipelineInfo.from_json(kiln.read_manifest(sd15_kiln)["pipeline"])
    components = ("unet", "text_encoder")
    inputs = {c: feeds(sd15_kiln, c)[:1] for c in components}
    refs = {c: run_torch(pipe, c, inputs[c], component_specs(info)[c].output_names)[0] for c in components}
    del pipe
    gc.collect()
    for c in components:
        (got,) = run_onnx(out, c, inputs[c])
        assert all(diff(got[k], refs[c][k]).rel <= MAX_REL_ERR for k in refs[c]), c
        gc.collect()
        (before,) = run_onnx(sd15_kiln, c, inputs[c])
        touched = [k for k in refs[c] if k != "hidden_states.0"]  # the embeddings: no LoRA touches them
        assert all(diff(before[k], refs[c][k]).rel > 1e-3 for k in touched), c


def test_external_data_kilns_fold_like_embedded_ones(tiny_kiln, tmp_path):
    """>2 GB graphs keep weights in model.onnx.data: changed tensors are patched in a copy of the blob, a grown
    token table is appended to it, the base's files stay untouched, and the manifest hashes the new files."""
    import onnx

    from diffkiln.onnxio import consolidate_external_data

    ext = tmp_path / "ext"
    shutil.copytree(tiny_kiln, ext)
    for component in ("text_encoder", "unet"):
        path = ext / component / "model.onnx"
        onnx.save_model(onnx.load(path), path, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
        consolidate_external_data(path)
        files = {f.name: {"bytes": f.stat().st_size, "sha256": kiln.file_sha256(f)} for f in path.parent.iterdir()}
        manifest = json.loads((ext / kiln.MANIFEST).read_text())  # its recorded sizes are stale until rewritten
        manifest["components"][component]["files"] = files
        kiln.write_json(ext / kiln.MANIFEST, manifest)
    before = {p: kiln.file_sha256(p) for p in ext.rglob("*") if p.is_file()}
    lora = save_diffusers(make_lora(tiny_kiln, "attn+ff+conv+te", seed=14), tmp_path / "l.safetensors")
    emb = tmp_path / "many.safetensors"
    save_file({"<many>": np.random.default_rng(14).standard_normal((40, 32)).astype(np.float32)}, str(emb))
    for base, out in ((tiny_kiln, tmp_path / "a"), (ext, tmp_path / "b")):
        fold_loras(base, [(lora, 0.5)], out, embeddings=[(emb, None)], refit_payload=out.with_suffix(".st"), log=quiet)
    assert before == {p: kiln.file_sha256(p) for p in ext.rglob("*") if p.is_file()}  # the base is untouched
    assert _load(tmp_path / "a.st").keys() == _load(tmp_path / "b.st").keys()
    assert all(np.array_equal(v, _load(tmp_path / "b.st")[k]) for k, v in _load(tmp_path / "a.st").items())
    for component in ("text_encoder", "unet"):
        a, b = ComponentGraph(tmp_path / "a" / component), ComponentGraph(tmp_path / "b" / component)
        assert all(np.array_equal(a.read(n), b.read(n)) for n in a.tensors), component
        inputs = feeds(tiny_kiln, component)
        for x, y in zip(
            run_onnx(tmp_path / "a", component, inputs), run_onnx(tmp_path / "b", component, inputs), strict=True
        ):
            assert all(np.array_equal(x[k], y[k]) for k in x), component
    table = ComponentGraph(tmp_path / "b" / "text_encoder").shape("model.embeddings.token_embedding.weight")
    assert table == (1004, 32)  # grown: 40 new rows from id 964, appended to the blob
    for name, record in kiln.read_manifest(tmp_path / "b")["components"].items():
        for fname, meta in record["files"].items():
            assert kiln.file_sha256(tmp_path / "b" / name / fname) == meta["sha256"], (name, fname)


# ---- refit payloads ------------------------------------------------------------------------------------------


def test_refit_payloads_always_start_from_base_weights(tiny_kiln, tmp_path):
    a = save_kohya(make_lora(tiny_kiln, "attn", seed=6, alpha=2.0), tmp_path / "a.safetensors")
    b = save_diffusers(make_lora(tiny_kiln, "attn+ff+conv+te", seed=7), tmp_path / "b.safetensors")
    pa, pb = tmp_path / "a.refit.safetensors", tmp_path / "b.refit.safetensors"
    fold_loras(tiny_kiln, [(a, 0.9)], tmp_path / "folded-a", refit_payload=pa, log=quiet)
    report = fold_loras(tiny_kiln, [(b, 0.5)], None, refit_payload=pb, log=quiet)  # payload only: no kiln dir
    assert report["out"] is None and report["refit_payload"]["tensors"] > 32

    keys_a, keys_b = (set(read_payload(p)[1]["base_sha256"]) for p in (pa, pb))
    assert len(keys_a) == 32 and keys_a < keys_b  # B also changes weights A leaves alone
    base = {k: read_initializer(tiny_kiln, k) for k in keys_b}
    engine = dict(base)  # what a refittable engine built from the base kiln holds
    touched: set[str] = set()
    for payload in (pa, pb, pa):  # A → B → A, each refit computed against the base weights
        engine.update(apply_payload(base, payload, restore=touched))
        touched = set(read_payload(payload)[1]["base_sha256"])

    for key, value in engine.items():  # exactly A's bytes, and the base's where A is silent
        assert value.tobytes() == read_initializer(tmp_path / "folded-a", key).tobytes(), key
    with pytest.raises(LoraError, match="is not the base weight"):
        apply_payload(tmp_path / "folded-a", pb)  # a payload is never applied on top of another LoRA


# ---- textual inversion -------------------------------------------------------------------------------------------


def test_embeddings_add_tokens_and_rows_like_diffusers(tiny_kiln, tmp_path):
    from transformers import CLIPTokenizer

    from diffkiln.runtime.tokenizer import ClipTokenizer

    rng = np.random.default_rng(8)
    single = tmp_path / "sparkle.safetensors"  # A1111: emb_params, token = file name
    save_file({"emb_params": rng.standard_normal((1, 32)).astype(np.float32)}, str(single))
    multi = tmp_path / "multi.safetensors"  # diffusers: {token: [n, D]}; 40 vectors grow the 1000-row table
    save_file({"<mv>": rng.standard_normal((40, 32)).astype(np.float32)}, str(multi))
    out = tmp_path / "ti"
    report = fold_loras(tiny_kiln, [], out, embeddings=[(single, None), (multi, None)], log=quiet)
    placed = report["embeddings"][1]["components"]["text_encoder"]
    assert report["embeddings"][0]["components"]["text_encoder"] == {"tokens": ["sparkle"], "ids": [964]}
    assert placed["tokens"][:2] == ["<mv>", "<mv>_1"] and placed["ids"] == list(range(965, 1005))

    vectors_of = multi_vector_tokens(kiln.read_manifest(out))  # what the runtime needs to expand prompts
    assert vectors_of == {"sparkle": ["sparkle"], "<mv>": placed["tokens"]}
    prompt = expand_prompt("a sparkle cat, <mv> style", vectors_of)
    ours = ClipTokenizer.from_dir(out / "tokenizer").encode(prompt)
    theirs = CLIPTokenizer.from_pretrained(out / "tokenizer")(prompt, padding="max_length", max_length=77).input_ids
    assert ours[0].tolist() == theirs and 964 in theirs and 1004 in theirs

    table = ComponentGraph(out / "text_encoder").read("model.embeddings.token_embedding.weight")
    assert table.shape == (1005, 32)
    np.testing.assert_array_equal(table[964], _load(single)["emb_params"][0])
    np.testing.assert_array_equal(table[965:], _load(multi)["<mv>"])

    pipe = reference_pipeline("tiny")
    pipe.load_textual_inversion(str(single), token="sparkle")
    pipe.load_textual_inversion(str(multi))
    assert pipe.maybe_convert_prompt("a sparkle cat, <mv> style", pipe.tokenizer) == prompt
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="np").input_ids
    assert ids[0].tolist() == theirs
    inputs = [{"input_ids": ids.astype(np.int32)}]
    names = component_specs(PipelineInfo.from_json(kiln.read_manifest(out)["pipeline"]))["text_encoder"].output_names
    (ref,), (got,) = run_torch(pipe, "text_encoder", inputs, names), run_onnx(out, "text_encoder", inputs)
    assert all(diff(got[k], ref[k]).rel <= MAX_REL_ERR for k in names)


def test_sdxl_embedding_goes_to_both_encoders(tiny_sdxl_kiln, tmp_path):
    from safetensors.torch import load_file

    rng = np.random.default_rng(9)
    path = tmp_path / "xlstyle.safetensors"
    vectors = {"clip_l": rng.standard_normal((2, 32)), "clip_g": rng.standard_normal((2, 32))}
    save_file({k: v.astype(np.float32) for k, v in vectors.items()}, str(path))
    out = tmp_path / "ti"
    fold_loras(tiny_sdxl_kiln, [], out, embeddings=[(path, "xlstyle")], log=quiet)

    pipe = reference_pipeline("tiny-sdxl")
    state = load_file(str(path))
    pipe.load_textual_inversion(
        state["clip_l"], token="xlstyle", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        state["clip_g"], token="xlstyle", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    prompt = expand_prompt("xlstyle, a house", {"xlstyle": ["xlstyle", "xlstyle_1"]})
    info = PipelineInfo.from_json(kiln.read_manifest(out)["pipeline"])
    for component, tokenizer in (("text_encoder", pipe.tokenizer), ("text_encoder_2", pipe.tokenizer_2)):
        ids = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="np").input_ids.astype(np.int32)
        assert 964 in ids and 965 in ids
        names = component_specs(info)[component].output_names
        (ref,) = run_torch(pipe, component, [{"input_ids": ids}], names)
        (got,) = run_onnx(out, component, [{"input_ids": ids}])
        assert all(diff(got[k], ref[k]).rel <= MAX_REL_ERR for k in names), component


def test_runtime_generates_with_a_folded_kiln_and_new_token(tiny_kiln, tmp_path):
    from diffkiln.runtime.pipeline import GenerationParams, Pipeline

    lora = save_kohya(make_lora(tiny_kiln, "attn+te", seed=10, alpha=2.0), tmp_path / "l.safetensors")
    emb = tmp_path / "tok.safetensors"
    save_file({"emb_params": np.ones((1, 32), np.float32)}, str(emb))
    out = tmp_path / "folded"
    fold_loras(tiny_kiln, [(lora, 1.0)], out, embeddings=[(emb, None)], log=quiet)
    with Pipeline(out) as pipe:
        assert pipe.tokenizers[0].encode("a tok")[0, 2] == 964
        result = pipe(GenerationParams("a tok", steps=2, seed=1))
    assert np.isfinite(result.images).all()


def _load(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


# ---- names and formats -------------------------------------------------------------------------------------------


def test_kohya_names_resolve_against_the_weight_map_including_sgm_blocks():
    names = [
        "down_blocks.0.resnets.0.conv1.weight",
        "down_blocks.0.resnets.1.conv1.weight",
        "down_blocks.0.downsamplers.0.conv.weight",
        "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0.weight",
        "mid_block.resnets.1.time_emb_proj.weight",
        "mid_block.attentions.0.proj_in.weight",
        "up_blocks.0.attentions.2.transformer_blocks.1.ff.net.0.proj.weight",
        "up_blocks.0.upsamplers.0.conv.weight",
        "up_blocks.2.resnets.2.conv_shortcut.weight",
        "add_embedding.linear_2.weight",
        "conv_in.weight",
    ]
    resolver = Resolver(
        {"unet": {n: {} for n in names}, "text_encoder": {"text_model.encoder.layers.0.mlp.fc1.weight": {}}}
    )
    assert resolver.layers_per_block == 2
    cases = {
        "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn1_to_out_0": names[3],
        "lora_unet_input_blocks_2_0_in_layers_2": names[1],
        "lora_unet_input_blocks_3_0_op": names[2],
        "lora_unet_input_blocks_5_1_transformer_blocks_0_attn1_to_out_0": names[3],
        "lora_unet_middle_block_2_emb_layers_1": names[4],
        "lora_unet_middle_block_1_proj_in": names[5],
        "lora_unet_output_blocks_2_1_transformer_blocks_1_ff_net_0_proj": names[6],
        "lora_unet_output_blocks_2_2_conv": names[7],
        "lora_unet_output_blocks_8_0_skip_connection": names[8],
        "lora_unet_label_emb_0_2": names[9],
        "lora_unet_input_blocks_0_0": names[10],
        "lora_te_text_model_encoder_layers_0_mlp_fc1": "text_model.encoder.layers.0.mlp.fc1.weight",
    }
    for key, name in cases.items():
        assert resolver.kohya(key) == ("text_encoder" if "_te_" in key else "unet", name), key
    assert resolver.kohya("lora_unet_down_blocks_9_resnets_0_conv1") is None
    assert resolver.diffusers("text_encoder.encoder.layers.0.mlp.fc1") == ("text_encoder", cases[key])
    assert resolver.diffusers("unet.down_blocks.1.attentions.1.transformer_blocks.0.attn1.processor.to_out_lora") == (
        "unet",
        names[3],
    )


def test_bf16_and_fp16_loras_fold_like_fp32(tiny_kiln, tmp_path):
    import torch
    from safetensors.torch import save_file as save_torch

    lora = make_lora(tiny_kiln, "attn", seed=11, alpha=2.0)
    fp32 = save_kohya(lora, tmp_path / "f32.safetensors")
    tensors = _load(fp32)
    save_torch(
        {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tensors.items()}, str(tmp_path / "bf16.safetensors")
    )
    rounded = {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in tensors.items()}
    save_file(rounded, str(tmp_path / "rounded.safetensors"))
    fold_loras(tiny_kiln, [(tmp_path / "bf16.safetensors", 1.0)], tmp_path / "a", log=quiet)
    fold_loras(tiny_kiln, [(tmp_path / "rounded.safetensors", 1.0)], tmp_path / "b", log=quiet)
    assert kiln.file_sha256(tmp_path / "a/unet/model.onnx") == kiln.file_sha256(tmp_path / "b/unet/model.onnx")


# ---- bad input -----------------------------------------------------------------------------------------------------


def test_sdxl_lora_on_sd15_kiln_is_refused_or_folded_partially(tiny_kiln, tiny_sdxl_kiln, tmp_path):
    path = save_kohya(make_lora(tiny_sdxl_kiln, "attn+ff+conv+te", seed=12, alpha=1.0), tmp_path / "xl.safetensors", 1)
    out = tmp_path / "out"
    with pytest.raises(LoraError, match=r"xl\.safetensors: \d+ of 141 LoRA modules fit this sd1 kiln;.*text_encoder_2"):
        fold_loras(tiny_kiln, [(path, 1.0)], out, log=quiet)
    assert nothing_written(out)

    warnings = []
    report = fold_loras(tiny_kiln, [(path, 1.0)], out, allow_partial=True, log=warnings.append)
    assert any(w.startswith("warning: xl.safetensors") and "lora_te2_" in w for w in warnings)
    assert report["loras"][0]["skipped"] and (out / kiln.MANIFEST).is_file()


def test_not_a_safetensors_file(tiny_kiln, tmp_path):
    bad = tmp_path / "lora.safetensors"
    bad.write_bytes(b"PK\x03\x04 this is a zip (a .pt file renamed)")
    out = tmp_path / "out"
    with pytest.raises(LoraError, match=r"lora\.safetensors is not a safetensors file .*convert"):
        fold_loras(tiny_kiln, [(bad, 1.0)], out, log=quiet)
    assert nothing_written(out)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            "rank",
            r"1 do not fit their weight \(e\.g\. unet .*to_q.weight: rank mismatch, down has rank 4 but up has 3\)",
        ),
        ("shape", r"1 do not fit their weight \(e\.g\. unet .*to_q.weight: up \[32, 4\] · down \[4, 48\] does not fit"),
        ("unknown", r"1 name no weight of this kiln \(e\.g\. lora_unet_foo_bar\)"),
        ("unpaired", r"1 lack their down or up matrix"),
        ("loha", r"keys are not plain LoRA \(e\.g\. lora_unet_.*hada_w1_a \(LoHa\)\)"),
    ],
)
def test_damaged_loras_are_refused_with_counts(damage, message, tiny_kiln, tmp_path):
    path = save_kohya(make_lora(tiny_kiln, "attn", seed=13, alpha=2.0), tmp_path / "l.safetensors")
    tensors = _load(path)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    if damage == "rank":
        tensors[f"{key}.lora_up.weight"] = tensors[f"{key}.lora_up.weight"][:, :3].copy()
    elif damage == "shape":
        tensors[f"{key}.lora_down.weight"] = np.zeros((4, 48), np.float32)
    elif damage == "unknown":
        tensors |= {"lora_unet_foo_bar.lora_down.weight": np.zeros((4, 8), np.float32)}
        tensors |= {"lora_unet_foo_bar.lora_up.weight": np.zeros((8, 4), np.float32)}
    elif damage == "unpaired":
        del tensors[f"{key}.lora_up.weight"]
    else:
        tensors[f"{key}.hada_w1_a"] = np.zeros((4, 4), np.float32)
    save_file(tensors, str(path))
    out, payload = tmp_path / "out", tmp_path / "p.safetensors"
    with pytest.raises(LoraError, match=r"l\.safetensors: \d+ of \d+ LoRA modules fit this sd1 kiln; .*" + message):
        fold_loras(tiny_kiln, [(path, 1.0)], out, refit_payload=payload, log=quiet)
    assert nothing_written(out) and not list(tmp_path.glob("*p.safetensors*"))
    warnings = []
    report = fold_loras(tiny_kiln, [(path, 1.0)], out, allow_partial=True, log=warnings.append)
    assert len(report["loras"][0]["skipped"]) == 1 and warnings[0].startswith("warning: l.safetensors")


def test_a_file_matching_nothing_is_refused_even_when_partial_is_allowed(tiny_kiln, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.out.2.weight": np.zeros((4, 4), np.float32)}, str(path))
    with pytest.raises(LoraError, match=r"0 of 0 LoRA modules fit .*not plain LoRA.*nothing to fold"):
        fold_loras(tiny_kiln, [(path, 1.0)], tmp_path / "out", allow_partial=True, log=quiet)
    assert nothing_written(tmp_path / "out")


def test_bad_embeddings_and_outputs_are_refused(tiny_kiln, tmp_path):
    out = tmp_path / "out"
    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": np.zeros((1, 768), np.float32)}, str(wide))
    with pytest.raises(
        LoraError, match="768 wide but text_encoder embeds tokens in 32; it is an embedding for another"
    ):
        fold_loras(tiny_kiln, [], out, embeddings=[(wide, "x")], log=quiet)
    known = tmp_path / "cat.safetensors"
    save_file({"emb_params": np.zeros((1, 32), np.float32)}, str(known))
    with pytest.raises(LoraError, match="token 'a' is already in the tokenizer"):
        fold_loras(tiny_kiln, [], out, embeddings=[(known, "a")], log=quiet)
    xl = tmp_path / "xl.safetensors"
    save_file({"clip_l": np.zeros((1, 32), np.float32), "clip_g": np.zeros((1, 32), np.float32)}, str(xl))
    with pytest.raises(LoraError, match=r"is an SDXL embedding .* no text_encoder_2"):
        fold_loras(tiny_kiln, [], out, embeddings=[(xl, None)], log=quiet)
    assert nothing_written(out)
    with pytest.raises(OutputError, match="is or contains the input"):
        fold_loras(tiny_kiln, [], tiny_kiln, embeddings=[(known, None)], log=quiet)
    out.mkdir()
    (out / "keep.txt").write_text("x")
    for force in (False, True):  # a folder that is not a kiln dir is never replaced
        with pytest.raises(OutputError, match="is not a kiln directory; it holds 1 file"):
            fold_loras(tiny_kiln, [], out, embeddings=[(known, None)], force=force, log=quiet)
    assert (out / "keep.txt").is_file()


def test_disk_space_is_checked_for_the_rewritten_components_only(tiny_kiln, tmp_path, monkeypatch):
    """Unchanged components are hard links: a UNet-only LoRA needs room for the UNet, not the whole kiln."""
    import shutil
    from collections import namedtuple

    lora = make_lora(tiny_kiln, "attn", seed=1)
    path = save_kohya(lora, tmp_path / "unet.safetensors")
    need = kiln.components_bytes(tiny_kiln, ["unet"])
    assert need < kiln.components_bytes(tiny_kiln, kiln.read_manifest(tiny_kiln)["components"])
    usage = namedtuple("usage", "total used free")
    out = tmp_path / "out"
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(need * 10, need * 9, need - 1))
    with pytest.raises(OutputError, match="needs about"):
        fold_loras(tiny_kiln, [(path, 1.0)], out, log=quiet)
    assert nothing_written(out)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(need * 10, need * 9, need))
    assert set(fold_loras(tiny_kiln, [(path, 1.0)], out, log=quiet)["components"]) == {"unet"}


def test_a_full_disk_while_writing_a_refit_payload_is_one_line(tiny_kiln, tmp_path, monkeypatch):
    import errno

    from click.testing import CliRunner

    from diffkiln.cli import main
    from diffkiln.lora.refit import PayloadWriter

    def full(self, *_args):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(PayloadWriter, "write", full)
    lora = save_kohya(make_lora(tiny_kiln, "attn", seed=3), tmp_path / "a.safetensors")
    payload = tmp_path / "p.safetensors"
    result = CliRunner().invoke(main, ["lora", str(tiny_kiln), "--lora", str(lora), "--refit-payload", str(payload)])
    assert result.exit_code == 1
    error = result.output.splitlines()[-1]
    full_disk = "its disk is full; free some space or choose another output path (nothing was written)"
    assert error == f"Error: cannot write {payload}: {full_disk}"
    assert not list(tmp_path.glob("*p.safetensors*"))


def test_command_line_values(tmp_path):
    emb = tmp_path / "e.safetensors"
    emb.write_bytes(b"")
    assert parse_lora("a.safetensors:0.8") == (Path("a.safetensors"), 0.8)
    assert parse_lora("a.safetensors") == (Path("a.safetensors"), 1.0)
    assert parse_lora("a.safetensors:-1e-1") == (Path("a.safetensors"), -0.1)
    with pytest.raises(LoraError, match="'x' is not a scale"):
        parse_lora("a.safetensors:x")
    assert parse_embedding(f"{emb}:<tok>") == (emb, "<tok>")
    assert parse_embedding(str(emb)) == (emb, None)


def test_lora_modules_import_without_torch():
    code = (
        "import sys, diffkiln.lora, diffkiln.lora.fold, diffkiln.lora.embeddings, diffkiln.lora.refit\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_lora_and_optimize_with_lora(tiny_kiln, tmp_path):
    """`diffkiln lora` and `diffkiln optimize --lora` fold the same LoRA to the same weights."""
    from click.testing import CliRunner

    from diffkiln.cli import main

    lora = save_kohya(make_lora(tiny_kiln, "attn", seed=3), tmp_path / "a.safetensors")
    runner = CliRunner()
    plain = runner.invoke(main, ["lora", str(tiny_kiln), "--lora", f"{lora}:0.7", "-o", str(tmp_path / "k")])
    assert plain.exit_code == 0, plain.output
    assert "folded 1 LoRA(s), 0 embedding(s)" in plain.output
    optimized = runner.invoke(
        main,
        ["optimize", str(tmp_path / "k"), "--target", "ort-cpu", "-o", str(tmp_path / "ko")],
    )
    assert optimized.exit_code == 0, optimized.output
    folded_after = runner.invoke(
        main,
        ["optimize", str(tiny_kiln), "--target", "ort-cpu", "--lora", f"{lora}:0.7", "-o", str(tmp_path / "ok")],
    )
    assert folded_after.exit_code == 0, folded_after.output
    inputs = feeds(tiny_kiln, "unet")
    a = run_onnx(tmp_path / "ko", "unet", inputs)
    b = run_onnx(tmp_path / "ok", "unet", inputs)
    for x, y in zip(a, b, strict=True):
        assert diff(y["out_sample"], x["out_sample"]).rel <= 1e-5
    bad = runner.invoke(main, ["lora", str(tiny_kiln), "--lora", f"{lora}:abc", "-o", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "is not a scale" in bad.output and not (tmp_path / "x").exists()
    none = runner.invoke(main, ["lora", str(tiny_kiln), "--lora", str(lora)])
    assert none.exit_code != 0 and "give -o OUT, --refit-payload FILE, or both" in none.output
