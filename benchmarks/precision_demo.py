"""Precision on the demo model: the 64 held-out captions, 20 steps, seed i for caption i, through the fp32 kiln,
`diffkiln optimize --precision fp16` and `--precision int8` (ORT), and the int8 tensorrt-target graph on OpenVINO:
per-image PSNR against the fp32 kiln, prompt adherence, and an image grid.

    .venv/bin/python benchmarks/precision_demo.py [--captions 64] [--percentile 99] [--report DIR]

Results: benchmarks/results/precision_demo/ (report.md, report.json, grid.png) — not committed.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from diffkiln.bench.precision import compare
from diffkiln.calibration import optimize_with_calibration
from diffkiln.demo.data import heldout_captions
from diffkiln.exporter import export, open_source
from diffkiln.optimizers.precision.apply import PrecisionOptions
from diffkiln.runtime.runners import OpenVinoRunner


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=64)
    parser.add_argument("--percentile", type=float, default=PrecisionOptions().percentile)
    parser.add_argument("--report", type=Path, default=Path(__file__).parent / "results" / "precision_demo")
    args = parser.parse_args()
    out = args.report
    out.mkdir(parents=True, exist_ok=True)
    (out / "kilns").mkdir(exist_ok=True)
    base = out / "kilns" / "fp32"
    export(open_source("demo"), base, log=lambda _: None) if not (base / "manifest.json").exists() else None
    options = PrecisionOptions(percentile=args.percentile)
    made = {}
    for target, precision in [("ort-cpu", "fp16"), ("ort-cpu", "int8"), ("tensorrt", "int8")]:
        made[target, precision] = out / "kilns" / f"{target}-{precision}"
        optimize_with_calibration(base, target, precision, out=made[target, precision], options=options, force=True)
    paths = {
        "fp32": (base, None),
        "ort-fp16": (made["ort-cpu", "fp16"], None),
        "ort-int8": (made["ort-cpu", "int8"], None),
        "openvino-int8": (made["tensorrt", "int8"], lambda p: OpenVinoRunner(p, precision_hint="f32")),
    }
    captions = heldout_captions()[: args.captions]
    result = compare(paths, captions, steps=20)
    lines = [
        f"# Precision on the demo model: {len(captions)} held-out captions, 20 steps, percentile {args.percentile}",
        "",
        "| path | PSNR vs fp32, median (min) | color | background | shape |",
        "|---|---|---|---|---|",
    ]
    summary = {}
    for name, r in result.items():
        a = r["adherence"]
        psnr = f"{r['psnr_median_db']:.1f} ({r['psnr_min_db']:.1f})" if "psnr_db" in r else "reference"
        lines.append(f"| {name} | {psnr} | {a['color']:.1%} | {a['background']:.1%} | {a['shape']:.1%} |")
        summary[name] = {k: v for k, v in r.items() if k != "images"}
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    _grid(result, captions[:8], out / "grid.png")
    print("\n".join(lines))


def _grid(result: dict, captions: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(result), len(captions), figsize=(1.6 * len(captions), 1.8 * len(result)))
    for row, (name, r) in enumerate(result.items()):
        for col in range(len(captions)):
            ax = axes[row, col]
            ax.imshow(np.clip(r["images"][col], 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
            if "psnr_db" in r:
                ax.set_title(f"{r['psnr_db'][col]:.1f} dB", fontsize=7)
    fig.suptitle("demo model: fp32 vs fp16 vs int8 (PSNR vs fp32)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
