"""T5 tokenizer for the slim runtime: prompt strings -> int32 token ids for Flux's T5 text encoder (`tokenizer_2/`).

The runtime must not import torch, diffusers or transformers, so this module loads the folder's ``tokenizer.json``
(a SentencePiece Unigram model, as T5TokenizerFast writes it) with the `tokenizers` library alone and gives the ids
that diffusers' FluxPipeline gets from ``tokenizer_2(prompt, padding="max_length", max_length=n, truncation=True)``
with transformers 5. That T5Tokenizer keeps only the file's vocab, added tokens and precompiled charsmap, and sets
the rest itself (``models/t5/tokenization_t5.py``); so does this one:

* normalizer: the SentencePiece ``Precompiled`` charsmap of the file's normalizer (alone or in a Sequence), else none;
* pre-tokenizer: WhitespaceSplit, then Metaspace("▁", prepend_scheme="always", split=True);
* model: the file's Unigram pieces and scores; the file's added tokens, plus the named special tokens
  (eos/pad/unk) and the config's ``additional_special_tokens`` as special tokens (a config that lists none gets
  ``extra_ids`` ``<extra_id_N>`` sentinels, 100 by default; new ones get ids past the vocab, as in transformers);
* ids: the prompt's pieces, truncated to ``max_length - 1``, then eos, then pad up to ``max_length``.

Special tokens come from ``tokenizer_config.json``, then ``special_tokens_map.json``; T5's defaults
(``</s>``, ``<pad>``, ``<unk>``) where neither names one.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers

from diffkiln.errors import first_line
from diffkiln.runtime.tokenizer import TokenizerFilesError

__all__ = ["T5_MAX_LENGTH", "T5Tokenizer", "TokenizerFilesError"]

#: transformers' T5 `model_max_length`; Flux runs its T5 at 512 (dev) or 256 (schnell) tokens.
T5_MAX_LENGTH = 512

_DEFAULT_TOKENS = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def _read_json(path: Path) -> Any:
    """Parse one JSON file, turning any failure into a one-line `TokenizerFilesError` that names the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerFilesError(f"cannot read tokenizer file {path}: {first_line(exc)}") from None


def _token_text(value: Any, path: Path) -> str:
    """A token as a config names it: a string, or a serialized AddedToken dict (``{"content": …}``)."""
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise TokenizerFilesError(f"{path} names a special token that is not a string: {value!r}")
    return value


