"""Wall time and peak RSS of one text-to-image run: diffkiln-cpp vs `diffkiln run` vs OpenVINO GenAI.

    .venv/bin/python benchmarks/cpp_vs_run.py KILN [--runs 5] [--steps 20] [--size 64]
        [--genai-python /path/to/venv/bin/python] [--ir IR_DIR]

Every path is one fresh process (what a user starts), on OpenVINO CPU with the f32 precision hint, the same prompt,
the same initial latents (`--latents`; GenAI through a Generator subclass) and DDIM (the scheduler class the
kiln's config names, which GenAI follows). Wall time is measured around the process, peak RSS is the kernel's
(`os.wait4`'s ru_maxrss); each figure is the median over `--runs`, the paths interleaved. The images are compared
with `diffkiln run`'s (PSNR). GenAI needs a venv with `openvino-genai` and `transformers` (`--genai-python`); its IR
folder is written by tools/write_openvino_ir.py into benchmarks/results/ unless `--ir` names one.
Results: benchmarks/results/cpp_vs_run-<kiln>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).parents[1]
PROMPT = "a red circle on a white background"


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def psnr(a: Path, b: Path) -> float:
    x, y = (np.asarray(Image.open(p), dtype=np.float64) for p in (a, b))
    mse = ((x - y) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kiln", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=0, help="image side (default: the model's native size)")
    parser.add_argument("--genai-python", type=Path)
    parser.add_argument("--ir", type=Path)
    args = parser.parse_args()

    manifest = json.loads((args.kiln / "manifest.json").read_text())
    side = args.size or manifest["pipeline"]["sample_size"] * 8
    results_dir = ROOT / "benchmarks" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cpp_vs_run_"))
    latents = work / "latents.npy"
    np.save(latents, np.random.default_rng(0).standard_normal((1, 4, side // 8, side // 8), dtype=np.float32))

    common = [PROMPT, "-m", str(args.kiln), "--latents", str(latents), "--steps", str(args.steps)]
    size = ["--height", str(side), "--width", str(side)]
    paths = {
        "diffkiln run --backend openvino": [
            str(ROOT / ".venv" / "bin" / "diffkiln"), "run", *common, *size, "--scheduler", "ddim",
            "--backend", "openvino", "-o", str(work / "run.png"),
        ],
        "diffkiln-cpp (OpenVINO)": [
            str(ROOT / "cpp" / "build" / "diffkiln-cpp"), *common, *size, "--sampler", "ddim",
            "-o", str(work / "cpp.png"),
        ],
    }  # fmt: skip
    if args.genai_python:
        ir = args.ir or results_dir / f"ir-{args.kiln.name}"
        if not (ir / "model_index.json").is_file():
            writer = [str(args.genai_python), str(ROOT / "tools" / "write_openvino_ir.py"), str(args.kiln), str(ir)]
            subprocess.run(writer, check=True, capture_output=True)
        paths["OpenVINO GenAI Text2ImagePipeline"] = [
            str(args.genai_python), str(ROOT / "benchmarks" / "genai_text2image.py"), str(ir), PROMPT,
            str(latents), str(work / "genai.png"), "--steps", str(args.steps),
        ]  # fmt: skip

    for cmd in paths.values():
        timed(cmd)  # warm-up: the page cache holds the graphs for every measured run
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for _ in range(args.runs):  # interleaved, so a noisy neighbour slows every path alike
        for name, cmd in paths.items():
            measured[name].append(timed(cmd))
    rows = {}
    for name, samples in measured.items():
        rows[name] = {
            "wall_s": statistics.median(s[0] for s in samples),
            "wall_s_min": min(s[0] for s in samples),
            "peak_rss_mb": statistics.median(s[1] for s in samples),
        }
    outputs = {"diffkiln-cpp (OpenVINO)": "cpp.png", "OpenVINO GenAI Text2ImagePipeline": "genai.png"}
    for name, png in outputs.items():
        if name in rows:
            rows[name]["psnr_vs_run_db"] = psnr(work / png, work / "run.png")

    report = {"kiln": str(args.kiln), "size": side, "steps": args.steps, "runs": args.runs, "paths": rows}
    out = results_dir / f"cpp_vs_run-{args.kiln.name}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"{'path':36s} {'wall (median)':>14s} {'min':>8s} {'peak RSS':>10s} {'PSNR vs run':>12s}")
    for name, r in rows.items():
        db = r.get("psnr_vs_run_db")
        db_text = "reference" if db is None else ("identical" if db == float("inf") else f"{db:.1f} dB")
        print(f"{name:36s} {r['wall_s']:12.2f} s {r['wall_s_min']:6.2f} s {r['peak_rss_mb']:7.0f} MB {db_text:>12s}")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
