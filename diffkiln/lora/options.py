"""Command-line values for LoRA folding: `FILE[:SCALE]` and `FILE[:TOKEN]`, split at the last colon only when
what follows it is a scale (or, for embeddings, when what precedes it is an existing file), so paths with
colons still work."""

from __future__ import annotations

from pathlib import Path

from diffkiln.lora.errors import LoraError


def parse_lora(text: str) -> tuple[Path, float]:
    """`a.safetensors:0.8` → (Path("a.safetensors"), 0.8); no scale means 1.0."""
    path, sep, scale = text.rpartition(":")
    if sep:
        try:
            return Path(path), float(scale)
        except ValueError:
            if not Path(text).exists():
                raise LoraError(
                    f"--lora {text}: {scale!r} is not a scale; write FILE:SCALE, e.g. a.safetensors:0.8"
                ) from None
    return Path(text), 1.0


def parse_embedding(text: str) -> tuple[Path, str | None]:
    """`emb.safetensors:mytoken` → (Path("emb.safetensors"), "mytoken"); no token: the file's own (or its name)."""
    path, sep, token = text.rpartition(":")
    if sep and token and Path(path).is_file() and not Path(text).exists():
        return Path(path), token
    return Path(text), None
