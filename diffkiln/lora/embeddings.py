"""Textual-inversion embeddings: new tokens in the tokenizer files, new rows in the token-embedding table.

An embedding is n vectors of the text encoder's width D, learned for a new word. Files read (safetensors):

    A1111        {"emb_params": [n, D]} (or "string_to_param.*"); the token is the file name
    diffusers    {"<token>": [n, D] or [D]}; the token is the key
    SDXL         {"clip_l": [n, 768], "clip_g": [n, 1280]}: one set per text encoder; the token is the file name

A token passed by the caller wins. As diffusers' `load_textual_inversion` does, n > 1 vectors become the tokens
`tok, tok_1, …, tok_{n-1}`; a prompt must name all of them (`expand_prompt` rewrites `tok` the way diffusers'
`maybe_convert_prompt` does). Each token is added the way transformers' `tokenizer.add_tokens` adds it: the next id
(len(tokenizer)), an `added_tokens_decoder` entry (normalized, not special) in tokenizer_config.json (and in
tokenizer.json's `added_tokens` when that file exists); vocab.json and merges.txt stay as they are. Row `id` of
the embedding table [V, D] gets the vector, appending rows when id ≥ V (the Gather table grows).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import AddedToken

from diffkiln.kiln import file_sha256, write_json
from diffkiln.lora.errors import LoraError
from diffkiln.lora.tensorfile import TensorFile
from diffkiln.runtime.prompts import expand_prompt, multi_vector_tokens  # noqa: F401 (re-exported)

TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"
_NAMED = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass
class Embedding:
    path: Path
    sha256: str
    token: str
    vectors: dict[str, np.ndarray]  # text-encoder component → [n, D] float32

    def tokens(self, component: str) -> list[str]:
        """`tok`, `tok_1`, … one per vector, as diffusers names a multi-vector embedding's tokens."""
        n = self.vectors[component].shape[0]
        return [self.token] + [f"{self.token}_{i}" for i in range(1, n)]


def read_embedding(path: Path, token: str | None = None) -> Embedding:
    """Read an A1111, diffusers or SDXL (clip_l/clip_g) embedding; single-encoder ones go to `text_encoder`."""
    path = Path(path)
    file = TensorFile(path)
    keys = file.keys()
    if {"clip_l", "clip_g"} <= set(keys):
        vectors = {"text_encoder": file.get("clip_l"), "text_encoder_2": file.get("clip_g")}
        found = None
    elif a1111 := [k for k in keys if k == "emb_params" or k.startswith("string_to_param")]:
        vectors, found = {"text_encoder": file.get(a1111[0])}, None
    elif len(keys) == 1:
        vectors, found = {"text_encoder": file.get(keys[0])}, keys[0]
    else:
        raise LoraError(
            f"{path} is not a textual-inversion embedding (keys {', '.join(keys[:4]) or 'none'}); expected "
            "emb_params, clip_l + clip_g, or a single <token> key"
        )
    vectors = {c: v.reshape(1, -1) if v.ndim == 1 else v for c, v in vectors.items()}
    if any(v.ndim != 2 or v.shape[0] == 0 for v in vectors.values()):
        shapes = {c: list(v.shape) for c, v in vectors.items()}
        raise LoraError(f"{path}: embedding vectors must be [n, D], got {shapes}")
    token = token or found or path.stem
    if not token.strip() or any(c.isspace() for c in token):
        raise LoraError(f"{path}: token {token!r} must be one word without spaces; pass another with FILE:TOKEN")
    return Embedding(path, file_sha256(path), token, vectors)


