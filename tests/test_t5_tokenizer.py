"""The slim T5 tokenizer (diffkiln.runtime.t5_tokenizer) against transformers' T5Tokenizer, id for id.

The reference is what FluxPipeline._get_t5_prompt_embeds asks of its tokenizer_2:
`tokenizer_2(prompts, padding="max_length", max_length=n, truncation=True).input_ids`, with transformers 5 loading
the folder through AutoTokenizer. The folder is the shipped asset (tools/make_t5_tokenizer.py), and variants of it.
"""

import base64
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffkiln.runtime.t5_tokenizer import T5Tokenizer, TokenizerFilesError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "diffkiln" / "exporter" / "assets" / "t5_tokenizer"

LONG = " ".join(["a highly detailed photograph of a red fox in a snowy forest, golden hour"] * 30)
PROMPTS = [
    "a photo of a cat",
    "A Photograph Of An ASTRONAUT riding a horse on the moon, 4k, HDR!!!",
    "",
    " ",
    "   leading and trailing spaces   ",
    "repeated    spaces\tand\ttabs\nand\n\nnewlines",
    "punctuation: (a), [b], {c}; d... e?! f/g \\ h -- i_j 'k' \"l\" @#$%^&*+=~`|<>",
    "digits 0123456789 3.14159 1,000,000 2024-06-01 12:30pm 1/250s f/1.8 ISO-100",
    "unicode café naïve résumé über Zürich São Paulo Ångström Dvořák Łódź crème brûlée",
    "decomposed cafe\u0301 nai\u0308ve, full-width ＦＵＬＬ ｗｉｄｔｈ, ligatures ﬁne ﬂow, x² ½ ™ ① ℃",
    "emoji 🐱🚀✨ and 👩‍👩‍👧 family, flags 🇫🇷, skin tone 👍🏽",
    "scripts: 日本語のテキスト, русский текст, العربية, ελληνικά, हिन्दी",
    "zero\u200bwidth\ufeffchars and \x07control\x1b chars and non\u00a0breaking\u2003spaces",
    "special tokens in text: </s> <pad> <unk> </s></s>",
    LONG,
    "x" * 600,
]


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    return lambda folder: transformers.AutoTokenizer.from_pretrained(str(folder))


def _reference_ids(ref_tok, prompts, max_length):
    out = ref_tok(prompts, padding="max_length", max_length=max_length, truncation=True)
    return np.asarray(out.input_ids, dtype=np.int32)


def test_transformers_loads_the_asset_as_t5(reference):
    ref = reference(SHIPPED)
    assert type(ref).__name__ == "T5Tokenizer"
    assert (ref.pad_token_id, ref.eos_token_id, ref.unk_token_id) == (0, 1, 2)
    assert ref.model_max_length == 512
    assert 1000 <= len(ref) <= 2000


@pytest.mark.parametrize("max_length", [32, 256])
def test_ids_match_transformers(reference, max_length):
    ref = reference(SHIPPED)
    tok = T5Tokenizer.from_dir(SHIPPED)
    for prompt in PROMPTS:  # one at a time, so a failure names the prompt
        ours = tok.encode([prompt], max_length)
        assert ours.dtype == np.int32 and ours.shape == (1, max_length)
        np.testing.assert_array_equal(ours, _reference_ids(ref, [prompt], max_length), err_msg=repr(prompt))
    np.testing.assert_array_equal(tok.encode(PROMPTS, max_length), _reference_ids(ref, PROMPTS, max_length))


def test_layout_eos_truncation_and_padding():
    tok = T5Tokenizer.from_dir(SHIPPED)
    assert (tok.eos_id, tok.pad_id, tok.model_max_length) == (1, 0, 512)
    short, empty, long = tok.encode(["a photo of a cat", "", LONG], 32)
    n = len(tok.tokenize("a photo of a cat")[0])
    assert short[n] == 1 and np.all(short[n + 1 :] == 0) and np.all(short[:n] > 2)
    assert empty[0] == 1 and np.all(empty[1:] == 0)
    assert long[-1] == 1 and np.all(long[:-1] > 2)  # truncated to 31 pieces, eos kept
    np.testing.assert_array_equal(long[:-1], tok.tokenize(LONG)[0][:31])
    np.testing.assert_array_equal(tok.encode("a cat", 8), tok.encode(["a cat"], 8))  # a str is one prompt
    assert tok.encode([], 8).shape == (0, 8)
    with pytest.raises(ValueError, match="max_length"):
        tok.encode(["a"], 1)
    with pytest.raises(TypeError, match="strings"):
        tok.encode([None], 8)


def test_normalizer_folds_compatibility_characters():
    tok = T5Tokenizer.from_dir(SHIPPED)
    same = [("ﬁne", "fine"), ("ＦＵＬＬ", "FULL"), ("cafe\u0301", "café"), ("a\u00a0b", "a b"), ("x²", "x2")]
    for folded, plain in same:
        assert tok.tokenize(folded) == tok.tokenize(plain), folded


