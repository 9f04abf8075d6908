"""Where `diffkiln run -m X` finds its kiln directory: X itself if it is one, else X exported (once) into the
user cache. Without -m, the bundled demo model (diffkiln/assets/demo) is used the same way."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from diffkiln import kiln
from diffkiln.errors import DiffkilnError, SourceError

DEFAULT_MODEL = "demo"  # the trained demo model shipped in diffkiln/assets/demo (tools/train_demo.py)


def is_demo_model(*refs: str | None) -> bool:
    """True when any of `refs` (what the user passed, the source behind it) is diffkiln's demo model: the only
    model whose images the prompt-adherence evaluator can judge, and whose calibration uses its training captions."""
    from diffkiln.exporter.sources import BUNDLED

    demo = BUNDLED["demo"]
    return any(ref and (ref == "demo" or Path(ref).expanduser().resolve() == demo) for ref in refs)


def cache_dir() -> Path:
    """$DIFFKILN_CACHE, else $XDG_CACHE_HOME/diffkiln, else ~/.cache/diffkiln."""
    if os.environ.get("DIFFKILN_CACHE"):
        return Path(os.environ["DIFFKILN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffkiln"


def resolve_model(ref: str | None, log=print, arch: str | None = None) -> Path:
    """A kiln directory for `ref` (a kiln dir, a diffusers folder, a single-file checkpoint or a preset), exporting
    into the cache if needed; `arch` is a single file's --arch (single_file.ARCHS), None to detect it."""
    ref = ref or DEFAULT_MODEL
    path = Path(ref).expanduser()
    if kiln.is_kiln_dir(path):  # diffkiln's own, or an optimum ONNX folder
        return path
    return export_to_cache(ref, log=log, arch=arch)


def export_to_cache(ref: str, force: bool = False, log=print, arch: str | None = None) -> Path:
    """Export `ref` (a diffusers folder, a single-file checkpoint or a preset) into the user cache, once: the kiln
    dir `run -m ref` uses. The cache key is the source's content fingerprint (a single file's includes its arch), so
    a changed folder or file gets a new kiln, never a stale one."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("diffusers") is None:
        raise DiffkilnError(f"{ref} is not a kiln directory, and exporting it needs `pip install diffkiln[export]`")
    source = _open(ref, arch)
    slug = re.sub(r"[^\w.-]+", "_", Path(source.ref).name)
    # 128 bits of the content fingerprint: two different folders never share a cache entry
    out = cache_dir() / "kilns" / f"{slug}-{source.fingerprint().split(':')[-1][:32]}"
    if force or not (out / kiln.MANIFEST).is_file():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DiffkilnError(
                f"cannot create the cache folder {out.parent}: {e.strerror}; set DIFFKILN_CACHE"
            ) from None
        from diffkiln.exporter.kiln_export import ExportOptions, export  # onnx + torch: only when exporting

        log(f"exporting {ref} into {out} (once)")
        export(source, out, ExportOptions(force=force, wait=True), log=log)  # another run may be exporting it
    return out


def _open(ref: str, arch: str | None):
    """open_source, except that a single file whose arch its keys cannot tell (SD 2.x: 512 px noise or 768 px
    v-prediction) is told how to give one: `run -m` and cache exports take no --arch, `export -o` does."""
    from diffkiln.exporter.resolve import open_source

    try:
        return open_source(ref, arch)
    except SourceError as e:
        if arch is not None or "--arch" not in str(e):  # without an arch, only that ambiguity asks for one
            raise
        raise SourceError(
            f"{ref} is a Stable Diffusion 2.x checkpoint whose keys do not say whether it predicts noise (512 px) "
            "or velocity (768 px), and `run -m` (like `export` without -o) takes no --arch: export it with "
            f"`diffkiln export {ref} --arch sd21 -o DIR` (or --arch sd21-v), then run -m DIR"
        ) from None
