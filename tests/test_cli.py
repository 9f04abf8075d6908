import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from diffkiln.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_export_then_inspect(tmp_path):
    out = tmp_path / "k"
    result = run("export", "tiny", "-o", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    shown = run("inspect", out)
    assert shown.exit_code == 0, shown.output
    for component in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert component in shown.output
    summary = json.loads(run("inspect", out, "--json").output)
    assert list(summary["components"]) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    unet = summary["components"]["unet"]
    assert unet["inputs"][0] == {"name": "sample", "dtype": "float32", "shape": ["batch", 4, "height", "width"]}
    assert (
        unet["ops"]["Conv"] > 10 and unet["ops"]["Softmax"] == 8
    )  # 4 transformer blocks (down, mid, 2 up) × self + cross
    assert all(c["parity_rel_err"] <= 1e-4 for c in summary["components"].values())


def test_components_option(tmp_path):
    result = run("export", "tiny", "-o", tmp_path / "k", "--components", "unet,vae_decoder")
    assert result.exit_code == 0, result.output
    summary = json.loads(run("inspect", tmp_path / "k", "--json").output)
    assert list(summary["components"]) == ["unet", "vae_decoder"]


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("stabilityai/sdxl-turbo", "looks like a Hugging Face hub id"),
        ("{tmp}/missing", "no such folder"),
        ("{tmp}", "has no model_index.json"),
    ],
)
def test_bad_sources(tmp_path, source, fragment):
    out = tmp_path / "out"
    result = run("export", source.format(tmp=tmp_path), "-o", out)
    assert_one_line_error(result, fragment)
    assert not out.exists()


def test_corrupt_weights(folder_copy, tmp_path):
    weights = folder_copy / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x00" * 64)
    result = run("export", folder_copy, "-o", tmp_path / "out")
    assert_one_line_error(result, "is not a valid safetensors file")
    assert not (tmp_path / "out").exists()


def test_unknown_component(tmp_path):
    result = run("export", "tiny", "-o", tmp_path / "out", "--components", "unet,refiner")
    assert_one_line_error(result, "unknown component refiner")


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_unwritable_output(tmp_path, where):
    if where == "under-a-file":
        (tmp_path / "file").write_text("x")
        out, fragment = tmp_path / "file" / "k", "does not exist"
    else:
        out, fragment = "/proc/diffkiln-out", "cannot write /proc/diffkiln-out"
    result = run("export", "tiny", "-o", out)
    assert_one_line_error(result, fragment)


def test_a_users_folder_is_never_replaced(tmp_path):
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "notes.txt").write_text("mine")
    for force in ([], ["--force"]):
        result = run("export", "tiny", "-o", tmp_path / "k", "--components", "vae_decoder", *force)
        assert_one_line_error(result, "k is not a kiln directory; it holds 1 file(s); choose an empty or new -o")
    assert (tmp_path / "k" / "notes.txt").read_text() == "mine"


def test_inspect_bad_dirs(tmp_path):
    assert_one_line_error(run("inspect", tmp_path / "nope"), "no such kiln directory")
    assert_one_line_error(run("inspect", tmp_path), "has no manifest.json")


def test_console_script_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "diffkiln.cli", "export", "org/model", "-o", str(tmp_path / "k")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("Error: 'org/model' looks like a Hugging Face hub id")
