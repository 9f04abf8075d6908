"""Calibration inputs recorded from the pipeline itself: the fp32 kiln runs through diffkiln's runtime on
calibration prompts, and each component's real inputs are kept — the UNet's CFG batch at every step of the
schedule, the VAE decoder's final latents, the text encoders' token ids.

This sits above the stages (like the bench): it drives the runtime, and `optimize` receives what it records,
so the optimizers never import the runtime's loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError

DEFAULT_PROMPTS = Path(__file__).parent / "assets" / "calibration_prompts.txt"
DEMO_CAPTIONS_SEED = 1  # training captions for the demo model: never the held-out ones the acceptance scores


def default_prompts(kiln_dir: Path, count: int) -> list[str]:
    """The shipped prompt file, or for the demo model `count` of its training captions."""
    from diffkiln.bench.fidelity import is_demo_model
    from diffkiln.kiln_reader import read_manifest

    manifest = read_manifest(kiln_dir, check_files=False)

    if is_demo_model(manifest.get("source", {}).get("ref")):
        from diffkiln.demo.data import caption_of, sample_scenes

        return [caption_of(s) for s in sample_scenes(count, np.random.default_rng(DEMO_CAPTIONS_SEED))]
    return read_prompts(DEFAULT_PROMPTS)[:count]


def read_prompts(path: Path) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DiffkilnError(f"cannot read calibration prompts from {path}: {e}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DiffkilnError(f"{path} holds no prompts (one per line; # starts a comment)")
    return prompts


def record(
    kiln_dir: Path,
    prompts: Sequence[str],
    components: Sequence[str],
    *,
    steps: int = 20,
    guidance: float = 7.5,
    sampler: str = "euler",
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, list[dict[str, np.ndarray]]]:
    """component → its recorded feeds, in call order (for the UNet: prompt-major, step-minor)."""
    from diffkiln.runtime.pipeline import GenerationParams, Pipeline
    from diffkiln.runtime.runners import OrtRunner

    recorded: dict[str, list[dict[str, np.ndarray]]] = {c: [] for c in components}

    def factory(path):
        runner = OrtRunner(path)
        component = Path(path).parent.name
        if component in recorded:
            infer = runner._infer

            def recording(feeds):
                recorded[component].append({k: np.array(v, copy=True) for k, v in feeds.items()})
                return infer(feeds)

            runner._infer = recording
        return runner

    with Pipeline(kiln_dir, factory) as pipe:
        for i, prompt in enumerate(prompts):
            params = GenerationParams(
                prompt, steps=steps, guidance=guidance, scheduler=sampler, seed=seed + i, height=height, width=width
            )
            result = pipe(params)
            if "vae_encoder" in recorded:  # img2img's encoder input: the images this generation drew, in [-1, 1]
                name = pipe.manifest["components"]["vae_encoder"]["contract"]["inputs"][0]["name"]
                recorded["vae_encoder"].append({name: (result.images.transpose(0, 3, 1, 2) * 2 - 1).copy()})
            log(f"  calibration: prompt {i + 1}/{len(prompts)} ({steps} steps) recorded")
    return recorded
