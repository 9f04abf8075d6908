"""Hostile inputs: crafted kiln dirs, lying manifests, poisoned LoRAs, outputs that must not be touched.

Every case runs the real CLI and asserts exit ≠ 0, exactly one `Error: …` line (no traceback), and that no file
outside the output changed (the whole test folder is hashed before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from diffkiln import kiln
from diffkiln.cli import main
from diffkiln.exporter.sources import FolderSource


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root (and the target of every link), by relative path."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(result, fragment: str) -> None:
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()  # progress lines may come first; the error is one line, last
    errors = [line for line in lines if line.startswith("Error: ")]
    assert errors == lines[-1:] and "Traceback" not in result.output, result.output
    assert fragment in lines[-1], lines[-1]


@pytest.fixture
def crafted(tiny_kiln, tmp_path):
    """A private copy of the tiny kiln dir to damage, a LoRA for it, and a bystander file outside."""
    from lora_helpers import make_lora, save_kohya

    k = shutil.copytree(tiny_kiln, tmp_path / "kiln")
    (tmp_path / "secret.txt").write_text("the user's own file")
    lora = save_kohya(make_lora(tiny_kiln, "attn", seed=3), tmp_path / "lora.safetensors")
    return k, lora


def edit_manifest(k: Path, fn) -> None:
    manifest = json.loads((k / kiln.MANIFEST).read_text())
    fn(manifest)
    (k / kiln.MANIFEST).write_text(json.dumps(manifest))


def external_unet(k: Path, location: str) -> None:
    """Point one UNet initializer's external data at `location` (what a crafted download would do)."""
    path = k / "unet" / "model.onnx"
    model = onnx.load(path)
    t = next(t for t in model.graph.initializer if t.dims and np.prod(t.dims) >= 16)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(4 * int(np.prod(t.dims))))):
        t.external_data.add(key=key, value=value)
    onnx.save(model, path)
    size = path.stat().st_size
    if (k / kiln.MANIFEST).exists():  # an optimum folder has no manifest to keep consistent
        edit_manifest(k, lambda m: m["components"]["unet"]["files"]["model.onnx"].update(bytes=size))


@pytest.mark.parametrize("location", ["../../secret.txt", "/etc/hostname", "{tmp}/secret.txt"])
def test_external_data_outside_the_component_is_refused(crafted, tmp_path, location):
    k, lora = crafted
    (tmp_path / "secret.txt").write_bytes(b"\0" * (1 << 20))
    external_unet(k, location.format(tmp=tmp_path))
    before = tree(tmp_path)
    for args in (
        ("lora", k, "--lora", lora, "-o", tmp_path / "out"),
        ("lora", k, "--lora", lora, "--refit-payload", tmp_path / "p.safetensors"),
        ("optimize", k, "--target", "ort-cpu", "-o", tmp_path / "out"),
        ("run", "a cat", "-m", k, "--steps", 1, "-o", tmp_path / "x.png"),
        ("inspect", k),
    ):
        refused(run(*args), "external data location")
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda m: m.update(tokenizers=["../x"]), "points outside"),
        (lambda m: m.update(tokenizers=["/etc"]), "points outside"),
        (lambda m: m.update(scheduler="/etc/hostname"), "points outside"),
        (lambda m: m.update(scheduler="../../secret.txt"), "points outside"),
        (lambda m: m["components"]["unet"].update(path="/etc/hostname"), "points outside"),
        (lambda m: m["components"]["unet"].update(path="vae_decoder/model.onnx"), "not a file in unet/"),
        (lambda m: m["components"].update(refiner={"path": "x", "files": {}}), "unknown component 'refiner'"),
        (lambda m: m["pipeline"].update(latent_channels="4"), "pipeline.latent_channels is '4', not a int"),
        (lambda m: m["pipeline"].update(latent_channels=10**9), "pipeline.latent_channels is 1000000000, outside"),
        (lambda m: m["pipeline"].update(sample_size=-8), "pipeline.sample_size is -8, outside"),
        (lambda m: m["pipeline"].update(scaling_factor=float("nan")), "pipeline.scaling_factor"),
        (lambda m: m["pipeline"].update(kind="sd9"), "pipeline.kind is 'sd9'"),
        (lambda m: m.pop("pipeline"), "pipeline is missing or not an object"),
        (lambda m: m["components"]["unet"]["files"]["model.onnx"].update(bytes=7), "the manifest says 7"),
    ],
)
def test_lying_manifests_are_refused_by_every_command(crafted, tmp_path, edit, fragment):
    k, lora = crafted
    edit_manifest(k, edit)
    before = tree(tmp_path)
    for args in (
        ("run", "a cat", "-m", k, "--steps", 1, "-o", tmp_path / "x.png"),
        ("optimize", k, "--target", "ort-cpu", "-o", tmp_path / "out"),
        ("lora", k, "--lora", lora, "-o", tmp_path / "out"),
        ("inspect", k),
    ):
        refused(run(*args), fragment)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("content", [b"[]", b"{}", b"\xff\xfe\x00garbage", b'{"format_version": "1"}', b"null"])
