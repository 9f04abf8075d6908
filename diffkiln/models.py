"""Where `diffkiln run -m X` finds its kiln directory: X itself if it is one, else X exported (once) into the
user cache. Without -m, the embedded default model is used the same way."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from diffkiln import kiln
from diffkiln.errors import DiffkilnError

DEFAULT_MODEL = "tiny"  # until the trained demo model ships inside the package


def cache_dir() -> Path:
    """$DIFFKILN_CACHE, else $XDG_CACHE_HOME/diffkiln, else ~/.cache/diffkiln."""
    if os.environ.get("DIFFKILN_CACHE"):
        return Path(os.environ["DIFFKILN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffkiln"


def resolve_model(ref: str | None, log=print) -> Path:
    """A kiln directory for `ref` (a kiln dir, a diffusers folder or a preset), exporting into the cache if needed."""
    ref = ref or DEFAULT_MODEL
    path = Path(ref).expanduser()
    if (path / kiln.MANIFEST).is_file():
        return path
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("diffusers") is None:
        raise DiffkilnError(f"{ref} is not a kiln directory, and exporting it needs `pip install diffkiln[export]`")
    from diffkiln.exporter import export, open_source

    source = open_source(ref)
    slug = re.sub(r"[^\w.-]+", "_", Path(source.ref).name)
    out = cache_dir() / "kilns" / f"{slug}-{source.fingerprint().split(':')[-1][:12]}"
    if not (out / kiln.MANIFEST).is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        log(f"exporting {ref} into {out} (once)")
        export(source, out, log=log)
    return out
