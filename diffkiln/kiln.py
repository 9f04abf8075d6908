"""The kiln directory: layout, and the one stage writer every stage writes its output through.

    manifest.json  model_index.json  weight_map.json  tokenizer[_2]/  scheduler/
    <component>/model.onnx[.data] + config.json

`StageWriter(out, …)` owns everything about writing a kiln dir, so export, optimize, lora (and the stages that
come next) cannot each get it subtly wrong:

- output checks: `out` is a new or empty folder, or a kiln dir that may be replaced (up to date: nothing to do;
  `--force`, or the same stage's own stale output: replaced); a non-kiln folder with files in it is never
  replaced, even with `--force`; `out` may not be, contain or lie inside a source; a symlink is refused;
- an exclusive lock per output path (a second writer fails clearly, or waits when asked: the user cache);
- staging: a hidden temp folder beside `out`, renamed into place in one step when the stage finishes and
  removed on any failure; staging folders of killed processes are swept on the next write to the same place;
- support files (tokenizers, scheduler) copied from the source kiln, file hashes, the manifest with the
  stage's stamp (what the up-to-date check compares) and its reports;
- the interop files (model_index.json, each component's config.json) that optimum, optimum-intel and ONNX
  Runtime's SD tools read, written from the manifest's record of them by `finish` (interop.py).

Reading an untrusted kiln dir (schema, path confinement) is `kiln_reader.py`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from diffkiln import interop
from diffkiln.errors import DISK_FULL, KilnError, OutputError
from diffkiln.kiln_reader import MANIFEST, WEIGHT_MAP, check_paths, inside, sha256_of, validate
from diffkiln.kiln_reader import read_manifest as _read_manifest
from diffkiln.kiln_reader import read_weight_map as _read_weight_map

FORMAT_VERSION = 1
SCHEDULER = "scheduler"


def model_path(kiln: Path, component: str) -> Path:
    return kiln / component / "model.onnx"


def read_manifest(kiln_dir: Path, *, check_files: bool = True) -> dict:
    """The kiln dir's manifest, validated and with every path it names confined (see kiln_reader); an optimum
    ONNX folder's is made from its configs and graphs (interop.py), then checked the same way."""
    kiln_dir = Path(kiln_dir)
    bare = kiln_dir.is_dir() and not (kiln_dir / MANIFEST).exists() and not (kiln_dir / MANIFEST).is_symlink()
    if bare and interop.is_optimum_dir(kiln_dir):
        manifest = interop.optimum_manifest(kiln_dir)
        validate(manifest, kiln_dir / interop.INDEX)
        if check_files:
            check_paths(kiln_dir, manifest)
        return manifest
    return _read_manifest(kiln_dir, check_files=check_files)


def is_kiln_dir(path: Path) -> bool:
    """A folder the stages read as a kiln dir: it has a manifest, or is an optimum ONNX folder."""
    path = Path(path)
    return (path / MANIFEST).is_file() or interop.is_optimum_dir(path)


