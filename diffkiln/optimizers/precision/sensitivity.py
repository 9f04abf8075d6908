"""INT8 sensitivity and recipe: which layer groups may be quantized for a fidelity bar.

Groups are a UNet block (conv_in, down_blocks.i, mid_block, up_blocks.i, conv_out …) × an op kind (conv,
attention projections, feed-forward, other linear). Each group is quantized alone and scored by the UNet output's
PSNR against fp32 on held-back calibration inputs; when the whole graph misses `min_psnr`, the most sensitive
groups go back to float one at a time until it is met.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np


def group_of(node_name: str, op_type: str) -> str:
    """`/model/down_blocks.1/attentions.0/…/attn1/to_q/MatMul` → `down_blocks.1/attention`."""
    parts = [p for p in node_name.split("/") if p and p != "model"]
    block = next((p for p in parts if re.fullmatch(r"(down_blocks|up_blocks)\.\d+|mid_block", p)), None)
    block = block or (parts[0] if parts else "graph")
    if op_type == "Conv":
        kind = "conv"
    elif re.search(r"/attn\d?/", node_name):
        kind = "attention"
    elif "/ff/" in node_name:
        kind = "feed-forward"
    else:
        kind = "linear"
    return f"{block}/{kind}"


def psnr_db(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    """PSNR of outputs against references, over the references' whole range (capped at 100 dB)."""
    ref_all = np.concatenate([r.ravel() for r in ref]).astype(np.float64)
    got_all = np.concatenate([g.ravel() for g in got]).astype(np.float64)
    if not np.isfinite(got_all).all():
        return float("-inf")
    mse = float(np.mean((got_all - ref_all) ** 2))
    span = float(ref_all.max() - ref_all.min()) or 1.0
    return 100.0 if mse <= span**2 * 1e-10 else float(10 * np.log10(span**2 / mse))


def search(
    groups: dict[str, list[str]],
    score: Callable[[list[str]], float],
    min_psnr: float,
    log: Callable[[str], None] = lambda _: None,
) -> dict:
    """`score(excluded_nodes)` quantizes all but those nodes and returns the PSNR. Returns the recipe part:
    per-group PSNR alone, the groups kept in float, and the final PSNR."""
    everything = [n for nodes in groups.values() for n in nodes]
    full = score([])
    result = {"min_psnr_db": min_psnr, "all_groups_psnr_db": full, "groups": {}, "kept_groups": []}
    if full >= min_psnr:
        result["psnr_db"] = full
        log(f"  int8: {full:.1f} dB with every group quantized (≥ {min_psnr:g} dB)")
        return result
    for name, nodes in groups.items():
        alone = score([n for n in everything if n not in set(nodes)])
        result["groups"][name] = alone
        log(f"  int8 sensitivity: {name} alone {alone:.1f} dB")
    excluded: list[str] = []
    psnr = full
    for name in sorted(result["groups"], key=result["groups"].get):
        excluded += groups[name]
        result["kept_groups"].append(name)
        psnr = score(excluded)
        log(f"  int8: {name} kept in float → {psnr:.1f} dB")
        if psnr >= min_psnr:
            break
    result["psnr_db"] = psnr
    return result
