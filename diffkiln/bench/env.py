"""What machine and software a bench ran on, and which optional backends this machine can run.

Everything here is cheap and imports nothing heavy: packages are looked up by metadata, the GPU by `nvidia-smi`.
The torch-dependent facts (bf16 support, thread count) come from the tools worker (`tools.py`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = (
    "diffkiln",
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "torch",
    "diffusers",
    "transformers",
    "openvino",
    "tensorrt",
)
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for pkg in PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            found[pkg] = version(pkg)
    return found


def _cpuinfo() -> dict[str, str]:
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return {}
    first = path.read_text().split("\n\n")[0]
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}


def cpu() -> dict:
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "model": info.get("model name") or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "flags": [f for f in CPU_FLAGS if f in flags],
        "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}),
    }


def memory_bytes() -> dict[str, int]:
    """MemTotal and MemAvailable from /proc/meminfo (empty where there is none)."""
    path = Path("/proc/meminfo")
    if not path.is_file():
        return {}
    fields = dict(line.split(":", 1) for line in path.read_text().splitlines() if ":" in line)
    return {k.lower(): int(fields[k].split()[0]) * 1024 for k in ("MemTotal", "MemAvailable") if k in fields}


def gpus() -> list[str]:
    """One line per NVIDIA GPU (`nvidia-smi -L`), empty when there is none."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def ort_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: a busy machine during a bench explains noisy numbers."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict:
    """The report's environment header."""
    return {
        "cpu": cpu(),
        "memory": memory_bytes(),
        "gpus": gpus(),
        "os": f"{platform.system()} {platform.release()}",
        "versions": versions(),
        "onnxruntime_providers": ort_providers(),
        "load_average_start": load_average(),
    }


def busy_warning(environment: dict) -> str | None:
    """A warning when other work kept the CPUs busy as the bench started (the end figure includes the bench itself):
    timings are then noisy, and torch's OpenMP, which waits at every barrier for a descheduled thread, suffers far
    more than the other runtimes."""
    cpus = environment["cpu"]["usable_cpus"] or 1
    start = environment.get("load_average_start")
    if start and start[0] > 0.5 * cpus:
        return (
            f"the machine was busy (1-minute load average {start[0]:.1f} on {cpus} CPUs before the bench started): "
            "timings are noisy, torch's most; rerun on a quiet machine for figures to quote"
        )
    return None
