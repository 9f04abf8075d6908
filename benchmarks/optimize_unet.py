"""UNet latency: torch fp32 eager vs ONNX Runtime fp32 on the plain export vs the optimized graphs.

    .venv/bin/python benchmarks/optimize_unet.py [--preset sd15] [--size 512] [--batch 2] [--runs 5] [--profile]

The headline case is the SD1.5 architecture at 512² (64×64 latent), batch 2 (one CFG step). Every path runs in
this one process on the same inputs: a warm-up call, then `--runs` timed calls; the median is reported. Paths:
  torch         diffusers UNet2DConditionModel, fp32 eager, torch.inference_mode
  ort-plain     the exported graph as is
  ort-<form>    the ort-cpu preset with attention as MultiHeadAttention ("mha", the default choice),
                the standard-ONNX canonical form, or left unfused ("keep")
`--profile` adds ONNX Runtime's per-op-type time for one call of each ORT path (where the time goes).
Sessions are created one at a time, so peak memory stays near one model plus activations.
Results: benchmarks/results/optimize_unet.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from diffkiln import kiln
from diffkiln.exporter import ExportOptions, export, open_source
from diffkiln.optimizers.optimize import optimize
from diffkiln.specs import PipelineInfo, component_specs, dims

RESULTS = Path(__file__).parent / "results" / "optimize_unet.json"


def timed(fn, runs: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def ort_path(path: Path, feeds: dict, runs: int, profile: bool) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    times = timed(lambda: session.run(None, feeds), runs)
    result = {"times": times}
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        trace = json.loads(Path(session.end_profiling()).read_text())
        per_op: Counter[str] = Counter()
        for event in trace:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                per_op[event["args"]["op_name"]] += event["dur"] / 1e6
        result["profile_s"] = {op: round(s, 3) for op, s in per_op.most_common(12)}
    session = None
    gc.collect()
    return result


def torch_path(preset: str, feeds: dict, runs: int) -> dict:
    import torch

    unet = open_source(preset).load("unet")
    args = [torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "encoder_hidden_states")]
    with torch.inference_mode():
        times = timed(lambda: unet(*args, return_dict=False), runs)
    unet = None
    gc.collect()
    return {"times": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--kiln", type=Path, help="reuse an exported kiln dir (default: export the UNet to a temp dir)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--forms", default="mha,keep,canonical", help="attention forms to optimize and time")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="diffkiln-unet-"))
    kiln_dir = args.kiln or root / "kiln"
    if not args.kiln:
        export(open_source(args.preset), kiln_dir, ExportOptions(components=("unet",)), log=print)
    info = PipelineInfo.from_json(kiln.read_manifest(kiln_dir)["pipeline"])
    feeds = component_specs(info)["unet"].sample_inputs(dims(args.batch, args.size // 8, args.size // 8), info, seed=0)

    paths = {"ort-plain": kiln.model_path(kiln_dir, "unet")}
    for form in args.forms.split(","):
        out = root / f"opt-{form}"
        start = time.perf_counter()
        optimize(kiln_dir, "ort-cpu", out=out, log=print, attention=form)
        print(f"optimized ({form}) in {time.perf_counter() - start:.1f} s")
        paths[f"ort-{form}"] = kiln.model_path(out, "unet")

    results = {"torch": torch_path(args.preset, feeds, args.runs)}
    for name, path in paths.items():
        results[name] = ort_path(path, feeds, args.runs, args.profile)
        print(f"{name}: median {statistics.median(results[name]['times']):.2f} s", flush=True)

    base = statistics.median(results["ort-plain"]["times"])
    print(f"\n{args.preset} UNet, batch {args.batch}, {args.size}², {args.runs} runs, {os.cpu_count()} threads")
    print(f"{'path':14s} {'median s':>9s} {'min s':>7s} {'vs ort-plain':>13s} {'vs torch':>9s}")
    torch_median = statistics.median(results["torch"]["times"])
    for name, r in results.items():
        median = statistics.median(r["times"])
        r["median_s"] = round(median, 3)
        print(f"{name:14s} {median:9.2f} {min(r['times']):7.2f} {base / median:12.2f}× {torch_median / median:8.2f}×")
        for op, seconds in r.get("profile_s", {}).items():
            print(f"    {op:28s} {seconds:7.3f} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor()}
    config = {k: v for k, v in vars(args).items() if k != "kiln"}
    RESULTS.write_text(json.dumps({"machine": machine, "config": config, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
