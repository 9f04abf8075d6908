"""Build the small T5-format Unigram tokenizer that Flux test kilns ship as their `tokenizer_2/`.

No real T5 vocabulary (spiece.model) can be downloaded here, so diffkiln trains its own with the `tokenizers`
library on a built-in English prompt corpus and writes it in the layout of a T5 tokenizer folder, so that
`transformers.AutoTokenizer.from_pretrained(folder)` loads it as `T5Tokenizer`:

* model: Unigram, `<pad>`=0, `</s>`=1, `<unk>`=2 (T5's ids), no byte fallback, no sentinel (`<extra_id_N>`) tokens;
* normalizer: a SentencePiece *precompiled charsmap* (the only normalizer transformers 5's T5Tokenizer keeps from a
  tokenizer.json), built here from a subset of SentencePiece's `nmt_nfkc` rule: NFKC of Latin-1, Latin Extended-A,
  spacing modifiers, general punctuation, super/subscripts, letterlike symbols, number forms, enclosed
  alphanumerics, ligatures, full-width ASCII; ASCII letter + combining mark -> the precomposed letter; control
  characters removed, other spaces -> " ";
* pre-tokenizer: WhitespaceSplit, then Metaspace("▁", prepend_scheme="always", split=True), as T5Tokenizer sets it;
* post-processor: `$A </s>` (TemplateProcessing), as T5Tokenizer sets it.

The charsmap is a darts-clone double-array trie of the rule keys (UTF-8 bytes) followed by their NUL-terminated
replacements, the format `tokenizers.normalizers.Precompiled` reads. Training runs single-threaded on a fixed
corpus; the output is committed anyway (a `tokenizers` upgrade may change what training picks).

    python tools/make_t5_tokenizer.py diffkiln/exporter/assets/t5_tokenizer
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys
import unicodedata
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers is imported: single-threaded, deterministic training

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

VOCAB_SIZE = 1500
SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5
MODEL_MAX_LENGTH = 512

# ---------------------------------------------------------------------------------------------------------------
# The normalizer: a small nmt_nfkc-like precompiled charsmap
# ---------------------------------------------------------------------------------------------------------------

_NFKC_RANGES = [
    (0x00A0, 0x017F),  # Latin-1 supplement, Latin Extended-A (nbsp, ª ² ³ ¹ º ¼ ½ ¾ µ, ĳ ŀ ŉ ſ)
    (0x02B0, 0x02FF),  # spacing modifier letters
    (0x2000, 0x206F),  # general punctuation (spaces, ‥ …, ′ ″)
    (0x2070, 0x209F),  # superscripts and subscripts
    (0x2100, 0x218F),  # letterlike symbols, number forms (™ ℃ Ⅻ)
    (0x2460, 0x24FF),  # enclosed alphanumerics (① ⒜ Ⓐ)
    (0x3000, 0x3000),  # ideographic space
    (0xFB00, 0xFB06),  # Latin ligatures (ﬁ ﬂ)
    (0xFF01, 0xFF5E),  # full-width ASCII
]


def charsmap_rules() -> dict[str, str]:
    """{key: replacement} of the normalizer, keys one or two code points, replacements possibly empty."""
    rules: dict[str, str] = {}
    for lo, hi in _NFKC_RANGES:
        for cp in range(lo, hi + 1):
            c = chr(cp)
            if unicodedata.category(c) == "Cn":
                continue
            n = unicodedata.normalize("NFKC", c)
            if n != c:
                rules[c] = n
    for base in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        for mark in range(0x0300, 0x0370):
            key = base + chr(mark)
            n = unicodedata.normalize("NFC", key)
            if len(n) == 1:
                rules[key] = n
    for cp in [
        *range(0x01, 0x20),
        *range(0x7F, 0xA0),
    ]:  # control characters (NUL ends a trie key): dropped, whitespace ones -> " "
        rules[chr(cp)] = " " if chr(cp) in "\t\n\r\x0b\x0c\x85" else ""
    for c in "\u200b\u200c\u200d\u2060\ufeff":  # zero-width characters: dropped
        rules[c] = ""
    return {k: (" " if v.isspace() else v) for k, v in rules.items()}


def _trie(keys: list[bytes]) -> dict:
    root: dict = {}
    for k in keys:
        node = root
        for b in k:
            node = node.setdefault(b, {})
        node[None] = k  # a key ends here
    return root


def double_array(entries: dict[bytes, int]) -> list[int]:
    """Darts-clone units for `entries` {key bytes: value}; lookups XOR the node position with offset and label.

    Unit layout (what spm_precompiled reads): bits 0-7 label, bit 8 has_leaf, bits 10-30 offset; a leaf's value
    unit has bit 31 set. Node p's child with label c sits at `p ^ offset(p) ^ c`; its value at `p ^ offset(p)`.
    """
    units: dict[int, int] = {0: 0}
    used_bases: set[int] = set()
    queue = [(0, _trie(sorted(entries)))]  # (position, trie node)
    lowest = 1
    while queue:
        pos, node = queue.pop(0)
        labels = sorted(b for b in node if b is not None)
        needed = ([0] if None in node else []) + labels
        base = lowest
        while base in used_bases or any((base ^ c) in units or (base ^ c) == 0 for c in needed):
            base += 1
        used_bases.add(base)
        while lowest in units:
            lowest += 1
        offset = pos ^ base
        if offset >= 1 << 21:
            raise ValueError("charsmap trie too large for direct offsets")
        units[pos] = (units[pos] & ((1 << 31) | (1 << 8) | 0xFF)) | (offset << 10)
        if None in node:
            units[pos] |= 1 << 8
            units[base] = entries[node[None]] | (1 << 31)
        for c in labels:
            units[base ^ c] = c
            queue.append((base ^ c, node[c]))
    return [units.get(i, 0) for i in range(max(units) + 1)]


def precompiled_charsmap(rules: dict[str, str]) -> bytes:
    """The bytes `normalizers.Precompiled` takes: u32 trie size, the trie units, then NUL-terminated strings."""
    blob, values = bytearray(), {}
    for key in sorted(rules):
        values[key.encode()] = len(blob)
        blob += rules[key].encode() + b"\0"
    units = double_array(values)
    return struct.pack("<I", 4 * len(units)) + struct.pack(f"<{len(units)}I", *units) + bytes(blob)


# ---------------------------------------------------------------------------------------------------------------
# The corpus and training
# ---------------------------------------------------------------------------------------------------------------

SUBJECTS = """cat dog fox owl horse dragon robot astronaut knight wizard princess sailor farmer child woman man girl
boy painter musician dancer tiger lion wolf bear rabbit deer eagle whale octopus butterfly bee snail turtle""".split()
PLACES = """forest mountain lake river ocean beach desert city street village castle garden library kitchen cafe
market harbor island valley canyon glacier volcano meadow temple station bridge tower cathedral factory""".split()
ADJECTIVES = """red green blue yellow orange purple pink brown black white gray golden silver ancient modern
futuristic tiny huge quiet busy foggy rainy snowy sunny misty glowing shiny rusty wooden glass crystal
beautiful dramatic peaceful mysterious colorful vibrant pastel dark bright elegant cozy abandoned""".split()
STYLES = """photograph painting illustration sketch watercolor oil render drawing poster sculpture mosaic
anime cartoon comic engraving""".split()
MODIFIERS = """highly detailed, sharp focus, cinematic lighting, studio lighting, volumetric light, golden hour,
bokeh, wide angle, close up, macro shot, film grain, depth of field, octane render, unreal engine, trending on
artstation, masterpiece, best quality, 4k, 8k, HDR, 35mm, f/1.8, ISO 100, 1/250s""".split(", ")
EXTRA = """café naïve résumé über déjà vu Zürich São Paulo Ångström façade piñata crème brûlée Noël Björk
jalapeño smörgåsbord coöperate Dvořák Łódź""".split()
WORDS = """the a an of in on at with and or but from by to for under over near behind above below between
is are was were be has have had this that these those it its their his her our your my very quite
rather slightly two three four five ten twenty hundred first second last next old new young""".split()


def corpus() -> list[str]:
    """About 2,500 prompt-like sentences (tens of thousands of words), the same on every run."""
    rng = random.Random(20240601)
    lines = []
    for i in range(2500):
        adj, subj, place, style = (rng.choice(x) for x in (ADJECTIVES, SUBJECTS, PLACES, STYLES))
        mods = ", ".join(rng.sample(MODIFIERS, rng.randint(0, 3)))
        filler = " ".join(rng.sample(WORDS, rng.randint(2, 6)))
        line = f"A {style} of a {adj} {subj} in the {place}, {filler}; {mods}"
        if i % 5 == 0:
            line += f" ({rng.randint(0, 2024)} AD)!"
        if i % 7 == 0:
            line += " " + " ".join(rng.sample(EXTRA, 2))
        if i % 11 == 0:
            line = line.upper()
        lines.append(line)
    return lines


def t5_pipeline(tok: Tokenizer, charsmap: bytes) -> Tokenizer:
    """T5Tokenizer's text handling: precompiled normalizer, whitespace split + Metaspace, `$A </s>`."""
    tok.normalizer = normalizers.Precompiled(charsmap)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return tok


