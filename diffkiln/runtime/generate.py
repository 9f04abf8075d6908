"""`diffkiln run` end to end: files in (init image, latents), pipeline with a progress bar, PNGs and a per-stage
timing table out. The CLI command is a thin call into `generate`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.runtime import images, schedulers
from diffkiln.runtime.pipeline import GenerationParams, Pipeline


def generate(
    kiln_dir: Path, *, image_path=None, latents_path=None, out=Path("out.png"), echo=print, **kw
) -> list[Path]:
    if kw.get("scheduler") not in schedulers.SAMPLERS:
        raise DiffkilnError(
            f"unknown scheduler {kw.get('scheduler')!r}; choose one of {', '.join(schedulers.SAMPLERS)}"
        )
    params = GenerationParams(**kw)
    for name in ("height", "width"):
        value = getattr(params, name)
        if value is not None and value % 8:
            raise DiffkilnError(f"--{name} {value} is not a multiple of 8")
    if image_path is not None:
        params.image = images.load_image(image_path)
    if latents_path is not None:
        params.latents = _load_latents(latents_path)
    out = Path(out)
    if not out.parent.is_dir():
        raise DiffkilnError(f"cannot write {out}: folder {out.parent} does not exist")

    with Pipeline(kiln_dir) as pipe:
        if params.image is not None:
            height = params.height or params.image.shape[0] // 8 * 8
            width = params.width or params.image.shape[1] // 8 * 8
            params.image = images.resize(params.image, height, width)
        params.height, params.width = pipe.size_for(params)
        result = _with_progress(pipe, params)
    paths = images.output_paths(out, params.batch)
    text = images.a1111_parameters(params, str(kiln_dir))
    for i, (image, path) in enumerate(zip(result.to_uint8(), paths, strict=True)):
        images.save_png(image, path, {"parameters": text, "diffkiln": {"index": i, "kiln_dir": str(kiln_dir)}})
    _print_timings(result.timings, echo)
    for path in paths:
        echo(f"wrote {path}")
    return paths


def _load_latents(path: Path) -> np.ndarray:
    try:
        latents = np.load(path)
    except (OSError, ValueError) as e:
        raise DiffkilnError(f"{path} is not a .npy array file ({e.__class__.__name__})") from None
    if latents.ndim != 4 or not np.issubdtype(latents.dtype, np.floating):
        raise DiffkilnError(
            f"--latents must hold a float array [B, 4, h, w], got {latents.dtype} {list(latents.shape)}"
        )
    return latents


def _with_progress(pipe: Pipeline, params: GenerationParams):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    ) as bar:
        task = bar.add_task("steps", total=None)
        return pipe(params, on_step=lambda i, n: bar.update(task, completed=i, total=n))


def _print_timings(timings, echo) -> None:
    for name, seconds in timings.rows():
        echo(f"  {name:24s} {seconds * 1000:10.1f} ms")
    steps = len(timings.unet_steps)
    if steps and timings.unet_total:
        echo(f"  {'it/s':24s} {steps / timings.unet_total:10.2f}")