def test_garbage_manifests(crafted, tmp_path, content):
    k, _ = crafted
    (k / kiln.MANIFEST).write_bytes(content)
    before = tree(tmp_path)
    refused(run("run", "a cat", "-m", k, "-o", tmp_path / "x.png"), str(k / kiln.MANIFEST))
    refused(run("inspect", k), str(k / kiln.MANIFEST))
    assert tree(tmp_path) == before


def test_symlinks_out_of_the_kiln_are_refused(crafted, tmp_path):
    k, lora = crafted
    merges = k / "tokenizer" / "merges.txt"
    merges.unlink()
    merges.symlink_to(tmp_path / "secret.txt")
    before = tree(tmp_path)
    refused(run("optimize", k, "--target", "ort-cpu", "-o", tmp_path / "out"), "outside")
    refused(run("lora", k, "--lora", lora, "-o", tmp_path / "out"), "outside")
    refused(run("run", "a cat", "-m", k, "-o", tmp_path / "x.png"), "outside")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("damage", ["truncated", "random", "swapped", "empty"])
def test_damaged_graphs_are_one_line_errors(crafted, tmp_path, damage):
    k, _ = crafted
    path = k / "unet" / "model.onnx"
    data = path.read_bytes()
    new = {
        "truncated": data[: len(data) // 2],
        "random": np.random.default_rng(0).bytes(len(data)),
        "swapped": (k / "vae_decoder" / "model.onnx").read_bytes(),
        "empty": b"",
    }[damage]
    path.write_bytes(new)
    edit_manifest(k, lambda m: m["components"]["unet"]["files"]["model.onnx"].update(bytes=len(new)))
    before = tree(tmp_path)
    fragment = "is not the unet graph" if damage == "swapped" else "unet"
    refused(run("run", "a cat", "-m", k, "--steps", 1, "-o", tmp_path / "x.png"), fragment)
    refused(run("optimize", k, "--target", "ort-cpu"), "unet")
    assert tree(tmp_path) == before
    assert not (k / "optimized").exists()  # no empty KILN/optimized/ left behind


def poisoned(tmp_path: Path, tiny_kiln, kind: str) -> Path:
    from lora_helpers import make_lora, save_kohya
    from safetensors.numpy import load_file

    path = save_kohya(make_lora(tiny_kiln, "attn", seed=5), tmp_path / f"{kind}.safetensors")
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("lora_down.weight"))
    if kind == "nan":
        tensors[key][0, 0] = np.nan
    elif kind == "inf-alpha":
        tensors[key.replace("lora_down.weight", "alpha")] = np.array(np.inf, np.float32)
    elif kind == "empty":
        tensors = {}
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [("nan", "holds NaN/Inf values"), ("inf-alpha", "holds NaN/Inf values"), ("empty", "holds no tensors")],
)
def test_poisoned_loras_are_refused(tiny_kiln, tmp_path, kind, fragment):
    lora = poisoned(tmp_path, tiny_kiln, kind)
    before = tree(tmp_path)
    refused(run("lora", tiny_kiln, "--lora", lora, "-o", tmp_path / "out"), fragment)
    assert tree(tmp_path) == before and not (tmp_path / "out").exists()


def test_nan_embedding_is_refused(tiny_kiln, tmp_path):
    emb = tmp_path / "e.safetensors"
    save_file({"<e>": np.full((1, 32), np.nan, np.float32)}, str(emb))
    before = tree(tmp_path)
    refused(run("lora", tiny_kiln, "--embedding", emb, "-o", tmp_path / "out"), "holds NaN/Inf values")
    assert tree(tmp_path) == before


