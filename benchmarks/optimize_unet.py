"""UNet latency: torch fp32 eager vs ONNX Runtime fp32 on the plain export vs the optimized graphs.

    .venv/bin/python benchmarks/optimize_unet.py [--preset sd15] [--size 512] [--batch 2] [--runs 5] [--profile]

The headline case is the SD1.5 architecture at 512² (64×64 latent), batch 2 (one CFG step). Every path runs in
this one process on the same inputs: a warm-up call, then `--runs` timed calls; the median is reported. Paths:
  torch         diffusers UNet2DConditionModel, fp32 eager, torch.inference_mode
  ort-plain     the exported graph as is
  ort-<form>    the ort-cpu preset with attention as MultiHeadAttention ("mha", the default choice),
                the standard-ONNX canonical form, or left unfused ("keep")
  openvino-f32, openvino-bf16   OpenVINO (the peer) on the plain export, inference precision set explicitly
                (`--openvino f32,bf16`; skipped when openvino is not installed)
`--int8` adds diffkiln's int8 UNets (`optimize --precision int8`, calibrated here on 10 seeded sample inputs
at the bench shape, 2 of them held back for the PSNR; a UNet-only kiln cannot run the pipeline): ort-int8 (ort-cpu
target: uint8 activations, ORT's x86 U8S8 kernels), ort-int8-s8 (int8 activations), openvino-int8 and
openvino-int8-bf16 (the tensorrt target's standard-ONNX graph, OpenVINO with the f32 / bf16 hint for the rest).
`--profile` adds ONNX Runtime's per-op-type time for one call of each ORT path (where the time goes).
Efficiency: the UNet's FLOPs are counted once (torch's FlopCounterMode) and each path's achieved GFLOP/s is set
against this machine's measured fp32 GEMM peak (a 2048² matmul on all cores, measured first).
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
from dataclasses import replace
from pathlib import Path

from diffkiln import kiln
from diffkiln.exporter import ExportOptions, export, open_source
from diffkiln.optimizers.optimize import optimize
from diffkiln.optimizers.precision.apply import PrecisionOptions
from diffkiln.optimizers.precision.sensitivity import psnr_db
from diffkiln.runtime.runners import OpenVinoRunner, OrtOptions, session_from_onnx
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
    options = OrtOptions(device="cpu")
    session = session_from_onnx(path, options)
    times = timed(lambda: session.run(None, feeds), runs)
    result = {"times": times, "output": session.run(None, feeds)[0]}
    if profile:
        profiled = replace(options, profile_prefix=str(Path(tempfile.mkdtemp()) / "ort"))
        session = session_from_onnx(path, profiled)
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


def openvino_path(path: Path, feeds: dict, runs: int, hint: str) -> dict:
    with OpenVinoRunner(path, precision_hint=hint) as runner:
        times = timed(lambda: runner.infer(feeds), runs)
        ran = runner.precision_hint
        output = next(iter(runner.infer(feeds).values()))
    gc.collect()
    return {"times": times, "precision": ran, "output": output}


def gemm_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Best fp32 GEMM throughput over a few repeats: the machine's practical peak."""
    import numpy as np

    a, b = (np.random.default_rng(i).standard_normal((n, n), dtype=np.float32) for i in range(2))
    best = min(timed(lambda: a @ b, repeats))
    return 2 * n**3 / best / 1e9


