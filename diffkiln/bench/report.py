"""The bench's outputs: report.json (everything, machine-readable), report.md (tables), images/ and plots.

report.json holds only finite numbers: a figure that does not exist is null, with a "reason" beside it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from diffkiln import kiln
from diffkiln.bench.config import WARMUP_STEPS
from diffkiln.bench.fidelity import PSNR_CAP_DB, SSIM_SIGMA, SSIM_WINDOW
from diffkiln.bench.measure import GEMM_REPEATS
from diffkiln.bench.paths import REFERENCE
from diffkiln.bench.session import SETTLE_S

DENOISER_LABELS = {"unet": "UNet", "transformer": "transformer"}


def method() -> dict[str, str]:
    """How the bench measures, written from the constants that decide it (so the text cannot drift from them)."""
    return {
        "interleaving": "all paths run in one invocation on the same calls (prompts and initial latents, or "
        "component inputs); every round sends each call to every path in turn (A B C A B C …), so slow drift "
        "(thermals, background load) hits all alike; warm-up rounds (generations cut to "
        f"{WARMUP_STEPS} steps: same shapes and kernels) are run and discarded; a {SETTLE_S:g} s pause before each "
        "call lets the previous worker's thread pools go idle. With --one-at-a-time only one path is resident: each "
        "round starts, loads, warms up and closes every path in turn, so paths alternate per round",
        "timing": "wall clock (time.perf_counter) inside each worker; stages from diffkiln's runner timings, and for "
        "torch from forward hooks on the text encoders and the UNet (Flux: the transformer) and a wrapper around "
        "vae.decode",
        "memory": "each path runs in its own worker process; peak RSS is the kernel's high-water mark (VmHWM) of "
        "that process over its whole life (model load included), so it counts the interpreter and libraries too; "
        "'after imports' is the RSS once the libraries are imported, before the model loads",
        "flops": "one call of each component counted by torch.utils.flop_counter.FlopCounterMode on the meta device "
        "(matmul, convolution, attention; 2 FLOPs per multiply-add)",
        "peak": f"best of {GEMM_REPEATS} square GEMMs after a warm-up, at the start of this run (under the same "
        "load): numpy fp32 (BLAS), torch fp32 and, on CPUs with native bf16, torch bf16 (oneDNN)",
        "fidelity": f"PSNR (data range 1, capped at {PSNR_CAP_DB:g} dB = numerically identical) and SSIM "
        f"({SSIM_WINDOW}-tap gaussian window, sigma {SSIM_SIGMA:g}) of each image against {REFERENCE}'s for the same "
        "prompt and initial noise, averaged over prompts and batch",
    }


def method_lines(method: dict[str, str]) -> list[str]:
    return ["", "## Method", "", *[f"- **{k}**: {v}" for k, v in method.items()]]


def clean(value):
    """JSON-ready copy: numpy scalars → python, non-finite floats → None, paths → str."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps(clean(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def save_images(runs, out: Path) -> dict[str, list[str]]:
    """images/<path>/p<prompt>-<index>.png for every path that produced images; returns the relative paths."""
    from PIL import Image

    saved = {}
    for run in runs:
        for i, batch in sorted(run.images.items()):
            for b, image in enumerate(batch):
                rel = Path("images") / run.name / f"p{i}-{b}.png"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(out / rel)
                saved.setdefault(run.name, []).append(str(rel))
    return saved


# -- markdown ---------------------------------------------------------------------------------------------------


def _ms(stat: dict | None) -> str:
    return f"{stat['median'] * 1000:.1f}" if stat and stat.get("n") else "—"


def _num(value, fmt: str = "{:.2f}", none: str = "—") -> str:
    return none if value is None else fmt.format(value)


def _gflop(value: float) -> str:
    """GFLOP with one decimal, or three significant digits below 1 (the tiny presets' denoisers)."""
    return f"{value:.1f}" if value >= 1 else f"{value:.3g}"


