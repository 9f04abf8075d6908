"""Precision fidelity on a model that draws something: the same captions and seeds through an fp32 kiln and its
fp16/int8 counterparts, per-image PSNR against the fp32 kiln and prompt adherence (the demo model's evaluator).

    from diffkiln.bench.precision import compare
    result = compare({"fp32": (kiln32, None), "int8": (kiln8, None), "openvino-int8": (kiln8, openvino_factory)},
                     captions, steps=20)

The first entry is the reference. Used by benchmarks/precision_demo.py (the 64 held-out captions) and the tests
(a subset).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from diffkiln.bench.fidelity import adherence, psnr


def generate_all(kiln_dir: Path, factory, captions: list[str], steps: int, log: Callable[[str], None]) -> np.ndarray:
    """[N, H, W, 3] images, caption i drawn with seed i."""
    from diffkiln.runtime.pipeline import GenerationParams, Pipeline
    from diffkiln.runtime.runners import OrtRunner

    images = []
    with Pipeline(kiln_dir, factory or OrtRunner) as pipe:
        for i, caption in enumerate(captions):
            images.append(pipe(GenerationParams(caption, steps=steps, seed=i)).images[0])
            if (i + 1) % 16 == 0:
                log(f"  {kiln_dir.name}: {i + 1}/{len(captions)} images")
    return np.stack(images)


def compare(
    paths: dict[str, tuple[Path, object]], captions: list[str], steps: int = 20, log: Callable[[str], None] = print
) -> dict:
    """{path: {"psnr_db": [per image], "psnr_median_db", "adherence": {...}, "images": array}}, the first path
    being the reference (its PSNR entries are absent)."""
    result: dict[str, dict] = {}
    reference = None
    for name, (kiln_dir, factory) in paths.items():
        log(f"{name}: generating {len(captions)} images ({steps} steps)")
        images = generate_all(Path(kiln_dir), factory, captions, steps, log)
        entry = {"images": images, "adherence": adherence(images, captions)}
        if reference is None:
            reference = images
        else:
            values = [psnr(a, b) for a, b in zip(images, reference, strict=True)]
            entry |= {"psnr_db": values, "psnr_median_db": float(np.median(values)), "psnr_min_db": min(values)}
        result[name] = entry
    return result
