"""Prompt adherence and speed of the demo model (diffkiln/assets/demo) on its 64 held-out captions.

Every backend is one function `(captions, seeds) -> float images (N, 64, 64, 3) in [0, 1]`; scoring
(`diffkiln.eval.adherence`, pixels only), fidelity and timing are shared, so backends are compared on the same
prompts, initial noise and evaluator:
- diffusers: the PyTorch reference, StableDiffusionPipeline with the folder's DDIM scheduler;
- diffkiln-ort: the slim runtime (ONNX Runtime fp32) on the exported kiln, DDIM, fed the very latents diffusers
  draws from each seed, so its images must match the reference's (PSNR).

    .venv/bin/python benchmarks/demo_adherence.py [--guidance 5.0] [--grid out/demo_grid.png]

Prints accuracy per attribute, PSNR against the reference (worst and mean over the images) and the latency of one
64×64 image (20 steps with classifier-free guidance: a warm-up, then the median of timed runs), and writes
benchmarks/results/demo_adherence.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from diffkiln.bench.fidelity import psnr
from diffkiln.demo import sampling
from diffkiln.demo.data import heldout_captions
from diffkiln.eval.adherence import ATTRIBUTES, score

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "demo_adherence.json"
SEEDS = list(range(64))  # one per held-out caption
TIMED_RUNS = 5

Backend = Callable[[Sequence[str], Sequence[int]], np.ndarray]


# ---------------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _diffusers(model: Path):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return sampling.diffusers_pipeline(model)


@functools.cache
def _diffkiln(model: Path):
    from diffkiln.models import resolve_model
    from diffkiln.runtime.pipeline import Pipeline

    return Pipeline(resolve_model(str(model), log=lambda _msg: None))  # exports the folder into the cache once


def pytorch_reference(captions: Sequence[str], seeds: Sequence[int], *, guidance: float, model: Path) -> np.ndarray:
    return sampling.diffusers_images(_diffusers(model), captions, seeds, guidance=guidance)


def diffkiln_ort(captions: Sequence[str], seeds: Sequence[int], *, guidance: float, model: Path) -> np.ndarray:
    return sampling.diffkiln_images(_diffkiln(model), captions, seeds, guidance=guidance)


# ---------------------------------------------------------------------------------------------------------------
# Shared measurement
# ---------------------------------------------------------------------------------------------------------------


def seconds_per_image(backend: Backend, caption: str, seed: int, runs: int = TIMED_RUNS) -> float:
    """Latency of one image (batch 1): one warm-up call, then the median of `runs` timed calls."""
    backend([caption], [seed])
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        backend([caption], [seed])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def evaluate(
    name: str, backend: Backend, captions: list[str], seeds: list[int], reference: np.ndarray | None = None
) -> tuple[dict, np.ndarray]:
    """Generate, score and time one backend, and compare its images with `reference`'s -> (JSON record, images)."""
    start = time.perf_counter()
    images = backend(captions, seeds)
    all_seconds = time.perf_counter() - start
    result = score(images, captions)
    latency = seconds_per_image(backend, captions[0], seeds[0])
    accuracy = result["accuracy"]
    print(f"{name}: " + "  ".join(f"{a} {accuracy[a]:.1%}" for a in (*ATTRIBUTES, "all")))
    print(f"{name}: {latency:.3f} s per image (batch 1), {all_seconds:.1f} s for all {len(captions)}")
    record = {
        "accuracy": accuracy,
        "seconds_per_image": round(latency, 4),
        "seconds_all": round(all_seconds, 2),
        "per_image": result["per_image"],
    }
    if reference is not None:
        db = [psnr(image, ref) for image, ref in zip(images, reference, strict=True)]
        record["psnr_db"] = {"min": round(min(db), 2), "mean": round(float(np.mean(db)), 2)}
        print(f"{name}: PSNR vs diffusers min {min(db):.1f} dB, mean {np.mean(db):.1f} dB")
    return record, images


def save_grid(images: np.ndarray, path: Path, columns: int = 8) -> None:
    """All images in one PNG, row-major in caption order."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guidance", type=float, default=sampling.GUIDANCE)
    parser.add_argument("--model", type=Path, default=sampling.MODEL, help="a demo-model diffusers folder")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON report")
    parser.add_argument("--grid", type=Path, help="also save the generated images as one PNG grid (per backend)")
    args = parser.parse_args()

    backends: dict[str, Backend] = {
        "diffusers": functools.partial(pytorch_reference, guidance=args.guidance, model=args.model),
        "diffkiln-ort": functools.partial(diffkiln_ort, guidance=args.guidance, model=args.model),
    }
    captions = heldout_captions()
    report = {
        "model": _display(args.model),
        "captions": "diffkiln.demo.data.heldout_captions()",
        "n": len(captions),
        "seeds": f"{SEEDS[0]}..{SEEDS[-1]} (one per caption)",
        "steps": sampling.STEPS,
        "scheduler": sampling.SCHEDULER,
        "guidance_scale": args.guidance,
        "image_size": 64,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "backends": {},
    }
    reference = None
    for name, backend in backends.items():
        report["backends"][name], images = evaluate(name, backend, captions, SEEDS, reference)
        reference = images if reference is None else reference  # the first backend is the reference
        if args.grid:
            save_grid((images * 255).round().astype(np.uint8), args.grid.with_stem(f"{args.grid.stem}_{name}"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {_display(args.out)}")


def _display(path: Path) -> str:
    """A path relative to the repository when inside it (stable across checkouts), else absolute."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


if __name__ == "__main__":
    main()
