"""Flux transformer latency per block, per backend, and its extrapolation to FLUX.1's 19 + 38 blocks.

    .venv/bin/python benchmarks/flux_blocks.py --size 512 \\
        --variant ort-fp32=/tmp/flux-shaped --variant ort-opt=/tmp/flux-shaped-ort-fp32 \\
        --variant ort-int8=/tmp/flux-shaped-ort-int8 --variant openvino-f32=/tmp/flux-shaped:openvino:f32 \\
        --variant openvino-bf16=/tmp/flux-shaped:openvino:bf16 -o benchmarks/results/flux_blocks

The `flux-shaped` preset has FLUX.1-dev's widths (3072 hidden, 24 heads, 4096-wide T5 states) with 1 dual-stream
and 2 single-stream blocks. Each variant runs in its own process (one model in memory at a time): a warm-up call,
one profiled call (ONNX Runtime's per-node profile, OpenVINO's per-node performance counters) whose node times
are attributed to `transformer_blocks.N` / `single_transformer_blocks.N` by node name (a fused node without one
takes its consumers' block), then `--runs` timed calls. Per-block time = the block's share of the profiled call ×
the median timed call. Full FLUX.1 = everything outside the blocks + 19 × dual + 38 × single at the same tokens.
Writes report.json, report.md and blocks.png.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

BLOCK = re.compile(r"(single_transformer_blocks|transformer_blocks)\.(\d+)")
FULL = {"transformer_blocks": 19, "single_transformer_blocks": 38}  # FLUX.1-dev / schnell


def feeds_for(kiln_dir: Path, size: int) -> dict:
    from diffkiln import kiln
    from diffkiln.specs import VAE_SCALE, PipelineInfo, component_specs, dims

    info = PipelineInfo.from_json(kiln.read_manifest(kiln_dir)["pipeline"])
    side = size // VAE_SCALE
    spec = component_specs(info)["transformer"]
    return spec.sample_inputs(dims(1, side, side, text_sequence=info.text_sequence), info, seed=0)


def block_of_nodes(onnx_path: Path) -> dict[str, str]:
    """node name → its block ("other" outside blocks); a nameless fused node takes its consumers' block."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    found = {}
    for node in graph.node:
        match = BLOCK.search(node.name)
        if match is None:
            for out in node.output:
                match = next((m for u in users.get(out, []) if (m := BLOCK.search(u.name))), None)
                if match:
                    break
        found[node.name] = match.group(0) if match else "other"
    return found


def attribute(times: dict[str, float], blocks: dict[str, str]) -> Counter:
    shares: Counter = Counter()
    for name, t in times.items():
        match = BLOCK.search(name)
        shares[match.group(0) if match else blocks.get(name, _prefix_block(name, blocks))] += t
    return shares


def _prefix_block(name: str, blocks: dict[str, str]) -> str:
    """ORT/OpenVINO name fused nodes after one of the originals (plus a suffix): match the longest prefix."""
    best = max((n for n in blocks if n and name.startswith(n)), key=len, default=None)
    return blocks[best] if best else "other"


def run_one(kiln_dir: Path, backend: str, hint: str | None, size: int, runs: int) -> dict:
    import resource

    from diffkiln import kiln

    path = kiln.model_path(kiln_dir, "transformer")
    feeds = feeds_for(kiln_dir, size)
    start = time.perf_counter()
    if backend == "ort":
        from diffkiln.runtime.runners import OrtOptions, session_from_onnx

        prefix = tempfile.mkdtemp() + "/profile"
        session = session_from_onnx(path, OrtOptions(profile_prefix=prefix))
        load = time.perf_counter() - start
        session.run(None, feeds)
        session.run(None, feeds)  # the profiled call (the warm-up is in the profile too: only the last counts)
        events = json.loads(Path(session.end_profiling()).read_text())
        node_times = _last_run(events)
        session = _unprofiled(path)
        infer = lambda: session.run(None, feeds)  # noqa: E731
    else:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint or "f32", "PERF_COUNT": "YES"}
        compiled = core.compile_model(model, "CPU", config)
        load = time.perf_counter() - start
        request = compiled.create_infer_request()
        request.infer(feeds)
        request.infer(feeds)
        node_times = {p.node_name: p.real_time.total_seconds() * 1e6 for p in request.profiling_info}
        infer = lambda: request.infer(feeds)  # noqa: E731
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        infer()
        times.append(time.perf_counter() - t0)
    shares = attribute(node_times, block_of_nodes(path))
    total = sum(shares.values()) or 1.0
    median = statistics.median(times)
    return {
        "load_seconds": load,
        "seconds": times,
        "median_seconds": median,
        "blocks": {k: median * v / total for k, v in sorted(shares.items())},
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: kB
    }


