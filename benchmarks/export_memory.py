"""Peak memory and time of exporting presets, each in its own process.

    .venv/bin/python benchmarks/export_memory.py sd15 sdxl [--keep DIR]

Runs `diffkiln export PRESET` in a child process and reads the child's peak RSS from the kernel (wait4's
ru_maxrss), so the number covers torch, the ONNX exporter and the ONNX Runtime parity check together. Prints a
table and writes benchmarks/results/export_memory.json. The goal: `sdxl` exports within 20 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "export_memory.json"


def measure(preset: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "diffkiln.cli", "export", preset, "-o", str(out), "--force"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    log = proc.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.exists() else 0
    return {
        "preset": preset,
        "exit_code": code,
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),  # ru_maxrss is in KiB on Linux
        "kiln_dir_gb": round(size / 1e9, 2),
        "log": log.strip().splitlines()[-8:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="+")
    parser.add_argument("--keep", type=Path, help="keep the kiln dirs under this folder")
    args = parser.parse_args()
    rows = []
    for preset in args.presets:
        root = args.keep or Path(tempfile.mkdtemp(prefix="diffkiln-bench-"))
        row = measure(preset, root / preset)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        rows.append(row)
        status = "ok" if row["exit_code"] == 0 else f"FAILED ({row['exit_code']})"
        print(
            f"{preset:10s} {status:8s} {row['seconds']:8.1f} s  peak RSS {row['peak_rss_gb']:6.2f} GB  "
            f"kiln dir {row['kiln_dir_gb']:.2f} GB",
            flush=True,
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}
    # keep earlier presets' rows: each run updates only the presets it measured
    old = json.loads(RESULTS.read_text())["runs"] if RESULTS.is_file() else []
    runs = [r for r in old if r["preset"] not in {row["preset"] for row in rows}] + rows
    RESULTS.write_text(json.dumps({"machine": machine, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
