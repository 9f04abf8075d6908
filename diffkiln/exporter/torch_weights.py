"""The torch half of the weight map: which torch weights LoRAs and refit touch, and their content fingerprints.

`weight_map.map_weights` matches these fingerprints against a graph's initializers by value.
"""

from __future__ import annotations

from diffkiln.exporter.wrappers import torch_name  # imports torch: import this module only to export
from diffkiln.weight_map import Key, content_key


def lora_weights(module, component: str) -> dict[str, object]:
    """{name: torch weight} for Linear and Conv layers and token embeddings (textual inversion)."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)
    found = {}
    for name, sub in module.named_modules():
        if isinstance(sub, kinds) and getattr(sub, "weight", None) is not None:
            if isinstance(sub, torch.nn.Embedding) and not name.endswith("token_embedding"):
                continue
            found[torch_name(component, name) + ".weight"] = sub.weight
    return found


def fingerprint(weights: dict[str, object]) -> dict[Key, list[tuple[str, bool]]]:
    """Content keys of each weight and, for matrices, of its transpose."""
    keys: dict[Key, list[tuple[str, bool]]] = {}
    for name, w in weights.items():
        array = w.detach().cpu().numpy()
        keys.setdefault(content_key(array), []).append((name, False))
        if array.ndim == 2:
            keys.setdefault(content_key(array.T), []).append((name, True))
    return keys
