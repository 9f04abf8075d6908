"""Single-file checkpoints beyond `export -o`: `run -m model.safetensors` (exported into the cache once, with an
optional arch), and the bench's reference, subject and FLOP count over one.

The files are written by test_single_file's key table from the tiny presets with trained (moved) weights.
"""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_single_file import Trained, _as_sd2, write_single_file

from diffkiln import kiln
from diffkiln.bench import subject
from diffkiln.bench.flops import count_pipeline_flops
from diffkiln.bench.torch_ref import build_pipeline, pipeline_from_modules, source_tokenizers
from diffkiln.cli import main
from diffkiln.errors import SourceError
from diffkiln.exporter import open_source
from diffkiln.exporter.presets import CLIP_VOCAB_DIR, PRESETS, TOKENIZER_DIR
from diffkiln.exporter.sources import PresetSource, save_as_folder
from diffkiln.models import export_to_cache, resolve_model
from diffkiln.runtime.tokenizer import ClipTokenizer

PROMPTS = ["a red circle", "two small blue squares on a pink background, highly detailed"]


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return write_single_file("tiny", tmp_path_factory.mktemp("single") / "tiny.safetensors")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFKILN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "kilns"


def _run(model, out):
    args = ["run", "a red circle", "-m", str(model), "--steps", "3", "--seed", "5", "-o", str(out)]
    return CliRunner().invoke(main, args)


def test_run_m_single_file_exports_into_the_cache_once(tiny_file, cache, tmp_path):
    """`run -m FILE` exports the file into the cache once and draws what the same weights as a folder draw."""
    first = _run(tiny_file, tmp_path / "a.png")
    assert first.exit_code == 0, first.output
    assert f"exporting {tiny_file}" in first.output
    [cached] = cache.iterdir()
    assert cached.name.startswith("tiny.safetensors-")
    source = kiln.read_manifest(cached)["source"]
    assert (source["kind"], source["ref"]) == ("single-file", str(tiny_file.resolve()))

    again = _run(tiny_file, tmp_path / "b.png")
    assert again.exit_code == 0 and "exporting" not in again.output, again.output
    assert list(cache.iterdir()) == [cached]
    image = np.asarray(Image.open(tmp_path / "a.png"), dtype=np.int16)
    assert np.array_equal(image, np.asarray(Image.open(tmp_path / "b.png"), dtype=np.int16))

    folder = save_as_folder(Trained(PRESETS["tiny"]), tmp_path / "folder")  # the file's weights, as a folder
    assert _run(folder, tmp_path / "folder.png").exit_code == 0
    assert np.abs(image - np.asarray(Image.open(tmp_path / "folder.png"), dtype=np.int16)).max() <= 1
    assert _run("tiny", tmp_path / "init.png").exit_code == 0  # the preset's seeded init draws something else
    assert np.abs(image - np.asarray(Image.open(tmp_path / "init.png"), dtype=np.int16)).max() > 8


def test_export_to_cache_takes_the_arch(tiny_file, cache):
    detected = export_to_cache(str(tiny_file), log=lambda _msg: None)
    assert export_to_cache(str(tiny_file), log=lambda _msg: None, arch="sd15") == detected  # sd15 is what it is
    assert resolve_model(str(tiny_file), log=lambda _msg: None, arch="sd15") == detected
    assert resolve_model(str(detected)) == detected  # a kiln dir is itself
    with pytest.raises(SourceError, match=r"is a Stable Diffusion 1\.x checkpoint, not sdxl"):
        resolve_model(str(tiny_file), arch="sdxl")
    assert list(cache.iterdir()) == [detected]


