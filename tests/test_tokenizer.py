"""The slim runtime's CLIP tokenizer: same ids as transformers' CLIPTokenizer, and the long-prompt chunk layout.

transformers is only the reference here (the runtime never imports it); the parity tests skip where it is absent.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffkiln.runtime.tokenizer import ClipTokenizer, TokenizerFilesError

ASSETS = Path(__file__).resolve().parents[1] / "diffkiln" / "exporter" / "assets"
SHIPPED = ASSETS / "clip_tokenizer"  # the tiny presets' 1,000-token BPE
REAL = ASSETS / "clip_vocab"  # OpenAI's CLIP BPE (tools/make_clip_vocab.py), for sd15, sd21 and sdxl
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

PROMPTS = [
    "A PHOTO of a Cat",
    "cat,dog!!  ...?",
    "it's don't I'll we're IT'S",
    "8k 1024x768",
    "héllo wörld 日本 🙂",
    "cafe\u0301 ﬁne Ⅻ",  # combining accent (NFC), a ligature and a roman numeral
    "  a\n\tb   c \r\n d  ",
    "",
    "a!b ! !! ?!",
    f"{BOS} literal {EOS} tokens <|ENDOFTEXT|>",
    "a photo of a cat, " * 20,  # > 77 tokens: truncated
]

# Hand-written merges for the second vocab; every merge result joins the vocab.
HAND_MERGES = [
    "c a",
    "ca t</w>",
    "d o",
    "do g</w>",
    "p h",
    "ph o",
    "pho t",
    "phot o</w>",
    "i t</w>",
    "' s</w>",
    "' t</w>",
    "l l</w>",
    "' ll</w>",
    "o n",
    "d on",
    "! !</w>",
    ". .",
    ".. .</w>",
    "Ã ©",
    "h Ã©",
    "w o",
]


def _write_folder(folder: Path, vocab: dict[str, int], merges: list[str], **config) -> Path:
    """A diffusers-style CLIP tokenizer folder: vocab.json, merges.txt, tokenizer_config.json, special_tokens_map."""
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokens = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS, **config}
    (folder / "special_tokens_map.json").write_text(json.dumps(tokens))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **tokens})
    )
    return folder


def _hand_folder(folder: Path, **config) -> Path:
    """A small CLIP-format vocab: printable ASCII (bare and with </w>), two bytes of "é", the merges, bos/eos.

    Every other non-ASCII byte is missing, so accents, CJK and emoji exercise the unknown-token path.
    """
    symbols = [chr(c) for c in range(33, 127)] + ["Ã", "©"]
    pieces = symbols + [s + "</w>" for s in symbols]
    for merge in HAND_MERGES:
        left, right = merge.split(" ")
        if left + right not in pieces:
            pieces.append(left + right)
    vocab = {p: i for i, p in enumerate([*pieces, BOS, EOS])}
    return _write_folder(folder, vocab, HAND_MERGES, **config)


def _with_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of a tokenizer folder whose tokenizer_config.json and special_tokens_map.json get `changes`."""
    shutil.copytree(src, dst)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = json.loads((dst / name).read_text())
        data.update(changes)
        (dst / name).write_text(json.dumps(data))
    return dst


@pytest.fixture(params=["shipped", "shipped-pad-bang", "real", "real-pad-bang", "hand", "hand-pad-bang"])
def folder(request, tmp_path):
    """The shipped vocabs and a hand-built one, each with pad = eos and with SDXL tokenizer_2's pad "!" (id 0)."""
    name = request.param
    if name in ("shipped", "real"):
        return {"shipped": SHIPPED, "real": REAL}[name]
    if name.endswith("pad-bang") and not name.startswith("hand"):
        return _with_config(SHIPPED if name.startswith("shipped") else REAL, tmp_path / name, pad_token="!")
    return _hand_folder(tmp_path / name, **({"pad_token": "!"} if name.endswith("pad-bang") else {}))


def _reference_ids(folder: Path, prompts: list[str]) -> np.ndarray:
    transformers = pytest.importorskip("transformers")
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder))
    return np.array(ref(prompts, padding="max_length", max_length=77, truncation=True).input_ids)


def test_encode_matches_transformers(folder):
    """Every prompt class (case, punctuation, contractions, digits, unicode, whitespace, empty, long) gives the same
    [B, 77] ids as transformers' CLIPTokenizer with padding="max_length", truncation=True."""
    tok = ClipTokenizer.from_dir(folder)
    ids = tok.encode(PROMPTS)
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ids, _reference_ids(folder, PROMPTS))
    # The long prompt really was truncated, with eos kept at the end.
    assert len(tok.tokenize(PROMPTS[-1])[0]) > 75 and ids[-1, 76] == tok.eos_id


