"""The runtime and the kiln-dir tools must import without the PyTorch stack (edge devices, C++ ports)."""

import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "tensorrt")


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