def test_force_never_replaces_a_users_folder_or_the_source(folder_copy, tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = tree(tmp_path)
    refused(run("export", "tiny", "-o", mine, "--force"), "is not a kiln directory; it holds 1 file(s)")
    refused(run("export", folder_copy, "-o", folder_copy, "--force"), "is or contains the input")
    refused(run("export", folder_copy, "-o", folder_copy.parent, "--force"), "is or contains the input")
    refused(run("export", folder_copy, "-o", folder_copy / "unet" / "k"), "lies inside the input")
    monkeypatch.chdir(mine)
    refused(run("export", "tiny", "-o", ".", "--force"), "is (or holds) the current folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    refused(run("export", "tiny", "-o", ".", "--force"), "is (or holds) the current folder")
    assert tree(tmp_path) == before


def test_device_and_special_outputs_are_never_replaced(tiny_kiln, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "secret.png")
    refused(run("run", "a cat", "-m", tiny_kiln, "--steps", 1, "-o", fifo), "is not a regular file")
    refused(run("run", "a cat", "-m", tiny_kiln, "--steps", 1, "-o", link), "is not a regular file")
    refused(run("run", "a cat", "-m", tiny_kiln, "--steps", 1, "-o", "/dev/null"), "unknown image type")
    assert fifo.is_fifo() and link.is_symlink() and not (tmp_path / "secret.png").exists()


@pytest.mark.parametrize("suffix", [".jpg", ".webp", ".png"])
def test_the_extension_names_the_format(tiny_kiln, tmp_path, suffix):
    from PIL import Image

    out = tmp_path / f"x{suffix}"
    assert run("run", "a cat", "-m", tiny_kiln, "--steps", 1, "-o", out).exit_code == 0
    assert Image.open(out).format == {".jpg": "JPEG", ".webp": "WEBP", ".png": "PNG"}[suffix]


def test_a_second_writer_of_the_same_output_fails_clearly(tmp_path):
    out = tmp_path / "k"
    with kiln.StageWriter(out, "export", {"x": 1}, log=lambda m: None):
        refused(run("export", "tiny", "-o", out, "--components", "vae_decoder"), "is being written by another")
    assert not out.exists() and not list(tmp_path.iterdir())  # no lock file, no staging folder left


def test_a_killed_export_is_swept_on_the_next_write(tmp_path):
    out = tmp_path / "k"
    cmd = [sys.executable, "-m", "diffkiln.cli", "export", "tiny", "-o", str(out)]
    for sig in (signal.SIGKILL, signal.SIGTERM):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not any(p.name.endswith(".tmp") for p in tmp_path.glob(".k.*")) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(sig)
        proc.wait(60)
        left = [p for p in tmp_path.glob(".k.*") if p.name.endswith(".tmp")]
        if sig == signal.SIGTERM:
            assert proc.returncode != 0 and left == [], proc.stderr.read()  # handled like Ctrl-C: cleaned up
        else:
            assert len(left) == 1  # SIGKILL cannot be handled: the staging folder stays until the next write
            messages = []
            with kiln.StageWriter(out, "export", {"x": 1}, log=messages.append):
                pass
            assert messages == [
                f"removed {left[0]}, left behind by a diffkiln process that was killed while writing {out}"
            ]
            assert not left[0].exists()
    assert not out.exists()


def test_folder_fingerprints_are_length_framed(tmp_path):
    """Two folders whose path‖content streams are equal once concatenated must not share a cache key."""
    a, b = tmp_path / "a", tmp_path / "b"
    for root, files in ((a, {"x": b"1y2", "y": b""}), (b, {"x": b"1", "y2": b""})):
        root.mkdir()
        for name, data in files.items():
            (root / name).write_bytes(data)

    class Bare(FolderSource):
        def __init__(self, path):
            self.path = path

    fa, fb = Bare(a).fingerprint(), Bare(b).fingerprint()
    assert fa != fb and len(fa.split(":")[1]) == 64


def test_bad_tokenizer_files(folder_copy, tmp_path, crafted):
    (folder_copy / "tokenizer" / "tokenizer_config.json").write_text("{not json")
    refused(run("export", folder_copy, "-o", tmp_path / "out"), "tokenizer_config.json is not valid JSON")
    k, _ = crafted
    merges = k / "tokenizer" / "merges.txt"
    lines = merges.read_text().splitlines()
    merges.write_text("\n".join([lines[0], "zzqq xxyy", *lines[1:]]) + "\n")
    size = merges.stat().st_size
    refused(run("run", "a cat", "-m", k, "-o", tmp_path / "x.png"), "a merge names a token missing from the vocab")
    assert size == merges.stat().st_size


def test_bad_prompts_and_images(tiny_kiln, tmp_path):
    from PIL import Image

    refused(run("run", "caf\udce9", "-m", tiny_kiln, "-o", tmp_path / "x.png"), "is not valid UTF-8 text")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 megapixels in a few kB
    refused(run("run", "a cat", "-m", tiny_kiln, "--image", bomb, "-o", tmp_path / "x.png"), str(bomb))
    assert not (tmp_path / "x.png").exists()


# --- optimum folders (no manifest.json: read from model_index.json, configs and graphs) --------------------------


@pytest.fixture
def optimum_crafted(tiny_kiln, tmp_path):
    """The tiny kiln written out as an optimum folder (tools/make_optimum_fixture.py) to damage, a LoRA for it,
    and a bystander file outside."""
    import importlib.util

    from lora_helpers import make_lora, save_kohya

    spec = importlib.util.spec_from_file_location(
        "fixture", Path(__file__).parents[1] / "tools/make_optimum_fixture.py"
    )
    fixture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixture)
    folder = fixture.convert(tiny_kiln, tmp_path / "optimum")
    (tmp_path / "secret.txt").write_text('{"hidden_size": 32}')
    lora = save_kohya(make_lora(tiny_kiln, "attn", seed=3), tmp_path / "lora.safetensors")
    return folder, lora


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _retype(folder: Path, component: str, name: str, elem_type: int) -> None:
    path = folder / component / "model.onnx"
    model = onnx.load(path)
    next(v for v in [*model.graph.input, *model.graph.output] if v.name == name).type.tensor_type.elem_type = elem_type
    onnx.save(model, path)


def _rename_output(folder: Path, component: str, old: str, new: str) -> None:
    path = folder / component / "model.onnx"
    model = onnx.load(path)
    next(o for o in model.graph.output if o.name == old).name = new
    onnx.save(model, path)


def _link_out(folder: Path, rel: str) -> None:
    (folder / rel).unlink()
    (folder / rel).symlink_to(folder.parent / "secret.txt")


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda f: (f / "model_index.json").write_text("{not json"), "model_index.json is not readable JSON"),
        (lambda f: (f / "model_index.json").write_text("[1]"), "is a JSON list, not an object"),
        (
            lambda f: _edit_json(f / "model_index.json", lambda d: d.update(_class_name="FluxPipeline")),
            "'FluxPipeline'",
        ),
        (lambda f: (f / "unet" / "config.json").unlink(), "has no unet/config.json"),
        (lambda f: (f / "text_encoder" / "model.onnx").unlink(), "has no text_encoder/model.onnx"),
        (lambda f: shutil.rmtree(f / "tokenizer"), "has no tokenizer/ folder"),
        (lambda f: _edit_json(f / "text_encoder/config.json", lambda d: d.update(hidden_size="32")), "hidden_size"),
        (lambda f: _edit_json(f / "unet/config.json", lambda d: d.update(sample_size=10**9)), "pipeline.sample_size"),
        (lambda f: _link_out(f, "text_encoder/config.json"), "points outside"),
        (lambda f: _link_out(f, "tokenizer/merges.txt"), "outside"),
        (lambda f: _retype(f, "unet", "timestep", onnx.TensorProto.FLOAT16), "fp32 optimum exports only"),
        (lambda f: _rename_output(f, "text_encoder", "pooler_output", "pooled"), "not an optimum export"),
        (lambda f: (f / "unet" / "model.onnx").write_bytes(b"\x0a\xff\xff"), "not a valid ONNX file"),
        (lambda f: external_unet(f, "../../secret.txt"), "external data location"),
    ],
)
def test_crafted_optimum_folders_are_refused(optimum_crafted, tmp_path, damage, fragment):
    folder, lora = optimum_crafted
    damage(folder)
    before = tree(tmp_path)
    for args in (
        ("optimize", folder, "--target", "ort-cpu", "-o", tmp_path / "out"),
        ("lora", folder, "--lora", lora, "-o", tmp_path / "out"),
        ("inspect", folder),
    ):
        refused(run(*args), fragment)
    assert tree(tmp_path) == before


def test_force_never_replaces_an_optimum_folder(optimum_crafted, tmp_path):
    """An optimum folder reads as a kiln dir, but it is the user's: no stage replaces it, even with --force."""
    folder, lora = optimum_crafted
    other = shutil.copytree(folder, tmp_path / "other")
    before = tree(tmp_path)
    fragment = "is not a kiln directory; it holds"
    refused(run("export", "tiny", "-o", other, "--force", "--components", "vae_decoder"), fragment)
    refused(run("lora", folder, "--lora", lora, "-o", other, "--force"), fragment)
    refused(run("optimize", folder, "--target", "ort-cpu", "-o", other, "--force"), fragment)
    refused(run("optimize", folder, "--target", "ort-cpu", "-o", folder, "--force"), "is or contains the input")
    assert tree(tmp_path) == before