def test_special_ids_and_padding(folder):
    tok = ClipTokenizer.from_dir(folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    pad = "!" if "bang" in folder.name else EOS
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (vocab[BOS], vocab[EOS], vocab[pad])
    assert tok.model_max_length == 77 and tok.chunk_tokens == 75
    empty = tok.encode([""])[0]
    assert empty[:2].tolist() == [tok.bos_id, tok.eos_id] and (empty[2:] == tok.pad_id).all()


def test_hand_vocab_uses_merges_and_unk(tmp_path):
    """The hand-written merges apply (so the test vocab is not trivial) and unknown bytes become unk (= eos)."""
    tok = ClipTokenizer.from_dir(_hand_folder(tmp_path / "hand"))
    vocab = json.loads((tmp_path / "hand" / "vocab.json").read_text(encoding="utf-8"))
    assert tok.tokenize("Cat photo it's")[0] == [vocab["cat</w>"], vocab["photo</w>"], vocab["it</w>"], vocab["'s</w>"]]
    assert tok.tokenize("日")[0] == [tok.eos_id] * 3  # three UTF-8 bytes, none in this vocab


@pytest.mark.parametrize("variant", ["sd15-dict-tokens", "added-tokens-decoder", "tokenizer-json-only"])
def test_config_variants_match_transformers(variant, tmp_path):
    """Folder layouts seen in real checkpoints: SD 1.5's AddedToken dicts (normalized=True) in special_tokens_map,
    current transformers' added_tokens_decoder, and a folder with only tokenizer.json (no vocab.json/merges.txt)."""
    transformers = pytest.importorskip("transformers")
    dst = tmp_path / variant
    if variant == "sd15-dict-tokens":
        dict_token = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
        _with_config(SHIPPED, dst, bos_token={"content": BOS, **dict_token}, eos_token={"content": EOS, **dict_token})
    elif variant == "added-tokens-decoder":
        _with_config(SHIPPED, dst)
        vocab = json.loads((dst / "vocab.json").read_text())
        config = json.loads((dst / "tokenizer_config.json").read_text())
        config["added_tokens_decoder"] = {
            str(vocab[t]): {"content": t, "lstrip": False, "normalized": True, "rstrip": False, "special": True}
            for t in (BOS, EOS)
        }
        (dst / "tokenizer_config.json").write_text(json.dumps(config))
    else:
        transformers.CLIPTokenizer.from_pretrained(str(SHIPPED)).save_pretrained(str(dst))
        for name in ("vocab.json", "merges.txt"):
            (dst / name).unlink(missing_ok=True)
        assert (dst / "tokenizer.json").is_file()
    np.testing.assert_array_equal(ClipTokenizer.from_dir(dst).encode(PROMPTS), _reference_ids(dst, PROMPTS))


@pytest.mark.parametrize("source", [SHIPPED, REAL], ids=["shipped", "real"])
@pytest.mark.parametrize("pad_token", [EOS, "!"])
def test_both_folder_forms_give_the_same_ids(source, pad_token, tmp_path):
    """The vocab.json + merges.txt form (SD hub folders, transformers 4) and what transformers 5's save_pretrained
    writes (tokenizer.json + tokenizer_config.json) give the same ids, in transformers and in the runtime."""
    transformers = pytest.importorskip("transformers")
    files = _with_config(source, tmp_path / "files", pad_token=pad_token)
    saved = tmp_path / "saved"
    transformers.CLIPTokenizer.from_pretrained(str(files)).save_pretrained(str(saved))
    assert sorted(p.name for p in saved.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    ids = ClipTokenizer.from_dir(files).encode(PROMPTS)
    np.testing.assert_array_equal(ClipTokenizer.from_dir(saved).encode(PROMPTS), ids)
    np.testing.assert_array_equal(_reference_ids(saved, PROMPTS), ids)
    np.testing.assert_array_equal(_reference_ids(files, PROMPTS), ids)
    assert ClipTokenizer.from_dir(saved).pad_id == (0 if pad_token == "!" else ClipTokenizer.from_dir(files).eos_id)


def test_real_vocabulary_is_clips():
    """CLIP's layout (the 256 byte symbols in bytes_to_unicode order, the same with </w>, one symbol per merge in
    merge order, bos, eos: 49,408 ids), and CLIP's well-known ids."""
    pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = json.loads((REAL / "vocab.json").read_text(encoding="utf-8"))
    merges = (REAL / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    symbols = list(bytes_to_unicode().values())
    pieces = [*symbols, *(c + "</w>" for c in symbols), *(m.replace(" ", "") for m in merges[1:]), BOS, EOS]
    assert list(vocab) == pieces and list(vocab.values()) == list(range(49408))
    tok = ClipTokenizer.from_dir(REAL)
    assert tok.tokenize("a photo of a cat")[0] == [320, 1125, 539, 320, 2368]
    assert tok.tokenize("an astronaut riding a horse")[0] == [550, 18376, 6765, 320, 4558]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (49406, 49407, 49407)
    assert (REAL / "LICENSE").read_text().count("MIT License") == 1


def test_vocab_files_preferred_over_tokenizer_json(tmp_path):
    """With both present, vocab.json + merges.txt win (a stale or foreign tokenizer.json cannot change ids)."""
    dst = _hand_folder(tmp_path / "hand")
    (dst / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}}))
    np.testing.assert_array_equal(
        ClipTokenizer.from_dir(dst).encode(PROMPTS),
        ClipTokenizer.from_dir(_hand_folder(tmp_path / "ref")).encode(PROMPTS),
    )


