"""Image files in and out: Pillow only. PNGs carry their generation parameters as text chunks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError


def load_image(path: Path) -> np.ndarray:
    """An RGB image as float32 [H, W, 3] in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise DiffkilnError(f"no such image file: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DiffkilnError(
            f"{path} is not an image Pillow can read ({e.__class__.__name__}); pass a PNG/JPEG"
        ) from None


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Lanczos resize of a [H, W, 3] float image (what diffusers' image processor does for PIL inputs)."""
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    pil = Image.fromarray((image * 255).round().astype(np.uint8)).resize((width, height), Image.LANCZOS)
    return np.asarray(pil, dtype=np.float32) / 255.0


def a1111_parameters(params, model: str) -> str:
    """The `parameters` text chunk in the format A1111/ComfyUI readers understand."""
    strength = params.strength if params.image is not None else 1.0
    return (
        f"{params.prompt}\nNegative prompt: {params.negative_prompt}\n"
        f"Steps: {params.steps}, Sampler: {params.scheduler}, CFG scale: {params.guidance}, Seed: {params.seed}, "
        f"Size: {params.width}x{params.height}, Model: {model}, Denoising strength: {strength}"
    )


def save_png(image: np.ndarray, path: Path, text: dict[str, str]) -> None:
    """uint8 [H, W, 3] → PNG with text chunks; written to a temp file and renamed into place."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DiffkilnError(f"cannot write {path}: {e.strerror or e}") from None


def output_paths(out: Path, n: int) -> list[Path]:
    """out.png for one image; out-0.png, out-1.png, … for a batch."""
    out = Path(out)
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(n)]
