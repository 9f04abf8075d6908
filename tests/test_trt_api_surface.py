"""Every TensorRT name diffkiln's build code uses exists in the real TensorRT 10.x and 11.x Python bindings.

TensorRT cannot be installed without a GPU, but the `tensorrt_cu12_bindings` wheels hold the pybind11 module,
whose registered names (classes, enum members, methods, properties) sit in its string table as NUL-terminated
identifiers (the linker may share a name's bytes with a longer one ending in it, so suffixes count). The names
are collected from the code by AST: `trt.X.Y` chains, attributes of variables assigned from TensorRT objects and
of the runner's engine and context; names the package's Python `__init__` defines (`nptype`) count too.
cuda-python's runtime, which the runner's buffers, stream and CUDA graphs use, imports without a GPU: each
`cudart.X.Y` chain is looked up in the real `cuda-bindings` wheel.
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
PACKAGE = Path(__file__).parents[1] / "diffkiln"
MODULES = [PACKAGE / "builder" / "trt.py", PACKAGE / "runtime" / "trt_runner.py"]
HOLDERS = {"engine", "context"}  # attributes that hold TensorRT objects (self.context, loaded.engine)
CUDA_BINDINGS = "13.0.0"  # its runtime module keeps the names cuda-python 12.x has


def _wheel(package: str, version: str) -> Path:
    pattern = f"{package}-{version}*-*.whl"
    found = sorted(CACHE.glob(pattern))
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{package}=={version}", "-d", str(CACHE)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        found = sorted(CACHE.glob(pattern))
        if not found:
            pytest.skip(f"the package index is unreachable: {done.stderr.strip()[-200:]}")
    return found[0]


def binding_names(version: str) -> set[str]:
    with zipfile.ZipFile(_wheel("tensorrt_cu12_bindings", version)) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith(".so")))
        init = z.read("tensorrt_bindings/__init__.py").decode()
    names = {p.decode() for p in data.split(b"\0") if re.fullmatch(rb"[A-Za-z_][A-Za-z0-9_]*", p)}
    return names | set(re.findall(r"^(?:def|class) ([A-Za-z_]\w*)", init, re.M))


def present(name: str, names: set[str]) -> bool:
    return name in names or any(n.endswith(name) for n in names)


def used_names(path: Path) -> set[str]:
    """Attribute names read from `trt` and from variables assigned from TensorRT objects (dunders excluded)."""
    tree = ast.parse(path.read_text())
    typed = {"trt"}
    found: set[str] = set()

    def rooted(node) -> bool:
        while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
            if isinstance(node, ast.Attribute) and node.attr in HOLDERS:
                return True
            node = node.func if isinstance(node, ast.Call) else node.value
        return isinstance(node, ast.Name) and node.id in typed

    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:  # `a = trt.X(...)` and `a, b = x, self.context`
            pairs = [(target, node.value)]
            if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                pairs = list(zip(target.elts, node.value.elts, strict=False))
            typed |= {t.id for t, v in pairs if isinstance(t, ast.Name) and rooted(v)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and rooted(node.value) and not node.attr.startswith("__"):
            found.add(node.attr)
    return found


@pytest.mark.parametrize("major", sorted(VERSIONS))
def test_every_tensorrt_name_exists(major):
    names = binding_names(VERSIONS[major])
    used = set().union(*(used_names(m) for m in MODULES))
    assert {"create_network", "STRONGLY_TYPED", "build_serialized_network", "set_shape"} <= used
    assert {"execute_async_v3", "set_tensor_address", "set_input_shape", "refit_from_file", "nptype"} <= used
    missing = sorted(n for n in used if not present(n, names))
    assert not missing, f"TensorRT {VERSIONS[major]} has no {missing}"


def test_removed_names_are_caught():
    assert not present("FP16", binding_names(VERSIONS["11"]))  # BuilderFlag.FP16: gone in TensorRT 11
    assert present("FP16", binding_names(VERSIONS["10"]))
    assert not present("build_engine", binding_names(VERSIONS["10"]))  # removed in TensorRT 10
    assert not present("execute_async_v2", binding_names(VERSIONS["10"]))


def cudart_chains(path: Path) -> set[str]:
    """`cudart.cudaMalloc`, `self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice`, … as 'cudaMalloc', '…'."""
    chains = set()
    for node in ast.walk(ast.parse(path.read_text())):
        parts, inner = [], node
        while isinstance(inner, ast.Attribute):
            parts.append(inner.attr)
            inner = inner.value
        if parts and parts[-1] == "cudart" and len(parts) > 1:  # self.cudart.X…
            chains.add(".".join(reversed(parts[:-1])))
        elif parts and isinstance(inner, ast.Name) and inner.id == "cudart":
            chains.add(".".join(reversed(parts)))
    return {c for c in chains if not any(o != c and o.startswith(c + ".") for o in chains)}


def test_every_cuda_runtime_name_exists(tmp_path):
    chains = cudart_chains(PACKAGE / "runtime" / "trt_runner.py")
    assert {"cudaMalloc", "cudaGraphLaunch", "cudaMemcpyKind.cudaMemcpyHostToDevice"} <= chains
    with zipfile.ZipFile(_wheel("cuda_bindings", CUDA_BINDINGS)) as z:
        z.extractall(tmp_path)
    code = (
        "import sys, functools; from cuda.bindings import runtime as r\n"
        "missing = [c for c in sys.argv[1:] if functools.reduce(lambda o, a: getattr(o, a, None), c.split('.'), r) "
        "is None]\nprint(','.join(missing))"
    )
    done = subprocess.run([sys.executable, "-c", code, *sorted(chains), "cudaNoSuchCall"], cwd=tmp_path,
                          capture_output=True, text=True, check=True, env={"PYTHONPATH": str(tmp_path)})  # fmt: skip
    assert done.stdout.strip() == "cudaNoSuchCall"  # only the made-up name is missing
