"""Prompts at run time: textual-inversion tokens folded into a kiln dir with several vectors (`tok`, `tok_1`, …)
are expanded the way diffusers' `maybe_convert_prompt` does. The kiln's manifest records them (lora/embeddings.py
writes the record); this side only reads it, so the runtime needs nothing from the build stages."""

from __future__ import annotations


def expand_prompt(prompt: str, multi_vector: dict[str, list[str]]) -> str:
    """`tok` → `tok tok_1 … tok_{n-1}` for every multi-vector token, as diffusers' `maybe_convert_prompt` does."""
    for token, tokens in multi_vector.items():
        if len(tokens) > 1 and token in prompt:
            prompt = prompt.replace(token, " ".join(tokens))
    return prompt


def multi_vector_tokens(manifest: dict) -> dict[str, list[str]]:
    """{token: [token, token_1, …]} of the embeddings folded into a kiln dir (its manifest's `lora` record, and
    the records of kiln dirs it was folded from), for `expand_prompt`."""
    found: dict[str, list[str]] = {}
    record = manifest.get("lora")
    while record:
        for e in record.get("embeddings", []):
            for placed in e["components"].values():
                found.setdefault(e["token"], placed["tokens"])
        record = record.get("previous")
    return found
