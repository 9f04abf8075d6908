"""`diffkiln run`: PNG out with its parameters, img2img, and one-line errors for bad input."""

import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from diffkiln.cli import main
from diffkiln.eval import adherence


def run(*args):
    return CliRunner().invoke(main, ["run", *[str(a) for a in args]])


def assert_error(result, fragment):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], result.output


def test_txt2img_writes_png_with_parameters(tiny_kiln, tmp_path):
    out = tmp_path / "x.png"
    result = run("a red circle", "-m", tiny_kiln, "--steps", 4, "--seed", 3, "--negative", "blurry", "-o", out)
    assert result.exit_code == 0, result.output
    for stage in ("text encoding", "unet total (4 steps)", "unet per step", "vae decode", "total", "it/s"):
        assert stage in result.output
    with Image.open(out) as img:
        assert img.size == (64, 64) and img.mode == "RGB"
        text = img.text["parameters"]
    assert text.startswith("a red circle\nNegative prompt: blurry\nSteps: 4, Sampler: euler, CFG scale: 7.5, Seed: 3")
    assert "Size: 64x64" in text


def test_batch_and_latents_file(tiny_kiln, tmp_path):
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 16), dtype=np.float32)
    np.save(tmp_path / "noise.npy", latents)
    args = ("a cat", "-m", tiny_kiln, "--steps", 3, "--scheduler", "ddim", "--width", 128, "--batch", 2)
    result = run(*args, "--latents", tmp_path / "noise.npy", "-o", tmp_path / "b.png")
    assert result.exit_code == 0, result.output
    first = np.asarray(Image.open(tmp_path / "b-0.png"))
    assert first.shape == (64, 128, 3) and (tmp_path / "b-1.png").is_file()
    again = run(*args, "--latents", tmp_path / "noise.npy", "--seed", 99, "-o", tmp_path / "c.png")
    assert again.exit_code == 0
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "c-0.png")))  # latents win over the seed


def test_img2img(tiny_kiln, tmp_path):
    Image.new("RGB", (70, 66), (200, 30, 30)).save(tmp_path / "init.png")
    out = tmp_path / "i.png"
    result = run("a cat", "-m", tiny_kiln, "--image", tmp_path / "init.png", "--strength", 0.5, "--steps", 6, "-o", out)
    assert result.exit_code == 0, result.output
    assert "unet total (3 steps)" in result.output and "vae encode" in result.output
    assert Image.open(out).size == (64, 64)  # rounded down to a multiple of 8


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--scheduler", "plms"), "unknown sampler 'plms'"),
        (("--height", 60), "--height 60 must be a multiple of 16 from 16 to 128 for this model"),
        (("--width", 72), "--width 72 must be a multiple of 16 from 16 to 128 for this model"),
        (("--height", 0), "--height 0 must be a multiple of 16"),
        (("--height", 100000), "--height 100000 must be a multiple of 16 from 16 to 128"),
        (("--guidance", "nan"), "--guidance nan must be a finite number"),
        (("--scheduler", "lcm", "--steps", 1000), "cannot schedule these steps: LCM: 1000 steps do not fit"),
        (("--image", "{tmp}/img.png", "--strength", 0.01, "--steps", 1), "leaves no steps out of 1"),
        (("-o", "{tmp}/x.gif"), "unknown image type '.gif'"),
        (("-o", "{tmp}/fifo.png"), "fifo.png exists and is not a regular file"),
        (("-o", "/dev/null"), "unknown image type ''"),
        (("--latents", "{tmp}/l.npz"), "is not a single .npy array (an .npz archive?)"),
        (("--latents", "{tmp}/huge.npy"), "is not a .npy array file"),
        (("--image", "{tmp}/notes.txt"), "is not an image Pillow can read"),
        (("--latents", "{tmp}/notes.txt"), "is not a .npy array file"),
        (("-o", "{tmp}/missing/x.png"), "folder {tmp}/missing does not exist"),
    ],
)
def test_bad_input(tiny_kiln, tmp_path, args, fragment):
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("RGB", (64, 64)).save(tmp_path / "img.png")
    os.mkfifo(tmp_path / "fifo.png")
    np.savez(tmp_path / "l.npz", x=np.zeros((1, 4, 8, 8), np.float32))
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 4, 8, 8), np.float32))
    with open(tmp_path / "huge.npy", "wb") as fh:  # a header claiming 4 PB of latents, and no data
        np.lib.format.write_array_header_1_0(fh, {**header, "shape": (1 << 20, 4, 1 << 15, 1 << 15)})
    args = [str(a).format(tmp=tmp_path) for a in args]
    out = ["-o", tmp_path / "x.png"] if "-o" not in args else []
    assert_error(run("a cat", "-m", tiny_kiln, "--steps", 2, *args, *out), fragment.format(tmp=tmp_path))
    assert not (tmp_path / "x.png").exists()


def test_nan_latents_are_refused_and_overflow_names_the_stage(tiny_kiln, tmp_path):
    np.save(tmp_path / "nan.npy", np.full((1, 4, 8, 8), np.nan, dtype=np.float32))
    result = run("a cat", "-m", tiny_kiln, "--latents", tmp_path / "nan.npy", "-o", tmp_path / "x.png")
    assert_error(result, "--latents holds NaN/Inf values")
    np.save(tmp_path / "big.npy", np.full((1, 4, 8, 8), 3e38, dtype=np.float32))
    result = run("a cat", "-m", tiny_kiln, "--latents", tmp_path / "big.npy", "-o", tmp_path / "x.png")
    assert_error(result, "unet step 1 produced NaN/Inf values: the graph overflows")


def test_kiln_dir_missing_a_component(tiny_kiln, tmp_path):
    import shutil

    broken = shutil.copytree(tiny_kiln, tmp_path / "k")
    shutil.rmtree(broken / "vae_decoder")
    assert_error(run("a cat", "-m", broken, "-o", tmp_path / "x.png"), "has no vae_decoder")


def test_default_model_is_the_demo_exported_into_the_cache_once(tmp_path, monkeypatch):
    """A fresh install: the first run exports the bundled demo model into the cache and draws the prompt."""
    monkeypatch.setenv("DIFFKILN_CACHE", str(tmp_path / "cache"))
    result = run("a red circle on a white background", "-o", tmp_path / "x.png")
    assert result.exit_code == 0, result.output
    assert "exporting demo into" in result.output
    [cached] = (tmp_path / "cache" / "kilns").iterdir()
    found = adherence.estimate(np.asarray(Image.open(tmp_path / "x.png").convert("RGB")))
    assert (found["color"], found["background"], found["shape"]) == ("red", "white", "circle")

    again = run("a photo", "--steps", 2, "-o", tmp_path / "y.png")
    assert again.exit_code == 0 and "exporting" not in again.output, again.output
    assert (tmp_path / "y.png").is_file()
    exported = CliRunner().invoke(main, ["export", "demo"])  # what `make install` runs: fills the same cache entry
    assert exported.exit_code == 0 and "exporting" not in exported.output
    assert exported.output.strip().endswith(str(cached))
    partial = CliRunner().invoke(main, ["export", "demo", "--components", "unet"])
    assert partial.exit_code == 2 and "need -o OUT" in partial.output