def _size(nbytes) -> str:
    return kiln.human_bytes(nbytes) if nbytes else "—"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _environment(report: dict) -> list[str]:
    e, c = report["environment"], report["config"]
    cpu = e["cpu"]
    versions = ", ".join(f"{k} {v}" for k, v in e["versions"].items())
    peaks = report["machine_peak"].get("flops", {})
    lines = [
        f"# diffkiln bench: {report['subject']['ref']} ({report['subject']['kind']})",
        "",
        f"{c['height']}×{c['width']}, {c['steps']} steps `{c['scheduler']}`, guidance {c['guidance']}, batch "
        f"{c['batch']}, {len(c['prompts'])} prompt(s) × {c['runs']} run(s) after {c['warmup']} warm-up round(s), "
        f"seed {c['seed']}{'; one path resident at a time' if c.get('one_at_a_time') else ''}.",
        "",
        f"- CPU: {cpu['model']}, {cpu['usable_cpus']} usable of {cpu['logical_cpus']} logical CPUs; "
        f"flags {', '.join(cpu['flags']) or 'none of note'}; bf16 {'native' if cpu['native_bf16'] else 'emulated'}",
        f"- memory: {_size(e['memory'].get('memtotal'))} total, {_size(e['memory'].get('memavailable'))} available at "
        f"start; GPU: {'; '.join(e['gpus']) or 'none'}",
        f"- load average at start / end: {e.get('load_average_start')} / {e.get('load_average_end')}",
        f"- {versions}; onnxruntime providers: {', '.join(e['onnxruntime_providers'])}",
        "- measured GEMM peak (n = {}): {}".format(
            report["machine_peak"].get("n"), ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
        ),
    ]
    return lines + [f"- **warning**: {w}" for w in report["warnings"]]


def _paths(report: dict) -> list[str]:
    rows = []
    for name, p in report["paths"].items():
        status = p["status"] if p["status"] == "ok" else f"**{p['status']}**: {p['reason']}"
        rows.append([f"`{name}`", p["description"], status])
    return ["", "## Paths", "", *_table(["path", "what", "status"], rows)]


def denoiser_label(report: dict) -> str:
    """How the tables name the denoiser, whose figures the report keys as "unet": UNet, or Flux's transformer."""
    return DENOISER_LABELS.get(report["subject"].get("denoiser", "unet"), "UNet")


def _latency(report: dict) -> list[str]:
    d = denoiser_label(report)
    header = ["path", "text enc ms", f"{d} total ms", f"{d}/step ms", "VAE decode ms", "other ms"]
    header += ["end to end ms (min–max)", "it/s", "speedup e2e", f"speedup {d}"]
    rows = []
    for name, p in _ran(report):
        lat, total, speed = p["latency"], p["latency"]["total"], p.get("speedup", {})
        e2e = f"{total['median'] * 1000:.1f} ({total['min'] * 1000:.1f}–{total['max'] * 1000:.1f})"
        row = [f"`{name}`", _ms(lat["text_encoding"]), _ms(lat["unet_total"]), _ms(lat["unet_per_step"])]
        row += [_ms(lat["vae_decode"]), _ms(lat["other"]), e2e, f"{p['it_per_s']:.2f}"]
        row += [_num(speed.get("end_to_end"), "{:.2f}×"), _num(speed.get("unet"), "{:.2f}×")]
        rows.append(row)
    n = next((p["latency"]["total"]["n"] for _, p in _ran(report)), 0)
    title = f"## Latency (median of {n} generations; speedup over `{REFERENCE}`)"
    return ["", title, "", *_table(header, rows), "", "![per-stage latency](latency.png)"]


def _efficiency(report: dict) -> list[str]:
    d = denoiser_label(report)
    header = ["path", f"{d} GFLOP/call", f"{d} GFLOP/s", "of GEMM peak", "VAE decode GFLOP/s"]
    rows = []
    for name, p in _ran(report):
        eff = p["efficiency"]
        if "unet_flops_per_s" not in eff:
            rows.append([f"`{name}`", "—", "—", eff.get("reason", "—"), "—"])
            continue
        fraction = eff.get("unet_fraction_of_peak")
        share = f"{fraction:.1%}" if fraction is not None else eff.get("reason", "—")
        rows.append(
            [
                f"`{name}`",
                _gflop(eff["unet_gflop_per_call"]),
                f"{eff['unet_flops_per_s'] / 1e9:.1f}",
                share,
                f"{eff['vae_flops_per_s'] / 1e9:.1f}",
            ]
        )
    return ["", "## Efficiency (achieved FLOP/s against this machine's GEMM peak)", "", *_table(header, rows)]


