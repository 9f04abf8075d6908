"""The C++ runtime (cpp/): diffkiln-cpp gives `diffkiln run --backend openvino`'s image, the C++ CLIP tokenizer
gives the Python ClipTokenizer's ids, and bad input is one `Error:` line and exit 1.

The build (cmake + the OpenVINO wheel's CMake config, into cpp/build) runs once per session, as `make cpp` does;
the tests skip, naming what is missing, only where cmake or a C++ compiler is absent.
"""

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from diffkiln.cli import main
from diffkiln.runtime.tokenizer import ClipTokenizer

ROOT = Path(__file__).parents[1]
BUILD = ROOT / "cpp" / "build"
CLIP_VOCAB = ROOT / "diffkiln" / "exporter" / "assets" / "clip_vocab"
MIN_PSNR = 40.0

# punctuation, numbers, contractions, special-token text, unicode (NFC, case, CJK, emoji, whitespace kinds), long
PROMPTS = [
    "a photo of a cat",
    "",
    "   ",
    "A RED Circle, on a white   background!!",
    "it's ''s x'S don't I'LL we'd",
    "<|startoftext|>hi<|endoftext|> there",
    "<|STARTOFTEXT|> <|endoftext",
    "3.14159 and 2024-12-07, 1,000,000 x2 4k",
    "café cafe\u0301 naïve Ångström",
    "ⅷ ² ½ 一二三 日本語のテキスト",
    "İstanbul ΣΑΣ straße ǅ ﬁ",
    "emoji 😀🎉 👍🏽 ❤️",
    "tabs\tand\nnewlines\u00a0nbsp\u3000ideographic\u2003em",
    "zero\u200bwidth \u180e mongolian \x1c sep \x85 nel",
    "한국어 \u1100\u1161\u11a8",
    "a\u0323\u0307 q\u0307\u0323 \u1e0b\u0323",
    "#hashtag @user $100 50% a&b <html> [x] {y} (z) ~t~ `q` \\ / |",
    "masterpiece, best quality, (detailed:1.2), [blurry], 8k uhd",
    "long " + "word " * 100,
    "a " * 75,  # exactly 75 tokens: one window
    "a " * 76,  # 76: two windows
]


def _tool(name: str) -> str | None:
    return shutil.which(name)


