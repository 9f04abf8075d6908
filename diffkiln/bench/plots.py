"""The report's PNGs (matplotlib's object API, no pyplot state): per-stage latency bars, speed against fidelity,
and the same prompt through every path side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffkiln.bench.fidelity import PSNR_CAP_DB
from diffkiln.bench.paths import REFERENCE
from diffkiln.bench.report import denoiser_label

PARITY_DB = 40.0  # what the end-to-end parity tests demand of diffkiln against diffusers (tests/test_pipeline.py)

STAGE_LABELS = {
    "text_encoding": "text encoding",
    "unet_total": "UNet (all steps)",
    "vae_decode": "VAE decode",
    "other": "other",
}
COLORS = {"text_encoding": "#4e79a7", "unet_total": "#f28e2b", "vae_decode": "#59a14f", "other": "#bab0ac"}


def _ran(report: dict) -> list[tuple[str, dict]]:
    return [(n, p) for n, p in report["paths"].items() if p["status"] == "ok" and "latency" in p]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def latency_bars(report: dict, out: Path) -> None:
    """One horizontal bar per path, stacked by stage (median seconds), labelled with the end-to-end time."""
    ran = _ran(report)[::-1]  # first path on top
    fig = _figure(8, 1.2 + 0.55 * len(ran))
    ax = fig.add_subplot()
    left = np.zeros(len(ran))
    labels = {**STAGE_LABELS, "unet_total": f"{denoiser_label(report)} (all steps)"}
    for stage, label in labels.items():
        widths = np.array([p["latency"][stage].get("median", 0.0) for _, p in ran])
        ax.barh([n for n, _ in ran], widths, left=left, label=label, color=COLORS[stage])
        left += widths
    for y, (_, p) in enumerate(ran):
        total = p["latency"]["total"]
        ax.hlines(y, total["min"], total["max"], color="black", linewidth=1)  # end-to-end min–max over runs
        speedup = p.get("speedup", {}).get("end_to_end")
        text = f" median {total['median']:.2f} s" + (f"  ({speedup:.2f}×)" if speedup else "")
        ax.text(max(left[y], total["max"]), y, text, va="center", fontsize=8)
    right = max([left.max(), *(p["latency"]["total"]["max"] for _, p in ran)]) if ran else 1.0
    ax.set_xlim(0, right * 1.3)
    ax.set_xlabel("seconds per generation (median per stage; black line: end-to-end min–max)")
    ax.set_title(_title(report, "latency per stage"), fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(out)


def speed_vs_fidelity(report: dict, out: Path) -> None:
    """Speedup over the reference (x, log scale) against PSNR to the reference's images (y)."""
    from matplotlib.ticker import FuncFormatter

    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot()
    points = [
        (n, p["speedup"]["end_to_end"], p["fidelity"]["psnr_db"])
        for n, p in _ran(report)
        if "speedup" in p and "psnr_db" in p["fidelity"]
    ]
    for i, (name, speedup, psnr) in enumerate(sorted(points, key=lambda p: p[1])):
        ax.scatter(speedup, psnr, s=40)
        below = i % 2  # neighbours alternate above and below their point, so close points stay readable
        ax.annotate(name, (speedup, psnr), textcoords="offset points", xytext=(4, -12 if below else 5), fontsize=8)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.text(1.0, 0.02, f" {REFERENCE}", transform=ax.get_xaxis_transform(), fontsize=8, color="grey")
    ax.axhline(PARITY_DB, color="tab:red", linestyle=":", linewidth=1)
    ax.text(
        0.01,
        PARITY_DB,
        f"{PARITY_DB:.0f} dB: end-to-end parity bar",
        transform=ax.get_yaxis_transform(),
        fontsize=7,
        color="tab:red",
        va="bottom",
    )
    ax.text(
        0.01,
        PSNR_CAP_DB,
        f"{PSNR_CAP_DB:.0f} dB: identical (cap)",
        transform=ax.get_yaxis_transform(),
        fontsize=7,
        color="grey",
        va="bottom",
    )
    if not points:
        ax.text(0.5, 0.5, f"no fidelity figures ({REFERENCE} did not run)", ha="center", transform=ax.transAxes)
    ax.set_ylim(min([PARITY_DB, *(p for _, _, p in points)]) - 5, PSNR_CAP_DB + 6)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}×" if f"{v:g}"[0] in "25" else ""))
    speedups = [s for _, s, _ in points] + [1.0]
    ax.set_xlim(min(speedups) / 1.5, max(speedups) * 1.5)
    ax.set_xlabel(f"end-to-end speedup over {REFERENCE} (×, log scale)")
    ax.set_ylabel(f"PSNR against {REFERENCE} (dB, higher is closer)")
    ax.set_title(_title(report, "speed vs fidelity"), fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.savefig(out)


def image_grid(report: dict, runs, out: Path, max_prompts: int = 4) -> None:
    """Rows: prompts (the first image of each batch); columns: every path that produced images."""
    cols = [r for r in runs if r.images]
    prompts = sorted({i for r in cols for i in r.images})[:max_prompts]
    c = report["config"]
    cell = 2.2  # inches per image column
    fig = _figure(max(cell * len(cols), 6.5), (cell * c["height"] / c["width"] + 0.5) * max(len(prompts), 1) + 0.4)
    axes = fig.subplots(max(len(prompts), 1), max(len(cols), 1), squeeze=False)
    for row, i in enumerate(prompts):
        for col, run in enumerate(cols):
            ax = axes[row][col]
            ax.set_xticks([]), ax.set_yticks([])
            if i in run.images:
                ax.imshow(np.clip(run.images[i][0], 0, 1))
            fid = report["paths"][run.name].get("fidelity", {})
            detail = "reference" if fid.get("reference") else f"{fid['psnr_db']:.1f} dB" if "psnr_db" in fid else ""
            ax.set_title(f"{run.name}\n{detail}", fontsize=8)
            if col == 0:
                ax.set_ylabel(_wrap(report["config"]["prompts"][i]), fontsize=7)
    fig.suptitle(_title(report, "same prompt and noise, every path"), fontsize=10)
    fig.savefig(out)


def _title(report: dict, what: str) -> str:
    c = report["config"]
    return f"{report['subject']['ref']} {c['height']}×{c['width']}, {c['steps']} steps, batch {c['batch']}: {what}"


def _wrap(text: str, width: int = 28) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + len(word) > width:
            lines.append(line)
            line = ""
        line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def write_plots(report: dict, runs, out: Path) -> dict[str, str]:
    """All three PNGs; {name: file} (or {"reason": …} when matplotlib is not installed)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {"reason": "matplotlib is not installed (pip install matplotlib): no plots"}
    files = {"latency": "latency.png", "speed_vs_fidelity": "speed_vs_fidelity.png", "image_grid": "image_grid.png"}
    latency_bars(report, out / files["latency"])
    speed_vs_fidelity(report, out / files["speed_vs_fidelity"])
    image_grid(report, runs, out / files["image_grid"])
    return files