def _config(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json over special_tokens_map.json (both optional), as one dict."""
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            data = _read_json(folder / name)
            if not isinstance(data, dict):
                raise TokenizerFilesError(f"{folder / name} is not a JSON object")
            config.update({k: v for k, v in data.items() if v is not None})
    return config


def _precompiled(normalizer: Any, path: Path) -> normalizers.Normalizer | None:
    """The file's SentencePiece charsmap normalizer, the one part of its normalizer transformers' T5 keeps."""
    parts = normalizer.get("normalizers", []) if isinstance(normalizer, dict) else []
    for part in [normalizer, *parts]:
        if isinstance(part, dict) and part.get("type") == "Precompiled" and part.get("precompiled_charsmap"):
            try:
                charsmap = base64.b64decode(part["precompiled_charsmap"], validate=True)
                (trie_size,) = struct.unpack_from("<I", charsmap) if len(charsmap) >= 4 else (-1,)
                if trie_size < 0 or trie_size % 4 or 4 + trie_size > len(charsmap):
                    raise ValueError("its trie size does not fit the data")
                charsmap[4 + trie_size :].decode("utf-8")
                return normalizers.Precompiled(charsmap)
            except Exception as exc:  # binascii.Error, UnicodeDecodeError, the Rust parser's bare Exception
                raise TokenizerFilesError(f"{path} holds a damaged precompiled charsmap: {first_line(exc)}") from None
    return None


def _as_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    """One prompt or a sequence of them; a bare string is one prompt, never a sequence of characters."""
    out = [prompts] if isinstance(prompts, str) else list(prompts)
    bad = sorted({type(p).__name__ for p in out if not isinstance(p, str)})
    if bad:
        raise TypeError(f"prompts must be strings, got {', '.join(bad)}")
    return out


class T5Tokenizer:
    """T5 Unigram tokenizer giving the same ids as transformers 5's ``T5Tokenizer``, built on `tokenizers` only.

    Build it with `T5Tokenizer.from_dir` on a kiln's ``tokenizer_2/`` folder; `encode` gives the fixed window
    (``pieces… </s> <pad>…``) Flux's T5 encoder takes.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        eos_token: str = "</s>",
        pad_token: str = "<pad>",
        model_max_length: int = T5_MAX_LENGTH,
    ):
        """Wrap a `tokenizers.Tokenizer` whose pipeline is already T5's (see `from_dir`); its post-processor,
        truncation and padding are ignored (`encode` adds eos and pads itself)."""
        eos_id, pad_id = tokenizer.token_to_id(eos_token), tokenizer.token_to_id(pad_token)
        for name, token, i in (("eos", eos_token, eos_id), ("pad", pad_token, pad_id)):
            if i is None:
                raise TokenizerFilesError(f"the {name} token {token!r} is not in the T5 vocab")
        tokenizer.post_processor = None
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self._eos_id, self._pad_id = int(eos_id), int(pad_id)
        self._max_length = int(model_max_length)

    @classmethod
    def from_dir(cls, path: str | Path) -> T5Tokenizer:
        """Load a diffusers/transformers T5 tokenizer folder (``tokenizer.json``, optional config files).

        Raises `TokenizerFilesError` (a `ValueError`) with a one-line message when the folder or its files are
        missing, unreadable or not a T5 (Unigram) tokenizer.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerFilesError(f"tokenizer folder {folder} does not exist")
        json_path = folder / "tokenizer.json"
        if not json_path.is_file():
            extra = " (spiece.model alone is not read: save the folder with transformers' T5TokenizerFast)"
            raise TokenizerFilesError(
                f"tokenizer folder {folder} lacks tokenizer.json{extra if (folder / 'spiece.model').is_file() else ''}"
            )
        data = _read_json(json_path)
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("type") != "Unigram" or not isinstance(model.get("vocab"), list):
            raise TokenizerFilesError(f"{json_path} does not hold a Unigram vocab (not a T5 tokenizer?)")
        normalizer = _precompiled(data.get("normalizer"), json_path)
        try:  # without the file's normalizer: replaced anyway, and a damaged charsmap would panic in Rust
            tok = Tokenizer.from_str(json.dumps({**data, "normalizer": None}))
        except Exception as exc:  # the Rust deserializer raises bare Exceptions
            raise TokenizerFilesError(f"cannot load {json_path}: {first_line(exc)}") from None
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
            ]
        )

        config = _config(folder)
        where = folder / "tokenizer_config.json"
        named = {key: _token_text(config.get(key, default), where) for key, default in _DEFAULT_TOKENS.items()}
        # A config that lists extra special tokens (even none) gets exactly those; one that lists none gets
        # `extra_ids` (default 100) <extra_id_N> sentinels, as transformers 5 loads them.
        keys = [k for k in ("additional_special_tokens", "extra_special_tokens") if k in config]
        if keys:
            extra = config[keys[0]]
            extra = list(extra.values()) if isinstance(extra, dict) else extra
            if not isinstance(extra, list):
                raise TokenizerFilesError(f"{where}: {keys[0]} is not a list")
            extra = [_token_text(t, where) for t in extra]
        else:
            extra_ids = config.get("extra_ids", 100)
            extra_ids = extra_ids if isinstance(extra_ids, int) and not isinstance(extra_ids, bool) else 100
            extra = [f"<extra_id_{i}>" for i in range(max(0, extra_ids))]
        # transformers registers these as special tokens unless the file already has them as added tokens
        present = {t.content for t in tok.get_added_tokens_decoder().values()}
        missing = [t for t in [*named.values(), *extra] if t not in present]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])

        max_len = config.get("model_max_length", T5_MAX_LENGTH)
        if isinstance(max_len, bool) or not isinstance(max_len, int | float) or not 2 <= max_len <= 1_000_000:
            max_len = T5_MAX_LENGTH  # transformers writes a huge sentinel when a checkpoint names no limit
        return cls(tok, eos_token=named["eos_token"], pad_token=named["pad_token"], model_max_length=int(max_len))

    @property
    def eos_id(self) -> int:
        """Id of ``</s>``, which closes every row (1 for T5)."""
        return self._eos_id

    @property
    def pad_id(self) -> int:
        """Id that fills a row after eos (``<pad>``, 0 for T5)."""
        return self._pad_id

    @property
    def model_max_length(self) -> int:
        """The tokenizer config's ``model_max_length`` (512 for T5); `encode` takes its own max_length."""
        return self._max_length

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer` (T5's pipeline, no post-processor)."""
        return self._tokenizer

    def tokenize(self, prompts: str | Sequence[str]) -> list[list[int]]:
        """Piece ids of each prompt, without eos, truncation or padding."""
        prompts = _as_prompt_list(prompts)
        return [enc.ids for enc in self._tokenizer.encode_batch(prompts, add_special_tokens=False)]

    def encode(self, prompts: str | Sequence[str], max_length: int) -> np.ndarray:
        """int32 ``[B, max_length]`` ids, identical to transformers' ``T5Tokenizer(prompts, padding="max_length",
        max_length=max_length, truncation=True).input_ids``: the first ``max_length - 1`` pieces, eos, then pad."""
        if isinstance(max_length, bool) or not isinstance(max_length, int | np.integer) or max_length < 2:
            raise ValueError(f"max_length must be an integer of at least 2 (a piece and eos), got {max_length!r}")
        tokens = self.tokenize(prompts)
        out = np.full((len(tokens), int(max_length)), self._pad_id, dtype=np.int32)
        for i, toks in enumerate(tokens):
            toks = toks[: max_length - 1]
            out[i, : len(toks)] = toks
            out[i, len(toks)] = self._eos_id
        return out

    def __repr__(self) -> str:
        return (
            f"T5Tokenizer(vocab={self._tokenizer.get_vocab_size(with_added_tokens=True)}, eos={self._eos_id}, "
            f"pad={self._pad_id}, model_max_length={self._max_length})"
        )
