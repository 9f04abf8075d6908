"""Image files in and out: Pillow only. PNGs carry their generation parameters as text chunks."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError

MAX_IMAGE_PIXELS = 8192 * 8192  # init images larger than this are refused before decoding


def load_image(path: Path) -> np.ndarray:
    """An RGB image as float32 [H, W, 3] in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise DiffkilnError(
                        f"{path} is {img.width}×{img.height}, over {MAX_IMAGE_PIXELS // 1_000_000} megapixels; "
                        "resize it first"
                    )
                return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise DiffkilnError(f"no such image file: {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DiffkilnError(f"{path} claims more pixels than Pillow will decode (a decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
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


FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def check_output(path: Path) -> None:
    """Before any work: `path` names a format we write, in a folder that exists, and is new or a regular file
    (a device, fifo or folder is never replaced)."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise DiffkilnError(f"cannot write {path}: unknown image type {path.suffix!r}; use {', '.join(FORMATS)}")
    if not path.parent.is_dir():
        raise DiffkilnError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise DiffkilnError(f"{path} exists and is not a regular file; choose another -o")


def save_image(image: np.ndarray, path: Path, text: dict[str, str]) -> None:
    """uint8 [H, W, 3] → the format the extension names (PNG keeps the text as chunks, JPEG/WebP as EXIF
    UserComment); written to a temp file and renamed into place."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    check_output(path)
    fmt = FORMATS[path.suffix.lower()]
    chunks = {k: v if isinstance(v, str) else json.dumps(v) for k, v in text.items()}
    options: dict = {}
    if fmt == "PNG":
        info = PngInfo()
        for key, value in chunks.items():
            info.add_text(key, value)
        options["pnginfo"] = info
    else:
        exif = Image.Exif()
        exif[0x9286] = chunks.get("parameters", "")  # UserComment: where A1111 keeps JPEG/WebP parameters
        options.update(exif=exif.tobytes(), quality=95)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        Image.fromarray(image).save(tmp, format=fmt, **options)
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