def test_sd2_file_without_arch_says_to_export_it_first(tmp_path, cache):
    path = write_single_file("tiny", tmp_path / "sd2.safetensors", _as_sd2)
    result = _run(path, tmp_path / "x.png")
    assert result.exit_code == 1, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"Error: {path} is a Stable Diffusion 2.x checkpoint")
    assert f"export it with `diffkiln export {path} --arch sd21 -o DIR` (or --arch sd21-v), then run -m DIR" in line
    with pytest.raises(SourceError, match="does not match the sd21 architecture"):  # the arch reaches the source
        export_to_cache(str(path), arch="sd21")
    assert not cache.exists()


def test_bench_reference_subject_and_flops_read_the_file(tiny_file, cache, tmp_path):
    kiln_dir = resolve_model(str(tiny_file), log=lambda _msg: None)
    pipe = build_pipeline(str(tiny_file), "ddim")
    trained = Trained(PRESETS["tiny"]).load("unet").state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in pipe.unet.state_dict().items())
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(np.asarray(ids), ClipTokenizer.from_dir(kiln_dir / "tokenizer").encode(PROMPTS))
    assert len(pipe.tokenizer) == ClipTokenizer.from_dir(TOKENIZER_DIR).backend.get_vocab_size() < 1000

    found = subject.resolve(str(kiln_dir))
    assert (found.source_ref, found.source_problem, found.kiln_dir) == (str(tiny_file.resolve()), None, kiln_dir)
    gone = {"kind": "single-file", "ref": str(tmp_path / "gone.safetensors")}
    assert subject._source_of(gone) == (
        None,
        f"the kiln directory's source {gone['ref']!r} (single-file) is not available here",
    )

    counts = count_pipeline_flops(str(tiny_file), 64, 64, 1, cfg=True)
    assert counts == count_pipeline_flops("tiny", 64, 64, 1, cfg=True)
    assert counts["per_call"]["unet"] > 0 and counts["unet_rows"] == 2


@pytest.mark.parametrize(("preset", "pads"), [("sd15", [49407]), ("sd21", [0]), ("sdxl", [49407, 0])])
def test_reference_tokenizers_are_the_kilns(preset, pads, tmp_path):
    """The bench/LoRA references tokenize as the runtime does over the tokenizers the source writes into a kiln:
    the real CLIP vocabulary, "!" (id 0) padding for sd21 and SDXL's tokenizer_2. Only tokenizers are built."""
    source = open_source(preset)
    names = source.copy_tokenizers(tmp_path)
    tokenizers = source_tokenizers(source)
    assert list(tokenizers) == names == ["tokenizer", "tokenizer_2"][: len(pads)]
    for name, pad in zip(names, pads, strict=True):
        runtime = ClipTokenizer.from_dir(tmp_path / name)
        assert runtime.pad_id == pad and runtime.backend.get_vocab_size() == 49408
        ours = tokenizers[name](PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
        np.testing.assert_array_equal(np.asarray(ours), runtime.encode(PROMPTS))
        assert ours[0][:5] == [49406, 320, 736, 7117, 49407] and ours[0][5] == pad
    assert (CLIP_VOCAB_DIR / "vocab.json").read_bytes() == (tmp_path / "tokenizer" / "vocab.json").read_bytes()


class TinyModules(PresetSource):
    """The sdxl preset's configs and tokenizers with tiny-sdxl's modules: a pipeline with SDXL's real tokenizers,
    built in seconds."""

    def load(self, module):
        return PresetSource(PRESETS["tiny-sdxl"]).load(module)


def test_reference_pipeline_has_both_sdxl_tokenizers():
    pipe = pipeline_from_modules(TinyModules(PRESETS["sdxl"]))
    assert (len(pipe.tokenizer), pipe.tokenizer.pad_token_id) == (49408, 49407)
    assert (len(pipe.tokenizer_2), pipe.tokenizer_2.pad_token, pipe.tokenizer_2.pad_token_id) == (49408, "!", 0)
    ids = pipe.tokenizer_2(PROMPTS[0], padding="max_length", max_length=77).input_ids
    assert ids[:6] == [49406, 320, 736, 7117, 49407, 0] and ids[-1] == 0
