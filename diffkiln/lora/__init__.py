"""LoRA folding and textual-inversion embeddings for kiln directories (numpy + safetensors + onnx only).

fold_loras(kiln_dir, [(lora, scale), …], out, embeddings=[(file, token)], refit_payload=path) -> report
apply_payload(base_kiln_or_initializers, payload, restore=keys) -> {"component/initializer": value}

tensorfile.py     safetensors read/write with numpy (bf16 included), streaming
names.py          LoRA module names → torch weight names known to weight_map.json (kohya, SGM, diffusers)
formats.py        LoRA files → modules (down, up, alpha) per torch weight
embeddings.py     textual-inversion files → tokenizer entries and token-table rows
plan.py           checks everything against the kiln before writing; one-line errors with counts
initializers.py   reads/rewrites single initializers of a graph, external data included
fold.py           fold_loras: streams the changed initializers into a new kiln dir and/or a refit payload
refit.py          refit payloads and apply_payload
"""

from diffkiln.lora.embeddings import expand_prompt, multi_vector_tokens, read_embedding
from diffkiln.lora.errors import LoraError
from diffkiln.lora.fold import fold_loras
from diffkiln.lora.options import parse_embedding, parse_lora
from diffkiln.lora.refit import apply_payload, read_payload

__all__ = [
    "LoraError",
    "apply_payload",
    "expand_prompt",
    "fold_loras",
    "multi_vector_tokens",
    "parse_embedding",
    "parse_lora",
    "read_embedding",
    "read_payload",
]
