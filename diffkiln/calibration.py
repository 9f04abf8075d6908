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
CALIBRATION_STEPS = 20  # every step of a 20-step schedule: the timesteps the UNet really sees
DEMO_CAPTIONS_SEED = 1  # training captions for the demo model: never the held-out ones the acceptance scores


def default_prompts(kiln_dir: Path, count: int) -> list[str]:
    """The shipped prompt file, or for the demo model `count` of its training captions."""
    from diffkiln.kiln import read_manifest
    from diffkiln.models import is_demo_model

    manifest = read_manifest(kiln_dir, check_files=False)

    if is_demo_model(manifest.get("source", {}).get("ref")):
        from diffkiln.demo.data import caption_of, sample_scenes

        return [caption_of(s) for s in sample_scenes(count, np.random.default_rng(DEMO_CAPTIONS_SEED))]
    return read_prompts(DEFAULT_PROMPTS)[:count]


def read_prompts(path: Path, what: str = "calibration prompts") -> list[str]:
    """A prompts file (calibration's, or the bench's --prompts): one prompt per line; blank lines and lines
    starting with # are ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DiffkilnError(f"cannot read {what} from {path}: {e}") from None
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
    guidance: float | None = None,
    sampler: str = "euler",
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, list[dict[str, np.ndarray]]]:
    """component → its recorded feeds, in call order (for the UNet: prompt-major, step-minor)."""
    from diffkiln.runtime.pipeline import GenerationParams
    from diffkiln.runtime.pipelines import open_pipeline
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

    with open_pipeline(kiln_dir, factory) as pipe:
        guidance = guidance if guidance is not None else 3.5 if pipe.denoiser == "transformer" else 7.5
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


def optimize_with_calibration(
    kiln_dir: Path,
    target: str,
    precision: str,
    *,
    prompts_file: Path | None = None,
    count: int = 4,
    size: int | None = None,
    components: list[str] | None = None,
    options=None,
    recipe_file: Path | None = None,
    out: Path | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """`diffkiln optimize` with fp16/int8 calibration recorded from the pipeline on `count` prompts (the file's,
    or the defaults): what the CLI and the bench both run."""
    import hashlib
    import json

    from diffkiln.optimizers.optimize import optimize

    kiln_dir = Path(kiln_dir)
    if count < 1:
        raise DiffkilnError(f"--calib-prompts {count} must be ≥ 1")
    recipe = read_recipe(recipe_file) if recipe_file else None
    calibration = key = None
    if precision != "fp32":
        prompts = read_prompts(prompts_file)[:count] if prompts_file else default_prompts(kiln_dir, count)
        key = {
            "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
            "prompts": len(prompts),
            "steps": CALIBRATION_STEPS,
            **({"size": size} if size else {}),
        }

        def calibration(chosen: list[str]) -> dict:
            return record(kiln_dir, prompts, chosen, steps=CALIBRATION_STEPS, height=size, width=size, log=log)

    return optimize(
        kiln_dir,
        target,
        precision,
        out,
        force=force,
        log=log,
        components=components,
        calibration=calibration,
        calibration_key=key,
        options=options,
        recipe=recipe,
    )


def read_recipe(path: Path) -> dict:
    """A precision_report.json given back as --recipe: an object whose components hold finite ranges."""
    import json
    import math

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffkilnError(f"cannot read the recipe {path}: {e}; pass a precision_report.json") from None
    components = data.get("components") if isinstance(data, dict) else None
    if not isinstance(components, dict) or not all(isinstance(c, dict) for c in components.values()):
        raise DiffkilnError(f"{path} is not a precision recipe (no components); pass a precision_report.json")
    for name, record in components.items():
        amax = record.get("amax", {})
        kept = record.get("kept", {})
        if not isinstance(amax, dict) or not isinstance(kept, dict):
            raise DiffkilnError(f"{path}: components.{name} has a malformed amax/kept map")
        for tensor, value in amax.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise DiffkilnError(f"{path}: the range of {tensor} is {value!r}, not a finite number ≥ 0")
    return data
