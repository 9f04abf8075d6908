"""The kiln directory: layout, manifest, and all-or-nothing writes.

    manifest.json  weight_map.json  tokenizer[_2]/  scheduler/  <component>/model.onnx[.data]

Every write goes to a temporary sibling and is renamed into place, so a failed stage never leaves a
half-written directory behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from diffkiln.errors import KilnError, OutputError

MANIFEST = "manifest.json"
WEIGHT_MAP = "weight_map.json"
FORMAT_VERSION = 1


def model_path(kiln: Path, component: str) -> Path:
    return kiln / component / "model.onnx"


def write_json(path: Path, data) -> None:
    """Atomic JSON write: temp file in the same folder, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_manifest(kiln: Path) -> dict:
    path = Path(kiln) / MANIFEST
    if not Path(kiln).is_dir():
        raise KilnError(f"no such kiln directory: {kiln}; create one with `diffkiln export SOURCE -o {kiln}`")
    if not path.is_file():
        raise KilnError(f"{kiln} has no {MANIFEST}; it is not a kiln directory (run `diffkiln export` first)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise KilnError(f"{path} is corrupt (not JSON); re-export with --force") from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def component_files(kiln: Path, component: str) -> list[Path]:
    folder = kiln / component
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def components_bytes(kiln: Path, names: Iterable[str]) -> int:
    """Bytes on disk of the named components' files."""
    return sum(f.stat().st_size for name in names for f in component_files(kiln, name))


def check_writable(out: Path) -> None:
    """Fail before any work when `out` cannot be created (parent missing, read-only, or a file)."""
    parent = out.parent
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory; choose another -o path")
    if not parent.is_dir():
        raise OutputError(f"cannot write {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {out}: no write permission in {parent}")


def human_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def check_space(out: Path, need: int) -> None:
    """Fail before any work when the disk under `out` has less than `need` bytes free."""
    free = shutil.disk_usage(Path(out).parent).free
    if free < need:
        raise OutputError(
            f"cannot write {out}: it needs about {human_bytes(need)} and its disk has {human_bytes(free)} free; "
            "free some space or choose another output path"
        )


@contextlib.contextmanager
def full_disk_is_an_error(out: Path) -> Iterator[None]:
    """A full disk (ENOSPC, EDQUOT) inside becomes a one-line OutputError naming `out`; the caller cleans up."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise OutputError(
            f"cannot write {out}: its disk is full; free some space or choose another output path (nothing was written)"
        ) from None


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield a temp dir next to `out`; on success it replaces `out` in one rename, on failure it is removed.
    A full disk becomes an OutputError."""
    out = Path(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror}") from None
    try:
        with full_disk_is_an_error(out):
            yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        os.chmod(out, 0o755)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
