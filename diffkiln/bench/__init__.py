"""`diffkiln bench`: the PyTorch reference and every diffkiln path side by side, in one run, with a report.

    from diffkiln.bench import run_bench
    run_bench("tiny", ["torch-fp32", "ort-fp32", "ort-opt"], steps=4, runs=2, report_dir=Path("bench-report"))

Modules, one job each:
    config      settings every path shares, the jobs (prompt + initial noise) they all get
    subject     what is benchmarked: the model's PyTorch source and its kiln directory
    paths       the paths a bench can compare and why one cannot run here
    session     plan → artifacts → one worker per path → interleaved calls
    artifacts   what each path runs (export, optimize, peer optimizer) and its one-off cost
    workers     the child processes and their protocol
    tools       one-off work in a child: export, optimize, GEMM peak, FLOP count (flops), peer optimizer (ortx)
    torch_ref   the diffusers reference pipeline with per-stage timing
    kiln_runner diffkiln's runtime over a kiln directory (ONNX Runtime, or OpenVINO as a peer)
    measure     statistics, RSS, GEMM timing       fidelity  PSNR, SSIM, prompt adherence
    summary     raw timings → report figures       report    report.json / report.md     plots  the PNGs
    micro       per-component micro-benchmarks      command   click options for `diffkiln bench`
    script      command line of the scripted benchmarks in benchmarks/
Importing this package loads nothing else (its names resolve on first use: `diffkiln run` must not pay for the
bench); the workers import what their path needs.
"""

import importlib

_WHERE = {
    "DEFAULT_PATHS": "paths",
    "PATHS": "paths",
    "bench_command": "command",
    "click_options": "command",
    "run_bench": "run",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'diffkiln.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(f"diffkiln.bench.{_WHERE[name]}"), name)