@pytest.fixture(scope="session")
def cpp_build() -> Path:
    """cpp/build with diffkiln-cpp and diffkiln-tokenize, built once per session (under a lock)."""
    missing = [n for n in ("cmake",) if not _tool(n)] + ([] if (_tool("g++") or _tool("c++")) else ["g++"])
    if missing:
        pytest.skip(f"the C++ runtime needs {' and '.join(missing)} (apt-get install cmake g++), not found on PATH")
    import openvino

    ov_cmake = Path(openvino.__file__).parent / "cmake"
    BUILD.mkdir(parents=True, exist_ok=True)
    with open(BUILD.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        steps = [
            ["cmake", "-S", str(ROOT / "cpp"), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=Release",
             f"-DOpenVINO_DIR={ov_cmake}"],
            ["cmake", "--build", str(BUILD), "-j2"],
        ]  # fmt: skip
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return BUILD


def _psnr(a: Path, b: Path) -> float:
    x = np.asarray(Image.open(a), dtype=np.float64)
    y = np.asarray(Image.open(b), dtype=np.float64)
    assert x.shape == y.shape
    mse = ((x - y) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def _cpp(build: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(build / "diffkiln-cpp"), *map(str, args)], capture_output=True, text=True, check=False, timeout=300
    )


@pytest.fixture(scope="session")
def precision_kilns(demo_kiln, tmp_path_factory):
    """The demo kiln as fp32, and optimized to fp16 and int8 (standard ONNX: casts, Q/DQ) for OpenVINO."""
    root = tmp_path_factory.mktemp("precision")
    kilns = {"fp32": demo_kiln}
    for precision in ("fp16", "int8"):
        out = root / precision
        args = ["optimize", str(demo_kiln), "--target", "tensorrt", "--precision", precision, "--calib-prompts", "2"]
        args += ["-o", str(out)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        kilns[precision] = out
    return kilns


@pytest.mark.parametrize("vocab", ["clip", "demo"])
def test_tokenizer_matches_python(cpp_build, demo_kiln, tmp_path, vocab):
    folder = CLIP_VOCAB if vocab == "clip" else demo_kiln / "tokenizer"
    got = _cpp_tokens(cpp_build, folder, PROMPTS, tmp_path)
    tok = ClipTokenizer.from_dir(folder)
    for prompt, row in zip(PROMPTS, got, strict=True):
        assert row["tokens"] == tok.tokenize(prompt)[0], prompt
        assert row["encode"] == tok.encode(prompt)[0].tolist(), prompt
        assert row["chunks"] == tok.n_chunks(prompt), prompt
    assert len(got[PROMPTS.index("long " + "word " * 100)]["encode"]) == 77  # truncated to one window
    assert got[-1]["chunks"] == 2 and got[-2]["chunks"] == 1


@pytest.mark.parametrize(
    ("precision", "sampler", "prompt"),
    [
        ("fp32", "euler", "a red circle on a white background"),
        ("fp32", "ddim", "a large yellow triangle on a blue background"),
        ("fp32", "euler", "a small green square, " + "very " * 80 + "on a black background"),  # two windows
        ("fp16", "euler", "a cyan diamond on a purple background"),
        ("int8", "ddim", "a blue triangle on a yellow background"),
    ],
)
def test_cpp_matches_diffkiln_run(cpp_build, precision_kilns, tmp_path, precision, sampler, prompt):
    kiln = precision_kilns[precision]
    latents = np.random.default_rng(7).standard_normal((1, 4, 8, 8), dtype=np.float32)
    np.save(tmp_path / "noise.npy", latents)
    common = ["--steps", 12, "--guidance", 6.0, "--negative", "blurry", "--latents", tmp_path / "noise.npy"]
    cpp = _cpp(cpp_build, prompt, "-m", kiln, "--sampler", sampler, *common, "--show-tokens", "-o", tmp_path / "c.png")
    assert cpp.returncode == 0, cpp.stderr
    args = [
        "run",
        prompt,
        "-m",
        kiln,
        "--scheduler",
        sampler,
        *common,
        "--backend",
        "openvino",
        "-o",
        tmp_path / "p.png",
    ]
    py = CliRunner().invoke(main, [str(a) for a in args])
    assert py.exit_code == 0, py.output

    psnr = _psnr(tmp_path / "c.png", tmp_path / "p.png")
    assert psnr >= MIN_PSNR, f"{precision} {sampler}: diffkiln-cpp vs diffkiln run {psnr:.1f} dB"
    # the same tokens: [uncond windows; cond windows], as the Python pipeline feeds the text encoder
    tok = ClipTokenizer.from_dir(kiln / "tokenizer")
    cond, uncond = tok.encode_pair([prompt], ["blurry"])
    want = np.concatenate([uncond[0], cond[0]]).tolist()
    shown = [
        [int(t) for t in line.split()[1:]] for line in cpp.stdout.splitlines() if line.strip().startswith("tokens")
    ]
    assert shown == want
    with Image.open(tmp_path / "c.png") as img:
        assert img.size == (64, 64) and img.mode == "RGB"
        assert img.text["parameters"].startswith(prompt)
    assert "unet per step" in cpp.stdout and "peak RSS" in cpp.stdout


@pytest.mark.parametrize(("negative", "prompt"), [("", "a red circle"), ("blurry", "a blue square, " + "very " * 80)])
def test_sdxl_matches_diffkiln_run(cpp_build, tiny_sdxl_kiln, tmp_path, negative, prompt):
    """SDXL: both encoders' penultimate states, pooled text_embeds, time_ids, zeros for an empty negative prompt."""
    np.save(tmp_path / "noise.npy", np.random.default_rng(5).standard_normal((1, 4, 8, 8), dtype=np.float32))
    common = [prompt, "-m", tiny_sdxl_kiln, "--negative", negative, "--steps", 5, "--latents", tmp_path / "noise.npy"]
    cpp = _cpp(cpp_build, *common, "--show-tokens", "-o", tmp_path / "c.png")
    assert cpp.returncode == 0, cpp.stderr
    py = CliRunner().invoke(main, ["run", *map(str, common), "--backend", "openvino", "-o", str(tmp_path / "p.png")])
    assert py.exit_code == 0, py.output
    assert _psnr(tmp_path / "c.png", tmp_path / "p.png") >= MIN_PSNR
    tokenizers = [ClipTokenizer.from_dir(tiny_sdxl_kiln / t) for t in ("tokenizer", "tokenizer_2")]
    windows = max(t.n_chunks([prompt, negative]) for t in tokenizers)
    assert windows == (1 if negative == "" else 4)
    shown = [line for line in cpp.stdout.splitlines() if line.strip().startswith("tokens")]
    assert len(shown) == 2 * 2 * windows  # per encoder: [uncond; cond] × windows


@pytest.mark.parametrize(
    ("sampler", "config"),
    [
        ("ddim", {"prediction_type": "v_prediction"}),
        ("euler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
        ("euler", {"timestep_spacing": "linspace", "beta_schedule": "linear"}),
        ("ddim", {"timestep_spacing": "trailing", "set_alpha_to_one": True}),
        ("euler", {"prediction_type": "sample", "steps_offset": 0}),
    ],
)
def test_scheduler_configs_match(cpp_build, demo_kiln, tmp_path, sampler, config):
    """The C++ schedules follow the kiln's scheduler config as runtime/schedulers.py does (spacing, betas, what the
    UNet predicts): the demo kiln with its config rewritten, both runtimes on the same latents."""
    kiln = shutil.copytree(demo_kiln, tmp_path / "kiln")
    path = kiln / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    np.save(tmp_path / "noise.npy", np.random.default_rng(11).standard_normal((1, 4, 8, 8), dtype=np.float32))
    common = ["a white circle on a red background", "-m", kiln, "--steps", 7, "--latents", tmp_path / "noise.npy"]
    cpp = _cpp(cpp_build, *common, "--sampler", sampler, "-o", tmp_path / "c.png")
    assert cpp.returncode == 0, cpp.stderr
    args = ["run", *map(str, common), "--scheduler", sampler, "--backend", "openvino", "-o", str(tmp_path / "p.png")]
    py = CliRunner().invoke(main, args)
    assert py.exit_code == 0, py.output
    assert _psnr(tmp_path / "c.png", tmp_path / "p.png") >= MIN_PSNR


def test_textual_inversion_tokens(cpp_build, demo_kiln, tmp_path):
    """Embeddings folded in by `diffkiln lora`: their added (normalized) tokens and the multi-vector expansion give
    the Python runtime's ids and image."""
    from safetensors.numpy import save_file

    from diffkiln.lora import fold_loras
    from diffkiln.runtime.prompts import expand_prompt, multi_vector_tokens

    rng = np.random.default_rng(3)
    save_file({"emb_params": rng.standard_normal((1, 96)).astype(np.float32)}, str(tmp_path / "sparkle.safetensors"))
    save_file({"<mv>": rng.standard_normal((3, 96)).astype(np.float32)}, str(tmp_path / "multi.safetensors"))
    kiln = tmp_path / "ti"
    embeddings = [(tmp_path / "sparkle.safetensors", None), (tmp_path / "multi.safetensors", None)]
    fold_loras(demo_kiln, [], kiln, embeddings=embeddings, log=lambda _m: None)

    prompt = "a Sparkle circle, <MV> style on a white background <mv>"
    tokens = [*_cpp_tokens(cpp_build, kiln / "tokenizer", [prompt, "sparkles <mv>_1"], tmp_path)]
    tok = ClipTokenizer.from_dir(kiln / "tokenizer")
    multi = multi_vector_tokens(json.loads((kiln / "manifest.json").read_text()))
    assert tokens[1]["tokens"] == tok.tokenize("sparkles <mv>_1")[0]
    assert tokens[0]["tokens"] == tok.tokenize(prompt)[0]  # normalized tokens: "Sparkle" is "sparkle"

    np.save(tmp_path / "noise.npy", rng.standard_normal((1, 4, 8, 8), dtype=np.float32))
    common = [prompt, "-m", kiln, "--steps", 6, "--latents", tmp_path / "noise.npy"]
    cpp = _cpp(cpp_build, *common, "--show-tokens", "-o", tmp_path / "c.png")
    assert cpp.returncode == 0, cpp.stderr
    cond = tok.encode(expand_prompt(prompt, multi))[0].tolist()  # <mv> → <mv> <mv>_1 <mv>_2
    assert cpp.stdout.splitlines()[1].split()[1:] == [str(t) for t in cond]
    py = CliRunner().invoke(main, ["run", *map(str, common), "--backend", "openvino", "-o", str(tmp_path / "p.png")])
    assert py.exit_code == 0, py.output
    assert _psnr(tmp_path / "c.png", tmp_path / "p.png") >= MIN_PSNR


def _cpp_tokens(build: Path, folder: Path, prompts: list[str], tmp_path: Path) -> list[dict]:
    (tmp_path / "prompts.json").write_text(json.dumps(prompts), encoding="utf-8")
    done = subprocess.run(
        [str(build / "diffkiln-tokenize"), str(folder), str(tmp_path / "prompts.json")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _damaged(demo_kiln: Path, tmp_path: Path, edit) -> Path:
    kiln = tmp_path / "kiln"
    shutil.copytree(demo_kiln, kiln)
    manifest = json.loads((kiln / "manifest.json").read_text())
    text = edit(manifest, kiln)
    (kiln / "manifest.json").write_text(text if isinstance(text, str) else json.dumps(manifest))
    return kiln


def _outside(m, kiln):
    m["components"]["unet"]["path"] = "../../../../etc/passwd"


def _symlink(m, kiln):
    os.symlink("/etc/passwd", kiln / "tokenizer" / "evil.json")


def _tokenizers_out(m, kiln):
    m["tokenizers"] = ["/etc"]


def _truncated(m, kiln):
    m["components"]["vae_decoder"]["files"]["model.onnx"]["bytes"] += 1


def _kind(m, kiln):
    m["pipeline"]["kind"] = "sd9"


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda m, k: "{not json", "is not valid JSON"),
        (lambda m, k: "[]", "the manifest is not an object"),
        (_outside, "points outside"),
        (_symlink, "is a link outside"),
        (_tokenizers_out, "points outside"),
        (_truncated, "is not the size the manifest records"),
        (_kind, "pipeline.kind is unknown"),
    ],
)
def test_bad_kiln_is_one_line_error(cpp_build, demo_kiln, tmp_path, edit, fragment):
    kiln = _damaged(demo_kiln, tmp_path, edit)
    done = _cpp(cpp_build, "a cat", "-m", kiln, "--steps", 2, "-o", tmp_path / "x.png")
    _assert_error(done, fragment)
    assert not (tmp_path / "x.png").exists()


def test_external_data_outside_the_kiln_is_refused(cpp_build, demo_kiln, tmp_path):
    """A graph whose weights name a file outside its folder is refused from the protobuf bytes, before OpenVINO
    (which would follow the location) opens it."""
    import onnx
    from onnx import TensorProto, helper

    kiln = shutil.copytree(demo_kiln, tmp_path / "kiln")
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../../../../etc/passwd")
    graph = helper.make_graph(
        [helper.make_node("Add", ["latent_sample", "w"], ["sample"])],
        "evil",
        [helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, None)],
        [weight],
    )
    onnx.save_model(helper.make_model(graph), kiln / "vae_decoder" / "model.onnx")
    manifest = json.loads((kiln / "manifest.json").read_text())
    size = (kiln / "vae_decoder" / "model.onnx").stat().st_size
    manifest["components"]["vae_decoder"]["files"]["model.onnx"]["bytes"] = size  # the size check passes
    (kiln / "manifest.json").write_text(json.dumps(manifest))
    done = _cpp(cpp_build, "a cat", "-m", kiln, "--steps", 2, "-o", tmp_path / "x.png")
    _assert_error(done, "vae_decoder/model.onnx: external data location points outside")


def test_truncated_manifests_never_crash(cpp_build, demo_kiln, tmp_path):
    """Every cut of manifest.json (a partial download) is one `Error:` line and exit 1, never a crash."""
    kiln = shutil.copytree(demo_kiln, tmp_path / "kiln")
    text = (demo_kiln / "manifest.json").read_bytes()
    for cut in np.linspace(0, len(text) - 2, 24).astype(int):
        (kiln / "manifest.json").write_bytes(text[:cut])
        _assert_error(_cpp(cpp_build, "a cat", "-m", kiln, "--steps", 2, "-o", tmp_path / "x.png"), "manifest.json")
    assert not (tmp_path / "x.png").exists()


def test_bad_arguments_are_one_line_errors(cpp_build, demo_kiln, tmp_path):
    np.save(tmp_path / "wrong.npy", np.zeros((1, 4, 16, 16), np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((1, 4, 8, 8), np.int32))
    np.save(tmp_path / "nan.npy", np.full((1, 4, 8, 8), np.nan, np.float32))
    np.savez(tmp_path / "l.npz", x=np.zeros(3))
    (tmp_path / "notes.txt").write_text("hello")
    with open(tmp_path / "huge.npy", "wb") as fh:  # a header claiming petabytes, and no data
        fh.write(
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4, 100000000, 10000000), }"
        )
    cases = [
        (("--latents", tmp_path / "wrong.npy"), "--latents has shape [1, 4, 16, 16], expected [1, 4, 8, 8]"),
        (("--latents", tmp_path / "ints.npy"), "--latents must hold a float array"),
        (("--latents", tmp_path / "nan.npy"), "--latents holds NaN/Inf values"),
        (("--latents", tmp_path / "l.npz"), "is not a single .npy array (an .npz archive?)"),
        (("--latents", tmp_path / "notes.txt"), "is not a .npy array file"),
        (("--latents", tmp_path / "huge.npy"), "is not a .npy array file"),
        (("--latents", tmp_path / "missing.npy"), "no such file"),
        (("--height", 60), "--height 60 must be a multiple of 32 from 32 to 128"),
        (("--sampler", "plms"), "unknown sampler 'plms'"),
        (("--steps", 0), "--steps 0 must be in 1..1000"),
        (("--guidance", "nan"), "--guidance nan is not a finite number"),
        (("--backend", "tensorrt"), "built without TensorRT"),
        (("-o", tmp_path / "missing" / "x.png"), "does not exist"),
        (("-o", tmp_path / "x.jpg"), "writes .png only"),
        (("-m", tmp_path / "nowhere"), "no such kiln directory"),
        (("-m", tmp_path), "has no manifest.json"),
    ]
    for args, fragment in cases:
        argv = ["a cat", "-m", demo_kiln, "--steps", 2, "-o", tmp_path / "x.png", *args]
        _assert_error(_cpp(cpp_build, *argv), fragment)
    argv = [cpp_build / "diffkiln-cpp", b"a \xff\xfe cat", "-m", demo_kiln, "--steps", 2, "-o", tmp_path / "y.png"]
    bad_text = subprocess.run(
        [a if isinstance(a, bytes) else os.fsencode(str(a)) for a in argv], capture_output=True, text=True, check=False
    )
    _assert_error(bad_text, "the prompt is not valid UTF-8 text")
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*.tmp"))


def _assert_error(done: subprocess.CompletedProcess, fragment: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], done.stderr


def test_unicode_tables_are_current():
    """cpp/src/unicode_data.inc is what tools/make_cpp_unicode.py writes from this Python's unicodedata."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import make_cpp_unicode
    finally:
        sys.path.pop(0)
    committed = (ROOT / "cpp" / "src" / "unicode_data.inc").read_text(encoding="utf-8")
    assert committed == make_cpp_unicode.render(make_cpp_unicode.tables()), "rerun tools/make_cpp_unicode.py"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
