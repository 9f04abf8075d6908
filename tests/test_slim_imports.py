"""The runtime and the kiln-dir tools must import without the PyTorch stack (edge devices, C++ ports), and
`diffkiln run` must load neither onnx nor the build stages (lora, optimizers, exporter, the bench's runner)."""

import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "tensorrt")
BUILD = ("onnx", "onnx_ir", "onnxscript", "diffkiln.lora", "diffkiln.optimizers", "diffkiln.exporter")


def test_runtime_and_kiln_tools_import_without_torch():
    code = (
        "import sys, diffkiln, diffkiln.runtime, diffkiln.specs, diffkiln.kiln, diffkiln.parity, diffkiln.inspect, "
        "diffkiln.builder, diffkiln.optimizers, diffkiln.cli, diffkiln.exporter, diffkiln.models, "
        "diffkiln.runtime.pipeline, diffkiln.runtime.generate, diffkiln.runtime.schedulers, "
        "diffkiln.runtime.tokenizer, diffkiln.runtime.runners, diffkiln.runtime.images\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_diffkiln_run_loads_no_build_stage_code(tiny_kiln, tmp_path):
    """The modules a whole `diffkiln run` loads (through the CLI, up to the PNG) hold none of the build stages."""
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['diffkiln', 'run', 'a cat', '-m', {str(tiny_kiln)!r}, '--steps', '2', '-o', "
        f"{str(tmp_path / 'x.png')!r}]\n"
        "try:\n    runpy.run_module('diffkiln.cli', run_name='__main__')\nexcept SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        f"found = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or any(m == b or m.startswith(b + '.') "
        f"for b in {BUILD!r}))\n"
        "print(found, 'diffkiln.bench.run' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[] False"
    assert (tmp_path / "x.png").is_file()
