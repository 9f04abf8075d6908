"""CLIP tokenizer for the slim runtime: prompt strings -> int32 token ids for the ONNX text encoders.

The runtime must not import torch, diffusers or transformers, so this module rebuilds, with the `tokenizers` library
alone, the exact pipeline that transformers' `CLIPTokenizer` builds (transformers 5,
``models/clip/tokenization_clip.py``):

* normalizer: NFC, every whitespace run -> one space, lowercase;
* pre-tokenizer: split on CLIP's regex (special tokens, English contractions, letter runs, single digits, runs of
  other symbols; whitespace removed), then byte-level mapping without a prefix space;
* model: BPE over ``vocab.json``/``merges.txt`` with the ``</w>`` end-of-word suffix, unknown pieces -> unk token;
* the bos/eos/unk/pad tokens registered as special added tokens, so their literal text in a prompt maps to their id;
* post-processor: ``bos … eos``.

A kiln's ``tokenizer/`` (and SDXL's ``tokenizer_2/``) folder is a diffusers tokenizer folder. The special tokens and
``model_max_length`` come from ``tokenizer_config.json``/``special_tokens_map.json`` (SDXL's tokenizer_2 pads with
``"!"``, id 0, not with eos). Vocab and merges come from ``vocab.json`` + ``merges.txt`` when present (what
transformers reads, so ids match it), else from the ``model`` section of ``tokenizer.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from diffkiln.errors import KilnError

__all__ = ["DEFAULT_MAX_LENGTH", "ClipTokenizer", "TokenizerFilesError"]

#: Positions of every CLIP text encoder Stable Diffusion uses (SD 1.x/2.x, both SDXL encoders).
DEFAULT_MAX_LENGTH = 77

# transformers' CLIPTokenizer pre-tokenizer regex, verbatim.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# transformers' CLIPTokenizer defaults, used where the config files name no token.
_DEFAULT_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}


class TokenizerFilesError(KilnError, ValueError):
    """A tokenizer folder is missing files or holds unreadable ones (a `ValueError` and a one-line `KilnError`)."""


def _read_json(path: Path) -> Any:
    """Parse one JSON file, turning any failure into a one-line `TokenizerFilesError` that names the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerFilesError(f"cannot read tokenizer file {path}: {exc}") from exc


def _as_added_token(value: Any) -> AddedToken:
    """A token as a config file states it: a plain string, or a serialized AddedToken dict (``{"content": …}``).

    A string becomes a special token that matches the raw (un-normalized) prompt text; a dict keeps its
    lstrip/rstrip/single_word/normalized/special flags. This is how transformers turns config values into tokens.
    """
    if isinstance(value, AddedToken):
        return value
    if isinstance(value, str):
        return AddedToken(value, special=True)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
        return AddedToken(value["content"], **{k: bool(value[k]) for k in flags if k in value})
    raise ValueError(f"not a token: {value!r}")


def _special_tokens(folder: Path) -> tuple[dict[str, AddedToken], list[AddedToken], dict[str, Any]]:
    """Named special tokens, extra added tokens and the config of a tokenizer folder, resolved like transformers 5.

    ``tokenizer_config.json`` gives the named tokens (bos/eos/unk/pad). When it also has ``added_tokens_decoder``
    (what current transformers saves), those tokens are added with their own flags and win over named ones with the
    same text. Otherwise (older folders, e.g. SD 1.5's) ``special_tokens_map.json`` overrides the named tokens, and
    the ``added_tokens`` of ``tokenizer.json``, when there is one, are the added tokens. Named tokens that no file
    gives fall back to CLIP's defaults.
    """
    config: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
        config = _read_json(folder / "tokenizer_config.json")
        if not isinstance(config, dict):
            raise TokenizerFilesError(f"{folder / 'tokenizer_config.json'} is not a JSON object")
    try:
        added: dict[int, AddedToken] = {}
        if "added_tokens_decoder" in config:
            added = {int(i): _as_added_token(t) for i, t in (config["added_tokens_decoder"] or {}).items()}
        else:
            if (folder / "special_tokens_map.json").is_file():
                smap = _read_json(folder / "special_tokens_map.json")
                if not isinstance(smap, dict):
                    raise ValueError("special_tokens_map.json is not a JSON object")
                for key, value in smap.items():
                    if isinstance(value, dict):
                        value = _as_added_token({**value, "special": True})
                    config[key] = value
            if (folder / "tokenizer.json").is_file():
                for t in _read_json(folder / "tokenizer.json").get("added_tokens") or []:
                    added[int(t["id"])] = _as_added_token(t)
        named = {}
        for key, default in _DEFAULT_TOKENS.items():
            value = config.get(key)
            named[key] = _as_added_token(default if value is None else value)
    except TokenizerFilesError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise TokenizerFilesError(f"bad special tokens in tokenizer folder {folder}: {exc}") from exc
    return named, [added[i] for i in sorted(added)], config


