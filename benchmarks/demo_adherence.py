"""Prompt adherence and speed of the demo model (diffkiln/assets/demo) on its 64 held-out captions.

Every backend is one function `(captions, seeds) -> uint8 images (N, 64, 64, 3)` in BACKENDS; scoring
(`diffkiln.eval.adherence`, pixels only) and timing are shared, so backends are compared on the same prompts,
seeds and evaluator. Today: the PyTorch reference (diffusers StableDiffusionPipeline).

    .venv/bin/python benchmarks/demo_adherence.py [--guidance 5.0] [--grid out/demo_grid.png]

Prints accuracy per attribute and the latency of one 64×64 image (20 steps, classifier-free guidance: warm-up,
then the median of measured runs) and writes benchmarks/results/demo_adherence.json.
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

from diffkiln.demo.data import heldout_captions
from diffkiln.eval.adherence import ATTRIBUTES, score

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "diffkiln" / "assets" / "demo"
RESULTS = ROOT / "benchmarks" / "results" / "demo_adherence.json"
STEPS = 20
GUIDANCE = 5.0
SEEDS = list(range(64))  # one per held-out caption
TIMED_RUNS = 5

Backend = Callable[[Sequence[str], Sequence[int]], np.ndarray]


# ---------------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _reference_pipeline(model: Path):
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(os.cpu_count() or 1)
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_reference(
    captions: Sequence[str], seeds: Sequence[int], *, steps: int = STEPS, guidance: float = GUIDANCE, model=MODEL
) -> np.ndarray:
    """The PyTorch reference: diffusers' StableDiffusionPipeline with the folder's DDIM scheduler.

    Each image has its own torch.Generator seeded with its seed, so an image does not depend on its batch.
    Returns uint8 (N, 64, 64, 3).
    """
    import torch

    pipe = _reference_pipeline(Path(model))
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    with torch.no_grad():
        out = pipe(
            list(captions), num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="np"
        )
    return (out.images * 255).round().astype(np.uint8)


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


def evaluate(name: str, backend: Backend, captions: list[str], seeds: list[int]) -> tuple[dict, np.ndarray]:
    """Generate, score and time one backend -> (its JSON record, the images)."""
    start = time.perf_counter()
    images = backend(captions, seeds)
    batch_seconds = time.perf_counter() - start
    result = score(images, captions)
    latency = seconds_per_image(backend, captions[0], seeds[0])
    accuracy = result["accuracy"]
    print(f"{name}: " + "  ".join(f"{a} {accuracy[a]:.1%}" for a in (*ATTRIBUTES, "all")))
    print(f"{name}: {latency:.3f} s per image (batch 1), {batch_seconds:.1f} s for all {len(captions)} in one batch")
    record = {
        "accuracy": accuracy,
        "seconds_per_image": round(latency, 4),
        "seconds_batch": round(batch_seconds, 2),
        "per_image": result["per_image"],
    }
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
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    parser.add_argument("--model", type=Path, default=MODEL, help="a demo-model diffusers folder")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON report")
    parser.add_argument("--grid", type=Path, help="also save the generated images as one PNG grid (per backend)")
    args = parser.parse_args()

    backends: dict[str, Backend] = {
        "diffusers": functools.partial(generate_reference, guidance=args.guidance, model=args.model),
        # "diffkiln-ort": the slim ONNX Runtime pipeline joins here, same captions and seeds.
    }
    captions = heldout_captions()
    report = {
        "model": _display(args.model),
        "captions": "diffkiln.demo.data.heldout_captions()",
        "n": len(captions),
        "seeds": f"{SEEDS[0]}..{SEEDS[-1]} (one per caption)",
        "steps": STEPS,
        "guidance_scale": args.guidance,
        "image_size": 64,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "backends": {},
    }
    for name, backend in backends.items():
        report["backends"][name], images = evaluate(name, backend, captions, SEEDS)
        if args.grid:
            save_grid(images, args.grid.with_stem(f"{args.grid.stem}_{name}"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {_display(args.out)}")


def _display(path: Path) -> str:
    """A path relative to the repository when inside it (stable across checkouts), else absolute."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


if __name__ == "__main__":
    main()
