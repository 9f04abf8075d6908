"""`diffkiln run` end to end: files in (init image, latents), pipeline with a progress bar, PNGs and a per-stage
timing table out. The CLI command is a thin call into `generate`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffkiln import kiln
from diffkiln.errors import DiffkilnError
from diffkiln.runtime import images, refit, schedulers
from diffkiln.runtime.pipeline import GenerationParams, Pipeline
from diffkiln.runtime.pipelines import open_pipeline
from diffkiln.runtime.runners import OrtRunner


def generate(
    kiln_dir: Path,
    *,
    image_path=None,
    latents_path=None,
    refit_payload=None,
    out=Path("out.png"),
    echo=print,
    runner_factory=None,
    **kw,
) -> list[Path]:
    if kw.get("guidance") is None:  # the model's own default: SD's CFG 7.5, Flux's distilled guidance 3.5
        flux = kiln.read_manifest(Path(kiln_dir))["pipeline"]["kind"] == "flux"
        kw["guidance"] = 3.5 if flux else 7.5
    if kw.get("scheduler") not in schedulers.SAMPLERS:
        raise DiffkilnError(f"unknown sampler {kw.get('scheduler')!r}; choose one of {', '.join(schedulers.SAMPLERS)}")
    params = GenerationParams(**kw)
    params.check()
    paths = images.output_paths(Path(out), params.batch)
    for path in paths:
        images.check_output(path)
    if image_path is not None:
        params.image = images.load_image(image_path)
    if latents_path is not None:
        params.latents = _load_latents(latents_path)
    payload = refit.read_payload(refit_payload) if refit_payload is not None else None

    with open_pipeline(kiln_dir, runner_factory or OrtRunner) as pipe:
        if payload is not None:  # LoRAs swapped into refittable engines, from the base weights
            done = refit.apply(pipe.runners, refit.RefitState(), payload, kiln.manifest_sha256(kiln_dir), refit_payload)
            echo(f"refitted {done} engine(s) with {refit_payload}")
        if params.image is not None:  # the init image's size rounded down, unless a size is given
            params.height = params.image.shape[0] // 8 * 8 if params.height is None else params.height
            params.width = params.image.shape[1] // 8 * 8 if params.width is None else params.width
        params.height, params.width = pipe.size_for(params)  # the one size rule, before anything is allocated
        if params.image is not None:
            params.image = images.resize(params.image, params.height, params.width)
        result = _with_progress(pipe, params)
        backend = pipe.backend
    text = images.a1111_parameters(params, str(kiln_dir)) + f", Backend: {backend}"
    for i, (image, path) in enumerate(zip(result.to_uint8(), paths, strict=True)):
        meta = {"index": i, "kiln_dir": str(kiln_dir), "backend": backend}
        images.save_image(image, path, {"parameters": text, "diffkiln": meta})
    echo(f"  {'backend':28s} {backend:>10s}")
    _print_timings(result.timings, echo)
    for path in paths:
        echo(f"wrote {path}")
    return paths


MAX_LATENT_BYTES = 1 << 30


def _load_latents(path: Path) -> np.ndarray:
    """A float [B, C, h, w] .npy file, memory-mapped so a header claiming a huge shape costs nothing."""
    try:
        latents = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DiffkilnError(f"no such file: {path}") from None
    except (OSError, ValueError, EOFError) as e:
        raise DiffkilnError(
            f"{path} is not a .npy array file ({e.__class__.__name__}); save one with numpy.save"
        ) from None
    if not isinstance(latents, np.ndarray):
        raise DiffkilnError(f"{path} is not a single .npy array (an .npz archive?); save one with numpy.save")
    if latents.ndim != 4 or not np.issubdtype(latents.dtype, np.floating) or latents.nbytes > MAX_LATENT_BYTES:
        raise DiffkilnError(
            f"--latents must hold a float array [B, 4, h, w] under 1 GB, got {latents.dtype} {list(latents.shape)}"
        )
    return np.array(latents, dtype=np.float32)


def _with_progress(pipe: Pipeline, params: GenerationParams):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    ) as bar:
        task = bar.add_task("steps", total=None)
        return pipe(params, on_step=lambda i, n: bar.update(task, completed=i, total=n))


def _print_timings(timings, echo) -> None:
    for name, seconds in timings.rows():
        echo(f"  {name:28s} {seconds * 1000:10.1f} ms")
    steps = len(timings.unet_steps)
    if steps and timings.unet_total:
        echo(f"  {'it/s':28s} {steps / timings.unet_total:10.2f}")