def manifest_sha256(kiln_dir: Path) -> str:
    """What a stage's stamp records of its input: the manifest file's sha256, or for an optimum folder that of
    the manifest made from it (which changes with any file's size or modification time)."""
    path = Path(kiln_dir) / MANIFEST
    if not path.exists() and interop.is_optimum_dir(kiln_dir):
        blob = json.dumps(read_manifest(kiln_dir, check_files=False), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()
    return file_sha256(path)


def read_weight_map(kiln_dir: Path) -> dict:
    """weight_map.json, validated (kiln_reader); an optimum folder has none, so it is read off its graphs'
    names (weight_map.map_from_graph: onnx is imported then, by the stages that fold or rewrite weights)."""
    kiln_dir = Path(kiln_dir)
    if not (kiln_dir / WEIGHT_MAP).exists() and interop.is_optimum_dir(kiln_dir):
        from diffkiln.weight_map import map_from_graph

        manifest = read_manifest(kiln_dir)
        return {name: map_from_graph(model_path(kiln_dir, name), name) for name in manifest["components"]}
    return _read_weight_map(kiln_dir)


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` as a hard link to `src` (no bytes copied), or a copy across file systems; never a symlink."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_json(path: Path, data) -> None:
    """Atomic JSON write: temp file in the same folder, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    path = Path(path)
    if path.name == MANIFEST and not path.exists() and interop.is_optimum_dir(path.parent):
        return manifest_sha256(path.parent)  # stages that stamp `KILN/manifest.json` read optimum folders too
    return sha256_of(path)


def file_records(folder: Path) -> dict[str, dict]:
    """{file name: {bytes, sha256}} of a component folder's files: what the manifest records."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(folder.iterdir())}


def component_files(kiln: Path, component: str) -> list[Path]:
    folder = kiln / component
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def components_bytes(kiln: Path, names: Iterable[str]) -> int:
    """Bytes on disk of the named components' files."""
    return sum(f.stat().st_size for name in names for f in component_files(kiln, name))


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
        if e.errno not in DISK_FULL:
            raise
        raise disk_full_error(out) from None


def disk_full_error(out: Path) -> OutputError:
    return OutputError(
        f"cannot write {out}: its disk is full; free some space or choose another output path (nothing was written)"
    )


def check_output_path(out: Path, sources: Sequence[Path] = (), nested_ok: bool = False) -> Path:
    """The absolute output path, when a stage may write there at all (before any work). Refuses a non-folder,
    a symlink, a missing or read-only parent, the current folder, and anything that is, contains or (unless
    `nested_ok`: a kiln dir's own optimized/ folder) lies inside one of `sources` (the input model or kiln)."""
    out = Path(os.path.abspath(out))
    if out.is_symlink():
        raise OutputError(f"{out} is a symbolic link; give the real folder as -o")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory; choose another -o path")
    if not out.parent.is_dir():
        raise OutputError(f"cannot write {out}: folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {out}: no write permission in {out.parent}")
    real = out.resolve()
    for source in sources:
        src = Path(source).resolve()
        if src.is_relative_to(real) or (real.is_relative_to(src) and not nested_ok):
            where = "is or contains" if src.is_relative_to(real) else "lies inside"
            raise OutputError(f"{out} {where} the input {source}; choose an -o outside it")
    if Path.cwd().resolve().is_relative_to(real):
        raise OutputError(f"{out} is (or holds) the current folder; choose a new or empty folder as -o")
    return out


class StageWriter:
    """Write one stage's kiln dir `out` (see the module docstring). Use as a context manager:

        with StageWriter(out, "optimize", stamp, force=force, sources=[kiln_dir], log=log) as w:
            if w.up_to_date:
                return w.existing
            w.check_space(need)
            ... write into w.tmp ...
            w.finish(manifest, reports={"optimize_report.json": report})

    `stamp` (JSON-able) says what the output was made from; an existing output of this stage with the same
    stamp and intact files is up to date (None: never). `same_kind` names the stamp keys under which an existing
    output of this stage is this stage's own stale result (replaced without --force). `wait` blocks on another
    writer instead of failing (the user cache)."""

    def __init__(
        self,
        out: Path,
        stage: str,
        stamp: dict | None,
        *,
        force: bool = False,
        sources: Sequence[Path] = (),
        nested_ok: bool = False,
        same_kind: Sequence[str] | None = None,
        wait: bool = False,
        log: Callable = print,
        manifest_name: str = MANIFEST,
        reader: Callable[[Path], dict] | None = None,
        interop_files: bool = True,
    ):
        self.out = check_output_path(out, sources, nested_ok)
        # a stage whose output is not a kiln dir (engines: engine.json) names its manifest and its reader
        self.manifest_name, self.reader, self.interop_files = manifest_name, reader, interop_files
        self.stage, self.stamp, self.force, self.same_kind = stage, stamp, force, same_kind
        self.wait, self.log = wait, log
        self.existing: dict | None = None
        self.up_to_date = False
        self._tmp: Path | None = None
        self._finished = False
        self._lock = None

    def __enter__(self) -> StageWriter:
        self._lock = _Lock(self.out, self.wait, self.log)
        try:
            sweep_stale(self.out, self.log)
            self._check_existing()
        except BaseException:
            self._lock.release()
            raise
        return self

    def _check_existing(self) -> None:
        out = self.out
        if not out.exists() or not any(out.iterdir()):
            return
        try:
            if not (out / self.manifest_name).is_file():  # an optimum folder reads as a kiln dir: not ours
                raise KilnError(f"{out} has no {self.manifest_name}")
            self.existing = self.reader(out) if self.reader else _read_manifest(out, check_files=False)
        except KilnError:
            n = sum(1 for p in out.rglob("*") if not p.is_dir())
            raise OutputError(
                f"{out} is not a kiln directory; it holds {n} file(s); choose an empty or new -o "
                "(diffkiln only ever replaces its own kiln directories)"
            ) from None
        recorded = self.existing.get("stage", {})
        same = self.stamp is not None and recorded == {"name": self.stage, "stamp": self.stamp}
        if not self.force and same and _intact(out, self.existing):
            self.up_to_date = True
            return
        ours = recorded.get("name") == self.stage and self.same_kind is not None
        if ours and all(recorded.get("stamp", {}).get(k) == self.stamp.get(k) for k in self.same_kind):
            self.log(f"{out} is stale (its input changed): rewriting it")
            return
        if not self.force:
            raise OutputError(f"{out} already holds another kiln dir; pass --force to replace it")

    @property
    def tmp(self) -> Path:
        """The staging folder (created on first use); renamed to `out` by `finish`."""
        if self._tmp is None:
            try:
                self._tmp = Path(
                    tempfile.mkdtemp(prefix=f".{self.out.name}.{os.getpid()}.", suffix=".tmp", dir=self.out.parent)
                )
            except OSError as e:
                raise OutputError(f"cannot write {self.out}: {e.strerror}") from None
        return self._tmp

    def check_space(self, need: int) -> None:
        check_space(self.out, need)

    def copy_support(self, kiln_dir: Path, manifest: dict, skip: Iterable[str] = (), into: str = "") -> None:
        """Copy the source kiln's tokenizer folders and scheduler config (all but `skip`) into the staging folder
        (its subfolder `into`). Their paths were confined when the manifest was read; symlinks inside were checked
        to stay inside."""
        folders = [*manifest.get("tokenizers", []), SCHEDULER]
        for folder in folders:
            if folder not in skip and (kiln_dir / folder).is_dir():
                shutil.copytree(inside(kiln_dir, folder, f"manifest entry {folder!r}"), self.tmp / into / folder)

    def finish(self, manifest: dict, reports: dict[str, dict] | None = None) -> dict:
        """Write the reports, the interop files (model_index.json, <component>/config.json, from the manifest's
        `interop` record) and the manifest (with this stage's stamp) last; the rename happens on exit. Returns
        the manifest as written."""
        for name, report in (reports or {}).items():
            write_json(self.tmp / name, report)
        if self.interop_files:
            manifest = self._write_interop(manifest)
        manifest = {**manifest, "stage": {"name": self.stage, "stamp": self.stamp}}
        write_json(self.tmp / self.manifest_name, manifest)
        self._finished = True
        return manifest

    def _write_interop(self, manifest: dict) -> dict:
        """model_index.json and each component's config.json (what optimum & co. read), replaced rather than
        written through (a stage may have hard-linked the base kiln's); config records in the manifest refreshed."""
        present = {name for name in manifest["components"] if (self.tmp / name).is_dir()}
        record, contents = interop.files(manifest, present)
        components = dict(manifest["components"])
        for rel, data in contents.items():
            path = self.tmp / rel
            write_json(path, data)  # write_json replaces by rename: a hard link is never written through
            name = rel.split("/")[0]
            files = components.get(name, {}).get("files", {}) if "/" in rel else {}
            if interop.CONFIG in files:
                files = {**files, interop.CONFIG: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}}
                components[name] = {**components[name], "files": files}
        return {**manifest, "components": components, "interop": record}

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None and self._finished:
                with full_disk_is_an_error(self.out):
                    _replace(self._tmp, self.out)
            elif isinstance(exc, OSError) and exc.errno in DISK_FULL:
                raise disk_full_error(self.out) from None
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
            self._lock.release()
        return False


def _replace(tmp: Path, out: Path) -> None:
    """`tmp` becomes `out` in one rename; an old `out` is moved aside first and then removed."""
    os.chmod(tmp, 0o755)
    if out.exists():
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _intact(out: Path, manifest: dict) -> bool:
    """Every file the manifest records is there with its recorded size."""
    for name, record in manifest.get("components", {}).items():
        for fname, meta in record.get("files", {}).items():
            f = out / name / fname
            if not f.is_file() or f.stat().st_size != meta.get("bytes"):
                return False
    return True


_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?:[^.]+\.tmp|old)$")


def sweep_stale(out: Path, log: Callable = print) -> None:
    """Remove staging folders beside `out` that processes killed mid-write left behind (their pid is gone)."""
    for path in out.parent.glob(f".{glob_escape(out.name)}.*"):
        match = _STAGING.match(path.name)
        ours = match and match["name"] == out.name and path.is_dir() and not path.is_symlink()
        if ours and not _alive(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)
            log(f"removed {path}, left behind by a diffkiln process that was killed while writing {out}")


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Lock:
    """An exclusive flock on `.OUT.lock` beside the output, removed on release. A holder checks that the file it
    locked is still the one at the path (a previous holder may have removed it meanwhile), else retries."""

    def __init__(self, out: Path, wait: bool, log: Callable):
        self.path = out.with_name(f".{out.name}.lock")
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                raise OutputError(f"cannot write {out}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    os.close(fd)
                    raise OutputError(
                        f"{out} is being written by another diffkiln process; wait for it to finish or choose "
                        "another -o"
                    ) from None
                log(f"waiting for another diffkiln process to finish writing {out}")
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None
