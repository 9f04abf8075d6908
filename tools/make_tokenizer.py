"""Build the small CLIP-format BPE tokenizer that the random-weight presets ship with.

No real CLIP vocabulary can be downloaded here, so diffkiln trains its own with the `tokenizers` library on a
built-in prompt corpus and writes it in exactly CLIP's file layout (vocab.json + merges.txt, ids ordered as
CLIP orders them: 256 byte symbols, the same with "</w>", merged symbols in merge order, then
<|startoftext|> and <|endoftext|>). The output is committed: `tokenizers` breaks ties between equally frequent
pairs in hash order, so a rerun may order tied merges differently (and so change ids).

    python tools/make_tokenizer.py diffkiln/exporter/assets/clip_tokenizer
"""

import itertools
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from diffkiln.runtime.tokenizer import clip_text_pipeline

VOCAB_SIZE = 1000  # an upper bound: must stay <= the tiny presets' text-encoder vocab_size

COLORS = "red green blue yellow orange purple pink brown black white gray cyan magenta gold silver teal".split()
SHAPES = "circle square triangle star hexagon diamond cross ring heart moon cube sphere".split()
WORDS = """a an the of on in at with and photo painting portrait landscape of by from small large tiny big huge
top bottom left right center middle background foreground highly detailed sharp focus cinematic lighting studio
realistic photograph art artwork illustration drawing sketch watercolor oil digital render octane unreal engine
trending artstation masterpiece best quality lowres blurry ugly deformed bad anatomy cat dog astronaut horse riding
mountain lake forest city street night day sunset sunrise beautiful woman man girl boy face eyes hair smiling house
castle tree flower flowers sky clouds ocean beach river snow rain fog light dark bright colorful vibrant pastel
style anime cartoon 3d 4k 8k hdr bokeh wide angle close up macro shot camera lens film grain vintage modern futuristic
cyberpunk fantasy science fiction robot dragon space planet stars galaxy""".split()


def corpus():
    for color, shape, bg in itertools.product(COLORS, SHAPES, COLORS):
        yield f"a {color} {shape} on a {bg} background"
    for a, b in itertools.product(WORDS, WORDS[::7]):
        yield f"{a} {b}, {b}!"


def train() -> Tokenizer:
    tok = clip_text_pipeline(Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix="")))
    trainer = trainers.BpeTrainer(
        vocab_size=2 * VOCAB_SIZE,  # trained long, then cut to the budget below
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


def clip_layout(tok: Tokenizer) -> tuple[dict[str, int], list[str]]:
    """Reorder a trained BPE into CLIP's id layout; returns (vocab, merges)."""
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_order)
    symbols = alphabet + [c + "</w>" for c in alphabet]
    budget = VOCAB_SIZE - len(symbols) - 2
    merges = merges[:budget]
    symbols += ["".join(m.split(" ")) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    return {s: i for i, s in enumerate(symbols)}, merges


def _byte_order(char: str) -> int:
    """CLIP's bytes_to_unicode order: printable bytes map to themselves and come first, in byte order."""
    code = ord(char)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    return printable.index(code) if code in printable else 256 + code


def main(out: str) -> None:
    vocab, merges = clip_layout(train())
    assert len(vocab) <= VOCAB_SIZE, len(vocab)
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    print(f"wrote {len(vocab)} tokens, {len(merges)} merges to {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "diffkiln/exporter/assets/clip_tokenizer")
