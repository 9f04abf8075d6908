"""Read and rewrite a few initializers of a component's graph without loading (or copying in memory) the rest.

    <component>/model.onnx          graph; small models hold their weights inside (TensorProto.raw_data)
    <component>/model.onnx.data     weights of >2 GB models, one aligned blob (see diffkiln.onnxio)

Writing a changed copy: an external data file holding a changed tensor is copied by the kernel (sendfile: on
this 2-core machine 2 s for the 3.4 GB SD1.5 UNet blob, against 7 s through Python) and the changed tensors are
overwritten in the copy at their offsets; a tensor that changes shape (a grown token table) is appended at the
end of the blob and its offset updated. Tensors inside model.onnx are replaced in the parsed graph, which is
saved again. Files that do not change are hard-linked (copied across file systems): nothing in a kiln dir is
modified in place, every write is a new file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from diffkiln.kiln import file_sha256, link_or_copy
from diffkiln.kiln_reader import inside
from diffkiln.onnxio import ALIGN, load_graph


def tensor_bytes(array: np.ndarray, dtype: np.dtype | None = None) -> memoryview:
    """A tensor's little-endian bytes as ONNX stores them, without a copy where it already is laid out so."""
    data = np.ascontiguousarray(array, dtype=np.dtype(dtype or array.dtype).newbyteorder("<"))
    return memoryview(data.reshape(-1).view(np.uint8))


def tensor_sha256(array: np.ndarray) -> str:
    """sha256 of a tensor's little-endian bytes."""
    return hashlib.sha256(tensor_bytes(array)).hexdigest()


class ComponentGraph:
    """One component's model.onnx with its weights left on disk: look up, read and rewrite initializers."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.model = load_graph(self.folder / "model.onnx")
        self.tensors = {t.name: t for t in self.model.graph.initializer}
        self.written: dict[str, str] = {}  # new files of the last `writing`: name → sha256

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].dims)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.tensors[name].data_type))

    def read(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        if t.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        info = self._external(name)
        with open(self._file(info["location"]), "rb") as fh:
            fh.seek(int(info.get("offset", 0)))
            raw = fh.read(int(info["length"]) if "length" in info else -1)
        return np.frombuffer(raw, dtype=self.dtype(name).newbyteorder("<")).reshape(self.shape(name))

    def in_file_order(self, names) -> list[str]:
        """`names` sorted by where their bytes lie (embedded first, then by file and offset), so that reading and
        rewriting them walks through the files once, front to back."""

        def key(name: str):
            info = self._external(name)
            return (info.get("location", ""), int(info.get("offset", 0)))

        return sorted(names, key=key)

    @contextlib.contextmanager
    def writing(self, dst: Path | None, names: list[str]) -> Iterator[Callable[[str, np.ndarray], None]]:
        """Yield `put(initializer, value)`; on exit the component, with those values, is complete in the new
        folder `dst` (None: values are only computed, nothing is written). `names` lists what will be put;
        putting them in `in_file_order` makes the writes sequential.

        Use once, last: it edits this object's parsed graph. `self.written` then maps the files that are new
        bytes to their sha256 (the others are links to the base kiln's files)."""
        if dst is None:
            yield lambda name, value: None
            return
        dst.mkdir(parents=True)
        changed = {self._location(n) for n in names} - {None}
        for location in changed:
            self._file(location)
        for f in sorted(p for p in self.folder.iterdir() if p.is_file() and p.name != "model.onnx"):
            # the kernel copies (sendfile); the changed tensors are then overwritten in the copy
            (shutil.copyfile if f.name in changed else link_or_copy)(f, dst / f.name)
        graph_changed = False
        with contextlib.ExitStack() as stack:
            files = {name: stack.enter_context(open(dst / name, "r+b")) for name in changed}

            def put(name: str, value: np.ndarray) -> None:
                nonlocal graph_changed
                graph_changed |= self._put(name, value, files)

            yield put
        self.written = {name: file_sha256(dst / name) for name in changed}
        if graph_changed:
            data = self.model.SerializeToString()
            (dst / "model.onnx").write_bytes(data)
            self.written["model.onnx"] = hashlib.sha256(data).hexdigest()
        else:
            link_or_copy(self.folder / "model.onnx", dst / "model.onnx")

    def _put(self, name: str, value: np.ndarray, files: dict) -> bool:
        """Store one tensor; returns whether model.onnx itself changed."""
        t, data = self.tensors[name], tensor_bytes(value, self.dtype(name))
        if t.data_location != TensorProto.EXTERNAL:
            t.ClearField("float_data")
            t.raw_data, t.dims[:] = data.tobytes(), value.shape
            return True
        info = self._external(name)
        fh = files[info["location"]]
        if tuple(value.shape) == self.shape(name):
            fh.seek(int(info.get("offset", 0)))
            fh.write(data)
            return False
        end = fh.seek(0, os.SEEK_END)  # the tensor changed size (a grown token table): append it, aligned
        offset = end + (-end % ALIGN)
        fh.write(b"\0" * (offset - end))
        fh.write(data)
        del t.external_data[:]
        for key, v in (("location", info["location"]), ("offset", str(offset)), ("length", str(len(data)))):
            t.external_data.add(key=key, value=v)
        t.dims[:] = value.shape
        return True

    def _file(self, location: str) -> Path:
        """An external-data file, which must lie inside the component folder (a crafted graph may name any)."""
        return inside(self.folder, location, f"{self.folder.name}/model.onnx: external data location")

    def _external(self, name: str) -> dict[str, str]:
        return {e.key: e.value for e in self.tensors[name].external_data}

    def _location(self, name: str) -> str | None:
        if self.tensors[name].data_location != TensorProto.EXTERNAL:
            return None
        return self._external(name)["location"]


class GraphCache:
    """Each component's graph opened once, on first use (only changed components are ever opened)."""

    def __init__(self, kiln_dir: Path):
        self.kiln_dir, self._open = kiln_dir, {}

    def get(self, component: str) -> ComponentGraph:
        if component not in self._open:
            self._open[component] = ComponentGraph(self.kiln_dir / component)
        return self._open[component]

    def close(self, component: str) -> None:
        self._open.pop(component, None)