def _load_vocab_and_merges(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab and merges of a CLIP BPE folder: ``vocab.json`` + ``merges.txt`` first, else ``tokenizer.json``."""
    vocab_path, merges_path, json_path = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
    if vocab_path.is_file() and merges_path.is_file():
        try:
            # The same reader transformers hands these paths to: skips the "#version" header, ranks merges by line.
            return BPE.read_file(str(vocab_path), str(merges_path))
        except Exception as exc:  # the Rust reader raises bare Exceptions
            raise TokenizerFilesError(f"cannot read CLIP vocab/merges in {folder}: {exc}") from exc
    if json_path.is_file():
        data = _read_json(json_path)
        model = (data.get("model") if isinstance(data, dict) else None) or {}
        vocab, merges = (model.get("vocab"), model.get("merges")) if isinstance(model, dict) else (None, None)
        if (
            not isinstance(model, dict)
            or model.get("type", "BPE") != "BPE"
            or not isinstance(vocab, dict)
            or not isinstance(merges, list)
        ):
            raise TokenizerFilesError(f"{json_path} does not hold a BPE vocab and merges (not a CLIP tokenizer?)")
        try:
            pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("a merge is not a pair of tokens")
            return {str(k): int(v) for k, v in vocab.items()}, pairs
        except (TypeError, ValueError) as exc:
            raise TokenizerFilesError(f"cannot read the BPE model in {json_path}: {exc}") from exc
    missing = [p.name for p in (vocab_path, merges_path) if not p.is_file()]
    raise TokenizerFilesError(
        f"tokenizer folder {folder} lacks {' and '.join(missing)} (and has no tokenizer.json); "
        "copy the tokenizer folder of the diffusers model into the kiln"
    )


def _as_prompt_list(prompts: str | Sequence[str], what: str = "prompts") -> list[str]:
    """Accept one prompt or a sequence of prompts; a bare string is one prompt, never a sequence of characters."""
    if isinstance(prompts, str):
        return [prompts]
    out = list(prompts)
    bad = [type(p).__name__ for p in out if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{what} must be strings, got {', '.join(sorted(set(bad)))}")
    return out


def clip_text_pipeline(tok: Tokenizer) -> Tokenizer:
    """Give a BPE `Tokenizer` CLIP's text handling: NFC, whitespace runs → one space, lowercase; CLIP's split
    regex, then byte-level symbols; byte-level decoding. (tools/make_tokenizer.py trains through the same.)"""
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


class ClipTokenizer:
    """CLIP BPE tokenizer that gives the same ids as transformers' ``CLIPTokenizer``, built on `tokenizers` only.

    Build it with `ClipTokenizer.from_dir` on a kiln's ``tokenizer/`` or ``tokenizer_2/`` folder. `encode` gives the
    standard fixed window (``bos + tokens + eos``, truncated and padded to 77); `encode_chunks`/`encode_pair` give the
    long-prompt layout (several 77-token windows per prompt) whose text embeddings the pipeline concatenates.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        bos_token: str | AddedToken = _DEFAULT_TOKENS["bos_token"],
        eos_token: str | AddedToken = _DEFAULT_TOKENS["eos_token"],
        unk_token: str | AddedToken = _DEFAULT_TOKENS["unk_token"],
        pad_token: str | AddedToken = _DEFAULT_TOKENS["pad_token"],
        added_tokens: Sequence[AddedToken] = (),
        model_max_length: int = DEFAULT_MAX_LENGTH,
    ):
        """Build the pipeline from an in-memory vocab and merge list.

        The named special tokens must be in the vocab (a text encoder has no embedding for ids past it). They and
        `added_tokens` are matched in the prompt text before BPE, registered in transformers' order so that their
        matching flags (normalized, lstrip, …) resolve the same way.
        """
        named = {
            "bos": _as_added_token(bos_token),
            "eos": _as_added_token(eos_token),
            "unk": _as_added_token(unk_token),
            "pad": _as_added_token(pad_token),
        }
        for name, token in named.items():
            if token.content not in vocab:
                raise TokenizerFilesError(f"the {name} token {token.content!r} is not in the CLIP vocab")
        if model_max_length < 3:
            raise ValueError(f"model_max_length must be at least 3 (bos, a token, eos), got {model_max_length}")

        try:
            model = BPE(
                vocab=vocab,
                merges=merges,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
                unk_token=named["unk"].content,
            )
        except Exception as e:  # tokenizers raises a bare Exception ("Error while initializing BPE")
            raise TokenizerFilesError(
                f"the CLIP vocab and merges do not fit together ({str(e).splitlines()[0] if str(e) else 'BPE'}): "
                "a merge names a token missing from the vocab; the tokenizer folder is damaged"
            ) from None
        tok = Tokenizer(model)
        clip_text_pipeline(tok)
        # transformers' order: the added tokens, then the named ones they do not cover (bos, eos, unk, pad). When
        # several named tokens share a text (eos = unk = pad), `tokenizers` keeps the flags of the last one.
        covered = {t.content for t in added_tokens}
        tok.add_tokens([*added_tokens, *(t for t in named.values() if t.content not in covered)])
        self._bos_id = vocab[named["bos"].content]
        self._eos_id = vocab[named["eos"].content]
        self._pad_id = vocab[named["pad"].content]
        tok.post_processor = processors.RobertaProcessing(
            (named["eos"].content, self._eos_id), (named["bos"].content, self._bos_id), False, False
        )
        self._tokenizer = tok
        self._max_length = int(model_max_length)

    @classmethod
    def from_dir(cls, path: str | Path) -> ClipTokenizer:
        """Load a diffusers/transformers CLIP tokenizer folder (vocab.json + merges.txt, or tokenizer.json).

        Special tokens and ``model_max_length`` come from ``tokenizer_config.json``/``special_tokens_map.json`` with
        transformers' precedence (see `_special_tokens`). Raises `TokenizerFilesError` (a `ValueError`) with a
        one-line message when the folder or its files are missing or unreadable.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerFilesError(f"tokenizer folder {folder} does not exist")
        vocab, merges = _load_vocab_and_merges(folder)
        named, added, config = _special_tokens(folder)
        max_len = config.get("model_max_length", DEFAULT_MAX_LENGTH)
        # transformers writes a huge sentinel (1e30) when a checkpoint names no limit; CLIP's is always 77 then.
        if isinstance(max_len, bool) or not isinstance(max_len, int | float) or not 3 <= max_len <= 1_000_000:
            max_len = DEFAULT_MAX_LENGTH
        return cls(vocab, merges, added_tokens=added, model_max_length=int(max_len), **named)

    @property
    def bos_id(self) -> int:
        """Id of the begin-of-text token (``<|startoftext|>``) that opens every window."""
        return self._bos_id

    @property
    def eos_id(self) -> int:
        """Id of the end-of-text token (``<|endoftext|>``) that closes every window."""
        return self._eos_id

    @property
    def pad_id(self) -> int:
        """Id that fills a window after eos: eos for SD 1.x/2.x and SDXL's first encoder, ``"!"`` (0) for its second."""
        return self._pad_id

    @property
    def model_max_length(self) -> int:
        """Window length the text encoder takes (77 for every Stable Diffusion CLIP)."""
        return self._max_length

    @property
    def chunk_tokens(self) -> int:
        """Prompt tokens per window: `model_max_length` minus bos and eos (75)."""
        return self._max_length - 2

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer` (same pipeline as transformers' CLIPTokenizer backend)."""
        return self._tokenizer

    def tokenize(self, prompts: str | Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt without bos/eos, padding or truncation (their full BPE sequence)."""
        prompts = _as_prompt_list(prompts)
        return [enc.ids for enc in self._tokenizer.encode_batch(prompts, add_special_tokens=False)]

    def _window(self, tokens: Sequence[int]) -> np.ndarray:
        """One window: ``[bos, *tokens, eos, pad, …]`` of `model_max_length`; `tokens` must fit (≤ 75)."""
        row = np.full(self._max_length, self._pad_id, dtype=np.int32)
        row[0] = self._bos_id
        row[1 : 1 + len(tokens)] = tokens
        row[1 + len(tokens)] = self._eos_id
        return row

    def encode(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Standard single-window ids, int32 ``[B, 77]``, identical to transformers' ``CLIPTokenizer(prompts,
        padding="max_length", max_length=77, truncation=True).input_ids``.

        Row layout: ``bos, t1 … tk, eos, pad …``. A prompt longer than 75 tokens keeps its first 75 and still ends
        with eos at position 76; the rest is dropped (use `encode_chunks` to keep it).
        """
        tokens = self.tokenize(prompts)
        out = np.empty((len(tokens), self._max_length), dtype=np.int32)
        for i, toks in enumerate(tokens):
            out[i] = self._window(toks[: self.chunk_tokens])
        return out

    def n_chunks(self, prompts: str | Sequence[str]) -> int:
        """Windows the longest prompt needs: ``max(1, ceil(tokens / 75))`` (0–75 tokens: 1, 76–150: 2, …)."""
        return self._n_chunks(self.tokenize(prompts))

    def _n_chunks(self, tokens: list[list[int]]) -> int:
        return max([1] + [math.ceil(len(t) / self.chunk_tokens) for t in tokens])

    def _chunked(self, tokens: list[list[int]], n: int) -> np.ndarray:
        """``[B, n, 77]`` windows of already tokenized prompts, each cut into 75-token pieces (see `encode_chunks`)."""
        step = self.chunk_tokens
        out = np.empty((len(tokens), n, self._max_length), dtype=np.int32)
        for i, toks in enumerate(tokens):
            for j in range(n):
                out[i, j] = self._window(toks[j * step : (j + 1) * step])
        return out

    def encode_chunks(self, prompts: str | Sequence[str], min_chunks: int = 1) -> np.ndarray:
        """Long-prompt ids, int32 ``[B, n, 77]``: each prompt cut into 77-token windows, as A1111/compel do.

        A prompt's full token sequence (`tokenize`) is cut into consecutive pieces of 75 tokens; piece ``j`` becomes
        window ``[:, j, :]`` = ``bos, piece, eos, pad …`` (a full piece puts eos at position 76). Every prompt of the
        batch gets the same ``n = max(min_chunks, n_chunks(prompts))``; windows a shorter prompt does not need are
        empty prompts (``bos, eos, pad …``), and an empty prompt is one such window. So the pieces (positions 1 up to
        each window's closing eos) concatenated over ``j`` give the prompt's untruncated `tokenize` sequence, and for
        prompts of up to 75 tokens ``ids[:, 0]`` equals `encode`.

        The pipeline runs the text encoder on ``ids.reshape(B * n, 77)`` and reshapes the hidden states to
        ``[B, n * 77, dim]`` (concatenating along the sequence axis) for the UNet's cross-attention. Each window keeps
        its own bos/eos so every encoder pass sees the layout CLIP was trained on.
        """
        if min_chunks < 1:
            raise ValueError(f"min_chunks must be at least 1, got {min_chunks}")
        tokens = self.tokenize(prompts)
        return self._chunked(tokens, max(min_chunks, self._n_chunks(tokens)))

    def encode_pair(
        self,
        prompts: str | Sequence[str],
        negative_prompts: str | Sequence[str] | None = None,
        min_chunks: int = 1,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Conditional and unconditional ids for classifier-free guidance: ``(cond, uncond)``, each int32
        ``[B, n, 77]`` in the `encode_chunks` layout with one ``n`` for both (the longest of all prompts and negative
        prompts, at least `min_chunks`), so both embeddings are ``n * 77`` long and stack into one UNet batch.

        `negative_prompts` may be None (empty negative prompts), one string for the whole batch, or one per prompt.
        `min_chunks` lets the caller align with another tokenizer (SDXL runs two text encoders on the same prompts).
        """
        if min_chunks < 1:
            raise ValueError(f"min_chunks must be at least 1, got {min_chunks}")
        prompts = _as_prompt_list(prompts)
        if negative_prompts is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompts, str):
            negatives = [negative_prompts] * len(prompts)
        else:
            negatives = _as_prompt_list(negative_prompts, "negative prompts")
            if len(negatives) != len(prompts):
                raise ValueError(
                    f"got {len(prompts)} prompts but {len(negatives)} negative prompts; give one per prompt"
                )
        cond, uncond = self.tokenize(prompts), self.tokenize(negatives)
        n = max(min_chunks, self._n_chunks(cond + uncond))
        return self._chunked(cond, n), self._chunked(uncond, n)

    def __repr__(self) -> str:
        return (
            f"ClipTokenizer(vocab={self._tokenizer.get_vocab_size(with_added_tokens=False)}, bos={self._bos_id}, "
            f"eos={self._eos_id}, pad={self._pad_id}, max_length={self._max_length})"
        )
