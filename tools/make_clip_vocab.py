"""Build the real CLIP tokenizer folder (vocab.json + merges.txt) that the sd15, sd21 and sdxl presets ship.

The source is OpenAI's CLIP BPE file, `bpe_simple_vocab_16e6.txt.gz` (MIT license), as the `open_clip_torch` wheel
carries it. Fetch the wheel without installing it, then pass it (or the .gz unzipped from it):

    pip download open_clip_torch --no-deps -d /tmp/oc
    python tools/make_clip_vocab.py /tmp/oc/open_clip_torch-*.whl diffkiln/exporter/assets/clip_vocab

The file's sha256 is checked before anything is written. The layout is CLIP's own (openai/CLIP simple_tokenizer.py),
which is also transformers' `CLIPTokenizer` files: the 256 byte symbols in bytes_to_unicode order, the same with
"</w>", one symbol per merge in merge order (the first 48,894 lines after the header), then <|startoftext|> and
<|endoftext|>: 49,408 ids.
"""

import gzip
import hashlib
import json
import sys
import zipfile
from pathlib import Path

BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"  # bpe_simple_vocab_16e6.txt.gz
MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP's vocab budget minus the byte symbols and the two special tokens
SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}
TOKENS = {**SPECIAL, "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}

LICENSE = """\
The vocabulary and merges in this folder are OpenAI's CLIP BPE (bpe_simple_vocab_16e6.txt.gz from
https://github.com/openai/CLIP, redistributed in open_clip_torch), rewritten in transformers' file layout by
tools/make_clip_vocab.py.

MIT License

Copyright (c) 2021 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def read_bpe(path: Path) -> bytes:
    """The .gz bytes, from the wheel or the file itself, checked against BPE_SHA256."""
    data = zipfile.ZipFile(path).read(MEMBER) if zipfile.is_zipfile(path) else path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != BPE_SHA256:
        sys.exit(f"{path}: sha256 {digest} is not CLIP's bpe_simple_vocab_16e6.txt.gz ({BPE_SHA256})")
    return data


def byte_symbols() -> list[str]:
    """CLIP's bytes_to_unicode() values in its order: printable bytes as themselves, the rest as 256 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(rest))]


def clip_vocab(bpe_gz: bytes) -> tuple[dict[str, int], list[str]]:
    merges = gzip.decompress(bpe_gz).decode("utf-8").split("\n")[1 : N_MERGES + 1]  # line 0 is a header
    symbols = byte_symbols()
    pieces = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + list(SPECIAL.values())
    vocab = {p: i for i, p in enumerate(pieces)}
    assert len(vocab) == len(pieces) == 49408, len(vocab)
    return vocab, merges


def main(src: str, out: str) -> None:
    vocab, merges = clip_vocab(read_bpe(Path(src)))
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **TOKENS, "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(TOKENS, indent=2) + "\n")
    (folder / "LICENSE").write_text(LICENSE)
    print(f"wrote {folder}: {len(vocab)} tokens, {len(merges)} merges")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