def _variant(tmp_path, edit_json=None, **config):
    """A copy of the asset with its tokenizer.json edited and config keys replaced (None removes a key)."""
    dst = shutil.copytree(SHIPPED, tmp_path / "tok")
    if edit_json is not None:
        data = json.loads((dst / "tokenizer.json").read_text(encoding="utf-8"))
        edit_json(data)
        (dst / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    if config:
        cfg = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
        cfg.update(config)
        cfg = {k: v for k, v in cfg.items() if v is not None}
        (dst / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return dst


def _old_converter_format(data):
    """How older transformers converters wrote T5: Precompiled + Replace, a lone Metaspace, no added tokens."""
    data["normalizer"] = {
        "type": "Sequence",
        "normalizers": [data["normalizer"], {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}],
    }
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    data["added_tokens"] = []


@pytest.mark.parametrize(
    "variant", ["old-converter", "no-normalizer", "sentinels", "listed-extras", "v5-extras", "no-configs"]
)
def test_folder_variants_match_transformers(reference, variant, tmp_path):
    if variant == "old-converter":
        folder = _variant(tmp_path, _old_converter_format)
    elif variant == "no-normalizer":
        folder = _variant(tmp_path, lambda d: d.update(normalizer=None))
    elif variant == "sentinels":  # no extra tokens listed: 100 <extra_id_N> special tokens added past the vocab
        folder = _variant(tmp_path, extra_ids=100, added_tokens_decoder=None, additional_special_tokens=None)
    elif variant == "listed-extras":  # a listed token is added, and then no sentinels
        folder = _variant(tmp_path, extra_ids=100, additional_special_tokens=["<foo>"])
    elif variant == "v5-extras":
        folder = _variant(tmp_path, additional_special_tokens=None, extra_special_tokens=["<bar>", "<extra_id_3>"])
    else:
        folder = _variant(tmp_path)
        (folder / "tokenizer_config.json").unlink()
        (folder / "special_tokens_map.json").unlink()
        (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "T5Tokenizer", "extra_ids": 0}')
    ref = reference(folder)
    tok = T5Tokenizer.from_dir(folder)
    prompts = [*PROMPTS, "sentinels <extra_id_0> and <extra_id_99>, <extra_id_3>; <foo> <bar>"]
    for max_length in (32, 256):
        np.testing.assert_array_equal(tok.encode(prompts, max_length), _reference_ids(ref, prompts, max_length))


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_t5_tokenizer", ROOT / "tools" / "make_t5_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_charsmap_is_read_by_tokenizers():
    """The tool's darts-clone trie: every rule maps, prefixes and unmapped characters stay."""
    from tokenizers import normalizers

    tool = _load_tool()
    rules = {"ﬁ": "fi", "e\u0301": "é", "\x07": "", "Ａ": "A", "ab": "X"}
    norm = normalizers.Precompiled(tool.precompiled_charsmap(rules))
    assert norm.normalize_str("ﬁne cafe\u0301 bell\x07 ＡＢ a b é") == "fine café bell AＢ a b é"
    full = tool.charsmap_rules()
    assert 300 < len(full) < 3000 and "\x00" not in full
    norm = normalizers.Precompiled(tool.precompiled_charsmap(full))
    for key, value in full.items():
        assert norm.normalize_str(f"<{key}>") == f"<{value}>", repr(key)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no-folder", "does not exist"),
        ("no-tokenizer-json", "lacks tokenizer.json"),
        ("spiece-only", "spiece.model alone is not read"),
        ("not-json", "cannot read tokenizer file"),
        ("bpe", "not a T5 tokenizer"),
        ("bad-vocab", "cannot load"),
        ("bad-charsmap", "damaged precompiled charsmap"),
        ("config-not-object", "is not a JSON object"),
        ("bad-eos", "not a string"),
    ],
)
def test_bad_folder_gives_clear_error(damage, message, tmp_path):
    dst = shutil.copytree(SHIPPED, tmp_path / "tok")
    if damage == "no-folder":
        dst = tmp_path / "missing"
    elif damage in ("no-tokenizer-json", "spiece-only"):
        (dst / "tokenizer.json").unlink()
        if damage == "spiece-only":
            (dst / "spiece.model").write_bytes(b"\x00")
    elif damage == "not-json":
        (dst / "tokenizer.json").write_text('{"model": {"type": "Unigram", "vocab": [')
    elif damage == "bpe":
        (dst / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}}))
    elif damage == "bad-vocab":
        dst = _variant(tmp_path / "v", lambda d: d["model"].update(vocab=[["a"], 7]))
    elif damage == "bad-charsmap":
        charsmap = base64.b64encode(b"\xff\xff\xff\x7f").decode()
        dst = _variant(tmp_path / "v", lambda d: d["normalizer"].update(precompiled_charsmap=charsmap))
    elif damage == "config-not-object":
        (dst / "tokenizer_config.json").write_text("[1, 2]")
    else:
        dst = _variant(tmp_path / "v", eos_token=7)
    with pytest.raises(TokenizerFilesError, match=message) as err:
        T5Tokenizer.from_dir(dst)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_t5_tokenizer_module_is_slim():
    """Importing and using the T5 tokenizer pulls in neither torch, diffusers nor transformers."""
    code = (
        "import sys\n"
        "from diffkiln.runtime.t5_tokenizer import T5Tokenizer\n"
        "from diffkiln.runtime import flow\n"
        f"T5Tokenizer.from_dir({str(SHIPPED)!r}).encode(['a cat'], 16)\n"
        "flow.flow_sigmas({'use_dynamic_shifting': True}, 4, 1024)\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'onnx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