def plan_token_ids(folder: Path, tokens: list[str]) -> list[int]:
    """The ids `tokens` will get in this tokenizer folder (consecutive from len(tokenizer)); refuses known ones."""
    vocab, decoder, _ = _read(folder)
    known = set(vocab) | {entry["content"] for entry in decoder.values()}
    clash = [t for t in tokens if t in known]
    if clash or len(set(tokens)) < len(tokens):
        what = clash[0] if clash else next(t for t in tokens if tokens.count(t) > 1)
        raise LoraError(
            f"token {what!r} is already in the tokenizer {folder.name}/ (or given twice); "
            "pass another token with --embedding FILE:TOKEN"
        )
    start = max([*vocab.values(), *map(int, decoder)], default=-1) + 1
    return list(range(start, start + len(tokens)))


def write_tokens(src: Path, dst: Path, tokens: list[str]) -> list[int]:
    """Copy the tokenizer folder `src` to `dst` with `tokens` added (see module docstring); returns their ids."""
    ids = plan_token_ids(src, tokens)
    shutil.copytree(src, dst)
    _, decoder, config = _read(src)
    entries = {str(i): _entry(t, special=False) for i, t in zip(ids, tokens, strict=True)}
    config["added_tokens_decoder"] = dict(sorted({**decoder, **entries}.items(), key=lambda kv: int(kv[0])))
    write_json(dst / "tokenizer_config.json", config)
    if (src / "tokenizer.json").is_file():
        data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
        data["added_tokens"] = [*(data.get("added_tokens") or []), *({"id": int(i), **e} for i, e in entries.items())]
        (dst / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return ids


def place_rows(table: np.ndarray, ids: list[int], vectors: np.ndarray) -> np.ndarray:
    """The embedding table [V, D] with row ids[i] = vectors[i]; grows to max(ids) + 1 rows when needed."""
    rows = max(table.shape[0], max(ids) + 1)
    if min(ids) > table.shape[0]:
        raise LoraError(
            f"the tokenizer has {min(ids)} tokens but the text encoder only {table.shape[0]} embeddings; "
            "the kiln dir's tokenizer does not belong to its text encoder"
        )
    out = np.zeros((rows, table.shape[1]), dtype=table.dtype)
    out[: table.shape[0]] = table
    out[ids] = vectors.astype(table.dtype)
    return out


def _read(folder: Path) -> tuple[dict[str, int], dict[str, dict], dict]:
    """(vocab, added_tokens_decoder {id: entry}, tokenizer_config) of a CLIP tokenizer folder.

    Folders written before transformers kept `added_tokens_decoder` (SD 1.5's) name their special tokens in
    special_tokens_map.json; those are turned into decoder entries with the flags our ClipTokenizer and
    transformers give them, so adding a decoder does not change how existing text tokenizes."""
    config = _json(folder / "tokenizer_config.json") or {}
    if (folder / "vocab.json").is_file():
        vocab = _json(folder / "vocab.json")
    else:
        vocab = ((_json(folder / "tokenizer.json") or {}).get("model") or {}).get("vocab") or {}
    if "added_tokens_decoder" in config:
        return vocab, dict(config["added_tokens_decoder"] or {}), config
    config |= {k: v for k, v in (_json(folder / "special_tokens_map.json") or {}).items() if k in _NAMED}
    decoder = {}
    for key in _NAMED:
        value = config.get(key) or {"bos_token": "<|startoftext|>"}.get(key, "<|endoftext|>")
        content = value["content"] if isinstance(value, dict) else value
        flags = {k: v for k, v in value.items() if k != "__type"} if isinstance(value, dict) else {}
        if content in vocab:
            decoder[str(vocab[content])] = {**_entry(content, special=True), **flags, "special": True}
    for t in (_json(folder / "tokenizer.json") or {}).get("added_tokens") or []:
        decoder[str(t["id"])] = {k: v for k, v in t.items() if k != "id"}
    return vocab, decoder, config


def _entry(content: str, special: bool) -> dict:
    """An added-token record with the flags transformers gives `add_tokens(content)` (or a special token)."""
    t = AddedToken(content, special=special)
    flags = {"lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip, "single_word": t.single_word}
    return {"content": content, **flags, "special": special}


def _json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LoraError(f"cannot read {path} ({e}); the kiln dir's tokenizer is damaged, re-export it") from None
