"""Time and peak memory of folding a LoRA into an existing kiln dir, against re-exporting the model.

    .venv/bin/python benchmarks/lora_fold.py KILN_DIR [--rank 32] [--reexport PRESET]

Generates a LoRA shaped like a typical kohya SD1.5 LoRA for KILN_DIR (every UNet transformer Linear, proj_in/out,
every CLIP attention and MLP Linear; rank 32, fp16, one alpha), then folds it in a child process twice: into a
new kiln dir, and into a refit payload only. Peak RSS is the child's, from the kernel (wait4's ru_maxrss), as in
export_memory.py. The re-export baseline is `--reexport PRESET` measured the same way, else the preset's row in
benchmarks/results/export_memory.json. Goals: folding ≥ 3× faster than re-exporting, peak RSS < 2× model size.
Writes benchmarks/results/lora_fold.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from diffkiln import kiln
from diffkiln.lora.initializers import ComponentGraph

RESULTS = Path(__file__).parent / "results" / "lora_fold.json"
TARGETS = {
    "unet": r"(transformer_blocks\.\d+\.(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2))|proj_(in|out))\.weight$",
    "text_encoder": r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$",
}
PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def make_lora(kiln_dir: Path, path: Path, rank: int) -> int:
    """Write a kohya-format LoRA for the kiln's weights; returns the number of modules."""
    rng = np.random.default_rng(0)
    weight_map = json.loads((kiln_dir / kiln.WEIGHT_MAP).read_text())
    tensors = {}
    for component, pattern in TARGETS.items():
        graph = ComponentGraph(kiln_dir / component)
        for name, entry in weight_map[component].items():
            if not re.search(pattern, name):
                continue
            shape = graph.shape(entry["initializer"])[:: -1 if entry["transposed"] else 1]
            key = PREFIX[component] + name.removesuffix(".weight").replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = (rng.standard_normal((rank, *shape[1:])) * 0.01).astype(np.float16)
            tensors[f"{key}.lora_up.weight"] = (rng.standard_normal((shape[0], rank, *shape[2:])) * 0.01).astype(
                np.float16
            )
            tensors[f"{key}.alpha"] = np.array(rank / 2, dtype=np.float16)
    save_file(tensors, str(path))
    return len(tensors) // 3


def measure(cmd: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    return {
        "exit_code": os.waitstatus_to_exitcode(status),
        "seconds": round(seconds, 2),
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),  # ru_maxrss is in KiB on Linux
        "log": proc.stdout.read().strip().splitlines()[-6:],
    }


def fold_cmd(kiln_dir: Path, lora: Path, out: Path | None, payload: Path | None) -> list[str]:
    code = (
        "import sys; from pathlib import Path; from diffkiln.lora import fold_loras; "
        "out, payload = (Path(a) if a != '-' else None for a in sys.argv[3:5]); "
        "fold_loras(Path(sys.argv[1]), [(Path(sys.argv[2]), 0.8)], out, refit_payload=payload, log=print)"
    )
    return [sys.executable, "-c", code, str(kiln_dir), str(lora), str(out or "-"), str(payload or "-")]


def baseline(preset: str | None, scratch: Path) -> dict | None:
    if preset:
        row = measure([sys.executable, "-m", "diffkiln.cli", "export", preset, "-o", str(scratch / "export")])
        shutil.rmtree(scratch / "export", ignore_errors=True)
        return {"preset": preset, "measured": "now", **row}
    recorded = Path(__file__).parent / "results" / "export_memory.json"
    runs = json.loads(recorded.read_text())["runs"] if recorded.is_file() else []
    row = next((r for r in runs if r["preset"] == "sd15"), None)
    return {**row, "measured": str(recorded.relative_to(Path.cwd()))} if row else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kiln", type=Path)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument(
        "--reexport", metavar="PRESET", help="also time `diffkiln export PRESET` (else use sd15's record)"
    )
    args = parser.parse_args()
    model_bytes = sum(f.stat().st_size for f in args.kiln.glob("*/model.onnx*"))
    with tempfile.TemporaryDirectory(prefix="diffkiln-lora-", dir=args.kiln.parent) as tmp:
        scratch = Path(tmp)
        modules = make_lora(args.kiln, scratch / "lora.safetensors", args.rank)
        lora_mb = (scratch / "lora.safetensors").stat().st_size / 1e6
        print(
            f"LoRA: {modules} modules, rank {args.rank}, {lora_mb:.0f} MB; model {model_bytes / 1e9:.2f} GB", flush=True
        )
        rows = {
            "fold_to_kiln_dir": measure(fold_cmd(args.kiln, scratch / "lora.safetensors", scratch / "out", None)),
            "fold_to_payload": measure(fold_cmd(args.kiln, scratch / "lora.safetensors", None, scratch / "p.st")),
        }
        export = baseline(args.reexport, scratch)
    for name, row in rows.items():
        status = "ok" if row["exit_code"] == 0 else f"FAILED ({row['exit_code']}): {row['log'][-1:]}"
        ratio = row["peak_rss_gb"] * 1e9 / model_bytes
        speedup = f", {export['seconds'] / row['seconds']:.1f}× faster than export" if export else ""
        rss = f"peak RSS {row['peak_rss_gb']:5.2f} GB ({ratio:.2f}× model)"
        print(f"{name:18s} {status} {row['seconds']:7.1f} s  {rss}{speedup}")
    if export:
        rss = f"peak RSS {export['peak_rss_gb']:5.2f} GB"
        print(f"{'re-export':18s} {export['seconds']:7.1f} s  {rss} ({export['measured']})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}
    result = {
        "machine": machine,
        "kiln": str(args.kiln),
        "model_gb": round(model_bytes / 1e9, 2),
        "lora_modules": modules,
    }
    RESULTS.write_text(json.dumps({**result, "rank": args.rank, **rows, "export": export}, indent=2) + "\n")


if __name__ == "__main__":
    main()