def _last_run(events: list[dict]) -> dict[str, float]:
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    begin = runs[-1]["ts"] if runs else 0
    out: Counter = Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= begin:
            out[e["name"][: -len("_kernel_time")]] += e["dur"]
    return out


def _unprofiled(path: Path):
    from diffkiln.runtime.runners import session_from_onnx

    return session_from_onnx(path)


def summarize(name: str, result: dict) -> dict:
    blocks = result["blocks"]
    by_kind = {}
    for kind in FULL:
        values = [v for k, v in blocks.items() if k.startswith(kind + ".")]
        by_kind[kind] = statistics.mean(values) if values else 0.0
    other = blocks.get("other", 0.0)
    full = other + sum(FULL[k] * by_kind[k] for k in FULL)
    return {
        "name": name,
        "median_seconds": result["median_seconds"],
        "other_seconds": other,
        "dual_block_seconds": by_kind["transformer_blocks"],
        "single_block_seconds": by_kind["single_transformer_blocks"],
        "full_flux_seconds": full,
        "peak_rss_bytes": result["peak_rss_bytes"],
        "load_seconds": result["load_seconds"],
    }


COLUMNS = (
    ("flux-shaped call", "median_seconds", "{:.2f} s"),
    ("outside blocks", "other_seconds", "{:.2f} s"),
    ("dual block", "dual_block_seconds", "{:.2f} s"),
    ("single block", "single_block_seconds", "{:.2f} s"),
    ("FLUX.1 (19 + 38) est.", "full_flux_seconds", "{:.1f} s"),
)


def write(rows: list[dict], size: int, text_tokens: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"size": size, "text_tokens": text_tokens, "rows": rows}, indent=2))
    tokens = f"{(size // 16) ** 2} image + {text_tokens} text tokens"
    head = " | ".join(c[0] for c in COLUMNS)
    lines = [f"Flux transformer at {size}×{size} (batch 1, {tokens}), per call:", "",
             f"| variant | {head} | peak RSS |", "|---" * (len(COLUMNS) + 2) + "|"]  # fmt: skip
    for r in rows:
        cells = " | ".join(fmt.format(r[key]) for _, key, fmt in COLUMNS)
        lines.append(f"| {r['name']} | {cells} | {r['peak_rss_bytes'] / 1e9:.1f} GB |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["dual_block_seconds"] for r in rows], 0.4, label="dual-stream block")
    ax.bar(x + 0.2, [r["single_block_seconds"] for r in rows], 0.4, label="single-stream block")
    ax.set_xticks(x, [r["name"] for r in rows])
    ax.set_ylabel("seconds per block")
    ax.set_title(f"Flux block latency at {size}², 2-core CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "blocks.png", dpi=120)
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", action="append", required=True, help="NAME=KILN[:ort|openvino[:f32|bf16]]")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/flux_blocks"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print its JSON
    args = parser.parse_args()
    if args.one:
        kiln_dir, backend, hint = [*args.one.split(":"), "ort", None][:3]
        print(json.dumps(run_one(Path(kiln_dir), backend, hint, args.size, args.runs)))
        return 0
    rows = []
    for variant in args.variant:
        name, _, spec = variant.partition("=")
        print(f"{name}: running {spec} …", file=sys.stderr)
        command = [sys.executable, __file__, "--one", spec, "--size", str(args.size), "--runs", str(args.runs)]
        done = subprocess.run([*command, "--variant", variant], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{name}: failed: {done.stderr.strip()[-400:]}", file=sys.stderr)
            continue
        rows.append(summarize(name, json.loads(done.stdout.strip().splitlines()[-1])))
        print(f"{name}: {rows[-1]['median_seconds']:.2f} s per call", file=sys.stderr)
    from diffkiln import kiln

    first = Path(args.variant[0].partition("=")[2].split(":")[0])
    write(rows, args.size, kiln.read_manifest(first)["pipeline"]["text_sequence"], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