def torch_path(preset: str, feeds: dict, runs: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet = open_source(preset).load("unet")
    args = [torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "encoder_hidden_states")]
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            unet(*args, return_dict=False)
        times = timed(lambda: unet(*args, return_dict=False), runs)
        output = unet(*args, return_dict=False)[0].numpy()
    unet = None
    gc.collect()
    return {"times": times, "gflop": counter.get_total_flops() / 1e9, "output": output}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--kiln", type=Path, help="reuse an exported kiln dir (default: export the UNet to a temp dir)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--forms", default="mha,keep,canonical", help="attention forms to optimize and time")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--int8", action="store_true", help="add diffkiln's int8 UNets (ORT and OpenVINO)")
    parser.add_argument("--openvino", default="f32,bf16", help="OpenVINO precision hints to time ('' for none)")
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

    int8_paths = {}
    if args.int8:
        spec = component_specs(info)["unet"]
        calib = [spec.sample_inputs(dims(args.batch, args.size // 8, args.size // 8), info, seed=s) for s in range(10)]
        builds = [
            ("ort-int8", "ort-cpu", None),
            ("ort-int8-s8", "ort-cpu", "int8"),
            ("int8-std", "tensorrt", "int8"),
        ]
        for name, target, activations in builds:
            out = root / name
            start = time.perf_counter()
            optimize(
                kiln_dir, target, "int8", out=out, log=print, components=["unet"],
                calibration=lambda _components: {"unet": calib},
                options=PrecisionOptions(activations=activations),
            )  # fmt: skip
            report = json.loads((out / "precision_report.json").read_text())["components"]["unet"]
            psnr = report["fidelity"]["psnr_db"]
            print(f"{name}: built in {time.perf_counter() - start:.0f} s, held-back UNet PSNR {psnr:.1f} dB")
            int8_paths[name] = kiln.model_path(out, "unet")
        paths["ort-int8"], paths["ort-int8-s8"] = int8_paths["ort-int8"], int8_paths["ort-int8-s8"]

    peak = gemm_peak_gflops()
    print(f"fp32 GEMM peak: {peak:.0f} GFLOP/s")
    results = {"torch": torch_path(args.preset, feeds, args.runs)}
    gflop = results["torch"]["gflop"]
    for name, path in paths.items():
        results[name] = ort_path(path, feeds, args.runs, args.profile)
        print(f"{name}: median {statistics.median(results[name]['times']):.2f} s", flush=True)
    import importlib.util

    hints = [h for h in args.openvino.split(",") if h] if importlib.util.find_spec("openvino") else []
    for hint in hints:
        name = f"openvino-{hint}"
        results[name] = openvino_path(paths["ort-plain"], feeds, args.runs, hint)
        print(f"{name}: median {statistics.median(results[name]['times']):.2f} s", flush=True)

    if args.int8 and importlib.util.find_spec("openvino"):
        for hint in ("f32", "bf16"):
            name = "openvino-int8" + ("" if hint == "f32" else "-bf16")
            results[name] = openvino_path(int8_paths["int8-std"], feeds, args.runs, hint)
            print(f"{name}: median {statistics.median(results[name]['times']):.2f} s", flush=True)
    reference = results["ort-plain"]["output"]
    for r in results.values():  # every path's output on the bench input against ORT on the plain export
        r["psnr_db"] = round(psnr_db([r.pop("output")], [reference]), 1)

    base = statistics.median(results["ort-plain"]["times"])
    print(f"\n{args.preset} UNet, batch {args.batch}, {args.size}², {args.runs} runs, {os.cpu_count()} threads")
    print(f"{gflop:.0f} GFLOP per call; fp32 GEMM peak {peak:.0f} GFLOP/s")
    columns = [("median s", 9), ("min s", 7), ("vs ort-plain", 13), ("vs torch", 9), ("GFLOP/s", 8), ("of peak", 8)]
    columns += [("PSNR vs ort-plain", 20)]
    print(f"{'path':14s} " + " ".join(f"{c:>{w}s}" for c, w in columns))
    torch_median = statistics.median(results["torch"]["times"])
    for name, r in results.items():
        median = statistics.median(r["times"])
        r["median_s"] = round(median, 3)
        r["gflops"] = round(gflop / median, 1)
        print(
            f"{name:14s} {median:9.2f} {min(r['times']):7.2f} {base / median:12.2f}× {torch_median / median:8.2f}× "
            f"{gflop / median:8.0f} {gflop / median / peak:7.0%}" + f"   {r['psnr_db']:6.1f} dB"
        )
        for op, seconds in r.get("profile_s", {}).items():
            print(f"    {op:28s} {seconds:7.3f} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor()}
    config = {k: v for k, v in vars(args).items() if k != "kiln"}
    summary = {"machine": machine, "config": config, "gemm_peak_gflops": round(peak, 1), "unet_gflop": gflop}
    RESULTS.write_text(json.dumps({**summary, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
