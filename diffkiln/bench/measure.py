"""Small measurement helpers: wall-clock statistics, a process's resident memory, and a GEMM peak.

Memory is read from the kernel (`/proc/self/status`): VmRSS is what the process holds now, VmHWM its peak since it
started (the "high water mark"). Each bench path runs in its own worker process, so a worker's VmHWM is that path's
peak RSS, interpreter and libraries included.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

GEMM_REPEATS = 5  # a GEMM peak is the best of this many calls


def stats(values: Sequence[float]) -> dict:
    """median / min / max / n of a list of seconds (empty → n = 0 and no figures)."""
    if not values:
        return {"n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def memory() -> dict[str, int]:
    """{"rss": bytes resident now, "peak": peak bytes since the process started}."""
    status = Path("/proc/self/status")
    if status.is_file():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        kib = {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM") if key in fields}
        if len(kib) == 2:
            return {"rss": kib["VmRSS"] * 1024, "peak": kib["VmHWM"] * 1024}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak *= 1 if sys.platform == "darwin" else 1024
    return {"rss": peak, "peak": peak}


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` calls after one warm-up call (a peak wants the best case, not the typical one)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_side(cores: int) -> int:
    """A square GEMM big enough to reach peak on `cores` cores without taking long: 2048 up to 8 cores, else 4096."""
    return 2048 if cores <= 8 else 4096


def numpy_gemm_flops(n: int, repeats: int = GEMM_REPEATS) -> float:
    """FLOP/s of an fp32 n×n×n matmul through numpy's BLAS (2·n³ FLOPs a call)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    return 2 * n**3 / best_time(lambda: a @ b, repeats)