def _resources(report: dict) -> list[str]:
    header = ["path", "peak RSS", "RSS after imports", "RSS after load", "load s", "export s", "optimize s"]
    header += ["artifact on disk"]
    rows = []
    for name, p in report["paths"].items():
        if p["status"] == "skipped":
            continue
        mem, one, load = p["memory"], p["one_off"], p["load"]
        optimize = one.get("optimize_seconds")
        opt = "—" if optimize is None else f"{optimize:.1f}" + ("" if one.get("optimized_now") else " (earlier)")
        export = one.get("export_seconds")
        exp = "—" if export is None else f"{export:.1f}" + ("" if one.get("exported_now") else " (earlier)")
        rows.append(
            [
                f"`{name}`",
                _size(mem.get("peak")),
                _size(mem.get("after_imports")),
                _size(load.get("rss")),
                _num(load.get("seconds"), "{:.1f}"),
                exp,
                opt,
                _artifact(p),
            ]
        )
    return ["", "## Memory and one-off costs", "", *_table(header, rows)]


def _artifact(path: dict) -> str:
    nbytes = path["one_off"].get("artifact_bytes")
    if nbytes:
        return _size(nbytes)
    return "generated in memory (preset)" if path["backend"] == "torch" else "—"


def _adherence_cell(score: dict, missing: str) -> str:
    """ "100% / 100% / 83%": the evaluator's color, background and shape accuracy, or why there is none."""
    if not score:
        return missing
    return " / ".join(_num(score.get(a), "{:.0%}", "n/a") for a in ("color", "background", "shape"))


def _fidelity(report: dict) -> list[str]:
    adherence = report["adherence"]
    scores = adherence.get("scores", {})
    header = ["path", "PSNR dB (min)", "SSIM (min)", "max |Δ| /255", "adherence: color / background / shape"]
    rows = []
    for name, p in _ran(report):
        f = p["fidelity"]
        score = _adherence_cell(scores.get(name, {}), adherence.get("reason", "n/a"))
        if f.get("reference"):
            rows.append([f"`{name}`", "reference", "reference", "—", score])
        elif "psnr_db" not in f:
            rows.append([f"`{name}`", f.get("reason", "—"), "—", "—", score])
        else:
            psnr = f"{f['psnr_db']:.1f} ({f['psnr_db_min']:.1f})"
            rows.append(
                [f"`{name}`", psnr, f"{f['ssim']:.4f} ({f['ssim_min']:.4f})", f"{f['max_abs_diff_255']:.0f}", score]
            )
    notes = sorted({p["fidelity"]["note"] for _, p in _ran(report) if "note" in p["fidelity"]})
    lines = ["", f"## Fidelity against `{REFERENCE}`", "", *_table(header, rows), *[f"\nNote: {n}" for n in notes]]
    return [*lines, "", "![speed vs fidelity](speed_vs_fidelity.png)", "", "![image grid](image_grid.png)"]


def _ran(report: dict):
    return [(n, p) for n, p in report["paths"].items() if p["status"] == "ok" and "latency" in p]


def markdown(report: dict) -> list[str]:
    """report.md's lines, the method section aside."""
    sections = [_environment, _paths, _latency, _efficiency, _resources, _fidelity]
    return [line for section in sections for line in section(report)]


def console_summary(report: dict) -> list[str]:
    """A few lines for the terminal: one per path."""
    lines = [f"{'path':12s} {'status':8s} {'e2e ms':>10s} {'speedup':>8s} {'PSNR dB':>8s} {'peak RSS':>9s}"]
    for name, p in report["paths"].items():
        if p["status"] != "ok" or "latency" not in p:
            lines.append(f"{name:12s} {p['status']:8s} {p['reason']}")
            continue
        psnr = p["fidelity"].get("psnr_db")
        peak = p["memory"].get("peak")
        lines.append(
            f"{name:12s} {'ok':8s} {p['latency']['total']['median'] * 1000:10.1f} "
            f"{_num(p.get('speedup', {}).get('end_to_end'), '{:.2f}×'):>8s} "
            f"{_num(psnr, '{:.1f}', 'ref' if p['fidelity'].get('reference') else '—'):>8s} "
            f"{_size(peak):>9s}"
        )
    return lines