@pytest.mark.parametrize("pad_token", [EOS, "!"])
def test_chunks_of_a_160_token_prompt(pad_token, tmp_path):
    """160 tokens -> 3 windows of bos + 75 + eos (the last holds 10, then pad); their inner tokens concatenate back
    to the full sequence, the first window equals `encode`, and the empty negative prompt gets 3 windows too."""
    tok = ClipTokenizer.from_dir(_with_config(SHIPPED, tmp_path / "tok", pad_token=pad_token))
    prompt = " ".join(str(i) for i in range(85))  # one token per digit: 10 + 75 * 2 = 160
    full = tok.tokenize(prompt)[0]
    assert len(full) == 160

    cond, uncond = tok.encode_pair([prompt], [""])
    assert cond.dtype == uncond.dtype == np.int32
    assert cond.shape == uncond.shape == (1, 3, 77)
    windows = cond[0]
    assert (windows[:, 0] == tok.bos_id).all()
    assert windows[0, 76] == windows[1, 76] == tok.eos_id
    assert windows[2, 11] == tok.eos_id and (windows[2, 12:] == tok.pad_id).all()
    inner = [*windows[0, 1:76], *windows[1, 1:76], *windows[2, 1:11]]
    assert inner == full
    np.testing.assert_array_equal(windows[0], tok.encode([prompt])[0])
    empty = [tok.bos_id, tok.eos_id] + [tok.pad_id] * 75
    assert uncond[0].tolist() == [empty] * 3
    np.testing.assert_array_equal(tok.encode_chunks([prompt, ""]), np.stack([cond[0], uncond[0]]))


def test_chunk_counts_and_pair_options():
    tok = ClipTokenizer.from_dir(SHIPPED)
    digits = lambda n: " ".join("7" * n)  # noqa: E731 - n single-digit tokens
    assert [tok.n_chunks(digits(n)) for n in (0, 1, 75, 76, 150, 151)] == [1, 1, 1, 2, 2, 3]
    assert tok.encode_chunks(["a cat"]).shape == (1, 1, 77)
    np.testing.assert_array_equal(tok.encode_chunks(["a cat"])[:, 0], tok.encode(["a cat"]))
    assert tok.encode_chunks(["a cat"], min_chunks=2).shape == (1, 2, 77)
    # A long negative prompt sets n for both; None and a single string broadcast over the batch.
    cond, uncond = tok.encode_pair(["a", "b"], digits(80))
    assert cond.shape == uncond.shape == (2, 2, 77)
    cond, uncond = tok.encode_pair("a cat", None, min_chunks=3)
    assert cond.shape == uncond.shape == (1, 3, 77)
    np.testing.assert_array_equal(uncond[0, 0], tok.encode([""])[0])
    np.testing.assert_array_equal(tok.encode("a cat"), tok.encode(["a cat"]))  # a str is one prompt
    with pytest.raises(ValueError, match="negative prompts"):
        tok.encode_pair(["a", "b"], ["x"])
    with pytest.raises(TypeError, match="strings"):
        tok.encode([None])


def test_missing_vocab_gives_clear_error(tmp_path):
    dst = shutil.copytree(SHIPPED, tmp_path / "tok")
    (dst / "vocab.json").unlink()
    with pytest.raises(ValueError, match=r"lacks vocab\.json") as err:
        ClipTokenizer.from_dir(dst)
    assert isinstance(err.value, TokenizerFilesError) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no-folder", "does not exist"),
        ("vocab-not-json", "cannot read CLIP vocab/merges"),
        ("config-not-json", "cannot read tokenizer file"),
        ("pad-not-in-vocab", "pad token"),
    ],
)
def test_unreadable_folder_gives_clear_error(damage, message, tmp_path):
    dst = shutil.copytree(SHIPPED, tmp_path / "tok")
    if damage == "no-folder":
        dst = tmp_path / "missing"
    elif damage == "vocab-not-json":
        (dst / "vocab.json").write_text("{not json")
    elif damage == "config-not-json":
        (dst / "tokenizer_config.json").write_text("{not json")
    else:
        _with_config(SHIPPED, dst := tmp_path / "tok2", pad_token="<pad>")
    with pytest.raises(TokenizerFilesError, match=message) as err:
        ClipTokenizer.from_dir(dst)
    assert "\n" not in str(err.value)


def test_tokenizer_module_is_slim():
    """Importing and using the tokenizer pulls in neither torch, diffusers nor transformers."""
    code = (
        "import sys\n"
        "from diffkiln.runtime.tokenizer import ClipTokenizer\n"
        f"ClipTokenizer.from_dir({str(SHIPPED)!r}).encode_pair(['a cat'], [''])\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