def deterministic_vocab(vocab: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The trained (piece, score) list made independent of the run.

    Training sums scores in thread order (their last bits vary) and appends the corpus characters that no piece
    covers in hash-set order, with scores 1e-4 apart below all others: round the scores, give those characters
    their scores in character order, then order all pieces by (score, text) after the special tokens.
    """
    vocab = [(piece, round(score, 8)) for piece, score in vocab]
    scores = sorted({s for _, s in vocab[len(SPECIALS) :]})
    floor = 0
    while floor + 1 < len(scores) and scores[floor + 1] - scores[floor] < 1.5e-4:
        floor += 1
    tail = sorted((p, s) for p, s in vocab if len(p) == 1 and s <= scores[floor])
    rescored = dict(zip((p for p, _ in tail), sorted((s for _, s in tail), reverse=True), strict=True))
    vocab = [(p, rescored.get(p, s)) for p, s in vocab]
    return vocab[: len(SPECIALS)] + sorted(vocab[len(SPECIALS) :], key=lambda ps: (-ps[1], ps[0]))


def train() -> Tokenizer:
    tok = t5_pipeline(Tokenizer(models.Unigram()), precompiled_charsmap(charsmap_rules()))
    trainer = trainers.UnigramTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIALS),
        unk_token="<unk>",
        max_piece_length=16,
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    vocab = json.loads(tok.model.__getstate__())["vocab"]
    tok.model = models.Unigram(deterministic_vocab(vocab), unk_id=SPECIALS.index("<unk>"), byte_fallback=False)
    for i, t in enumerate(SPECIALS):
        if tok.token_to_id(t) != i:
            raise SystemExit(f"training put {t} at id {tok.token_to_id(t)}, not {i}")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return tok


def write(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok = train()
    tok.save(str(folder / "tokenizer.json"), pretty=True)
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for i, t in enumerate(SPECIALS)
    }  # fmt: skip
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "extra_ids": 0,
        "additional_special_tokens": [],
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": True,
        "added_tokens_decoder": added,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    smap = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(smap, indent=2) + "\n")
    print(f"wrote {folder}: {tok.get_vocab_size()} tokens")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    write(Path(sys.argv[1]))
