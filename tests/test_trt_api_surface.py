"""Every TensorRT name diffkiln's build code uses exists in the real TensorRT 10.x and 11.x Python bindings.

TensorRT cannot be installed without a GPU, but the `tensorrt_cu12_bindings` wheels hold the pybind11 module,
whose registered names (classes, enum members, methods, properties) sit in its string table as NUL-terminated
identifiers (the linker may share a name's bytes with a longer one ending in it, so suffixes count). The names
are collected from the code by AST: `trt.X.Y` chains and attributes of variables assigned from TensorRT objects.
"""

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

CACHE = Path.home() / ".cache" / "diffkiln-tests" / "trt"
VERSIONS = {"10": "10.16.1.11", "11": "11.4.0.106"}  # the newest of each major on the package index
MODULES = [Path(__file__).parents[1] / "diffkiln" / "builder" / "trt.py"]


def _wheel(version: str) -> Path:
    found = sorted(CACHE.glob(f"tensorrt_cu12_bindings-{version}-*.whl"))
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"tensorrt_cu12_bindings=={version}",
             "-d", str(CACHE)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        found = sorted(CACHE.glob(f"tensorrt_cu12_bindings-{version}-*.whl"))
        if not found:
            pytest.skip(f"the package index is unreachable: {done.stderr.strip()[-200:]}")
    return found[0]


def binding_names(version: str) -> set[str]:
    with zipfile.ZipFile(_wheel(version)) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith(".so")))
    return {p.decode() for p in data.split(b"\0") if re.fullmatch(rb"[A-Za-z_][A-Za-z0-9_]*", p)}


def present(name: str, names: set[str]) -> bool:
    return name in names or any(n.endswith(name) for n in names)


def used_names(path: Path) -> set[str]:
    """Attribute names read from `trt` and from variables assigned from TensorRT objects (dunders excluded)."""
    tree = ast.parse(path.read_text())
    typed = {"trt"}
    found: set[str] = set()

    def rooted(node) -> bool:
        while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
            node = node.func if isinstance(node, ast.Call) else node.value
        return isinstance(node, ast.Name) and node.id in typed

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and rooted(node.value):
            typed |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and rooted(node.value) and not node.attr.startswith("__"):
            found.add(node.attr)
    return found


@pytest.mark.parametrize("major", sorted(VERSIONS))
def test_every_tensorrt_name_exists(major):
    names = binding_names(VERSIONS[major])
    used = set().union(*(used_names(m) for m in MODULES))
    assert {"create_network", "STRONGLY_TYPED", "build_serialized_network", "set_shape"} <= used
    missing = sorted(n for n in used if not present(n, names))
    assert not missing, f"TensorRT {VERSIONS[major]} has no {missing}"


def test_removed_names_are_caught():
    assert not present("FP16", binding_names(VERSIONS["11"]))  # BuilderFlag.FP16: gone in TensorRT 11
    assert present("FP16", binding_names(VERSIONS["10"]))
    assert not present("build_engine", binding_names(VERSIONS["10"]))  # removed in TensorRT 10
    assert not present("execute_async_v2", binding_names(VERSIONS["10"]))
