"""The tools worker: everything a bench does once, before timing starts, in a child process of its own.

Exporting, optimizing, probing torch, measuring the GEMM peak and counting FLOPs all import the PyTorch or ONNX
stacks and allocate gigabytes for big models; doing them in a child that exits before the paths load keeps that
memory out of the measurements (and the parent light).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from diffkiln import kiln
from diffkiln.bench.measure import GEMM_REPEATS, best_time, gemm_side, numpy_gemm_flops


class ToolsBackend:
    """Worker backend for the one-off work; each op imports what it needs."""

    def op_caps(self) -> dict:
        """Facts the path plan needs that take heavy imports: the precisions `diffkiln optimize` offers, and
        torch's bf16 support on this CPU and its thread count."""
        from diffkiln.optimizers.presets import PRECISIONS

        caps = {"ort_precisions": list(PRECISIONS), "torch_bf16": None}
        try:
            import torch
        except ImportError:
            return caps
        bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return {**caps, "torch_bf16": bool(bf16), "torch_threads": torch.get_num_threads()}

    def op_gemm_peaks(self, with_torch: bool, bf16: bool) -> dict:
        """Best FLOP/s of a square matmul: numpy fp32 (BLAS), torch fp32 and torch bf16 (oneDNN)."""
        n = gemm_side(os.cpu_count() or 1)
        peaks = {"numpy_fp32": numpy_gemm_flops(n)}
        if with_torch:
            import torch

            dtypes = {"torch_fp32": torch.float32, **({"torch_bf16": torch.bfloat16} if bf16 else {})}
            for name, dtype in dtypes.items():
                a, b = (torch.randn(n, n).to(dtype) for _ in range(2))
                with torch.inference_mode():
                    peaks[name] = 2 * n**3 / best_time(lambda a=a, b=b: a @ b, GEMM_REPEATS)
        return {"n": n, "flops": peaks}

    def op_count_flops(self, source_ref: str, height: int, width: int, batch: int, cfg: bool) -> dict:
        from diffkiln.bench.flops import count_pipeline_flops

        return count_pipeline_flops(source_ref, height, width, batch, cfg)

    def op_source_matches(self, source_ref: str, fingerprint: str) -> bool:
        """Whether the source still has the weights the kiln directory was exported from."""
        from diffkiln.exporter.resolve import open_source

        return open_source(source_ref).fingerprint() == fingerprint

    def op_export(self, ref: str) -> dict:
        """The plain kiln directory for a preset or folder: exported into the user cache unless already there.
        `seconds` is this run's export time, or the time recorded in the manifest when it was exported earlier."""
        from diffkiln.models import resolve_model

        started, start = time.time(), time.perf_counter()
        kiln_dir = resolve_model(ref, log=lambda _msg: None)
        seconds = time.perf_counter() - start
        done_now = (kiln_dir / kiln.MANIFEST).stat().st_mtime >= started
        if not done_now:
            components = kiln.read_manifest(kiln_dir)["components"].values()
            seconds = sum(c.get("export_seconds", 0.0) for c in components)
        return {"kiln_dir": str(kiln_dir), "seconds": seconds, "done_now": done_now}

    def op_optimize(self, kiln_dir: str, target: str, precision: str) -> dict:
        """`diffkiln optimize` into its default folder (a no-op when that is up to date); `seconds` as for export."""
        from diffkiln.calibration import optimize_with_calibration
        from diffkiln.optimizers.optimize import REPORT, default_out

        out = default_out(Path(kiln_dir), target, precision)
        started, start = time.time(), time.perf_counter()
        report = optimize_with_calibration(Path(kiln_dir), target, precision, log=lambda _msg: None)
        seconds = time.perf_counter() - start
        done_now = (out / REPORT).stat().st_mtime >= started
        if not done_now:
            seconds = sum(c.get("seconds", 0.0) for c in report.get("components", {}).values())
        return {"kiln_dir": str(out), "seconds": seconds, "done_now": done_now}

    def op_build(self, kiln_dir: str) -> dict:
        """`diffkiln build` into KILN/engines with the kiln's own profiles (a no-op when up to date)."""
        from diffkiln.builder.build import BuildRequest, build

        start = time.perf_counter()
        folder = build(Path(kiln_dir), BuildRequest(), log=lambda _msg: None)
        return {"engines": str(folder), "seconds": time.perf_counter() - start}

    def op_optimize_ortx(self, kiln_dir: str) -> dict:
        from diffkiln.bench.ortx import optimize_with_ort_transformers

        return optimize_with_ort_transformers(Path(kiln_dir))
