"""One bench session: plan the paths, make their artifacts, start one worker per path, run calls interleaved.

    with BenchSession(subject, ["torch-fp32", "ort-opt"], config, log) as session:
        for run, index, result, measured in session.interleaved(calls, runs=3, warmup=1):
            ...

Phases, in order, so nothing one-off overlaps a measurement:
1. tools worker (alone): torch facts, GEMM peak, FLOP count, export / optimize artifacts; then it exits.
2. path workers: spawned together (library imports overlap), then each loads its model one at a time.
3. calls: round r sends call 1 to path A, B, C…, then call 2 to A, B, C…; warm-up rounds are not recorded.
A path that cannot run is "skipped" with the reason before any work; one whose worker fails is "failed" with the
error, and the others go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffkiln.bench import artifacts, env
from diffkiln.bench.config import BenchConfig
from diffkiln.bench.paths import PATHS, PathDef, skip_reason
from diffkiln.bench.subject import Subject
from diffkiln.bench.workers import Worker, WorkerError

SETTLE_S = 0.2  # pause before each call: the previous worker's spinning thread pools go idle first
MEMORY_FACTOR = 1.4  # a path's resident memory ≈ its fp32 weights × this, activations included (rough)


@dataclass
class PathRun:
    """One requested path: its plan, artifact, worker and outcome."""

    definition: PathDef
    status: str = "pending"  # pending → ok | skipped | failed
    reason: str | None = None
    kiln_dir: Path | None = None
    one_off: dict = field(default_factory=dict)  # export / optimize seconds, artifact bytes
    load: dict = field(default_factory=dict)  # load seconds, RSS after load, threads, device
    memory: dict = field(default_factory=dict)  # the worker's RSS record (measure.memory)
    worker: Worker | None = None
    samples: list[dict] = field(default_factory=list)  # measured results, one per call
    images: dict[int, np.ndarray] = field(default_factory=dict)  # prompt index → [B, H, W, 3]

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def active(self) -> bool:
        return self.status in ("pending", "ok")

    def skip(self, reason: str) -> None:
        self.status, self.reason = "skipped", reason

    def fail(self, reason: str) -> None:
        self.status, self.reason = "failed", reason
        self.retire()

    def retire(self) -> None:
        """Close the worker; memory keeps the largest figures over all of this path's worker lives."""
        if self.worker is not None:
            for key, value in self.worker.close().items():
                self.memory[key] = max(value, self.memory.get(key, 0))
            self.worker = None


class BenchSession:
    def __init__(
        self, subject: Subject, names: list[str], config: BenchConfig, log: Callable = print, one_at_a_time=False
    ):
        self.subject, self.config, self.log = subject, config, log
        self.one_at_a_time = one_at_a_time  # memory-bound machines: one path resident at a time, round by round
        self.runs = [PathRun(PATHS[n]) for n in names]
        self.caps: dict = {}
        self.machine: dict = {}  # GEMM peaks
        self.flops: dict = {}  # per-call FLOPs per component, or {"reason": …}
        self.warnings: list[str] = []

    def __enter__(self) -> BenchSession:
        try:
            self._tools_phase()
            if not self.one_at_a_time:
                self._check_memory()
                self._bring_up(self.active())
        except BaseException:
            self._close_workers()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._close_workers()

    def active(self) -> list[PathRun]:
        return [r for r in self.runs if r.active]

    # -- phase 1: one-off work in the tools worker ---------------------------------------------------------------

    def _tools_phase(self) -> None:
        tools = Worker("tools", "tools").start()
        try:
            tools.ready()
            self.caps = {**self._static_caps(), **tools.call("caps")}
            for run in self.runs:
                reason = skip_reason(run.definition, self.caps)
                if reason:
                    run.skip(reason)
            self._probe(tools)
            self._make_artifacts(tools)
        finally:
            tools.close()

    def _static_caps(self) -> dict:
        s = self.subject
        caps = {m: env.has_module(m) for m in ("torch", "diffusers", "openvino", "tensorrt")}
        caps["gpus"] = env.gpus()
        caps["native_bf16"] = env.cpu()["native_bf16"]
        caps["source"], caps["source_problem"] = s.source_ref, s.source_problem
        caps["kiln"] = bool(s.kiln_dir or s.source_ref)
        caps["flux"] = s.info.is_flux
        return caps

    def _probe(self, tools: Worker) -> None:
        """GEMM peak (with torch where it is installed) and the FLOPs of one call of each component."""
        self.log("measuring the GEMM peak of this machine")
        bf16 = bool(self.caps.get("torch_bf16") and self.caps["native_bf16"])
        self.machine = tools.call("gemm_peaks", with_torch=self.caps["torch"], bf16=bf16)
        if not (self.caps["torch"] and self.caps["diffusers"] and self.subject.source_ref):
            self.flops = {"reason": "counting FLOPs needs torch, diffusers and the model's source"}
            return
        c = self.config
        try:
            self.flops = tools.call(
                "count_flops",
                source_ref=self.subject.source_ref,
                height=c.height,
                width=c.width,
                batch=c.batch,
                cfg=c.cfg,
            )
        except WorkerError as e:
            self.flops = {"reason": str(e)}

    def _make_artifacts(self, tools: Worker) -> None:
        """The kiln directory each active path runs, made (or found up to date) before anything is timed."""
        kiln_runs = [r for r in self.active() if r.definition.artifact != "source"]
        base = None
        if kiln_runs:
            if self.subject.kiln_dir is None:
                self.log(f"{self.subject.ref}: finding its export in the cache (exporting it the first time)")
            try:
                base = artifacts.base_kiln(tools, self.subject)
                done = f"exported in {base['seconds']:.1f} s into" if base["done_now"] else "using"
                self.log(f"{self.subject.ref}: {done} {base['kiln_dir']}")
            except WorkerError as e:
                for run in kiln_runs:
                    run.fail(f"export failed: {e}")
        for run in self.active():
            if run.definition.artifact in ("optimize", "ortx"):
                self.log(f"{run.name}: optimizing ({run.definition.description})")
            try:
                run.kiln_dir, run.one_off = artifacts.make(tools, run.definition, base, self.subject.source_ref)
            except WorkerError as e:
                run.fail(f"preparing its artifact failed: {e}")
        torch_runs = any(r.definition.backend == "torch" for r in self.active())
        if base is not None and self.subject.source_ref and torch_runs:
            warning = artifacts.weights_mismatch(tools, self.subject.source_ref, base["kiln_dir"])
            self.warnings += [warning] if warning else []

    # -- phase 2: path workers ------------------------------------------------------------------------------------

    def _bring_up(self, runs: list[PathRun]) -> None:
        """Start the runs' workers together (their imports overlap), then load each model one at a time."""
        for run in runs:
            run.worker = _worker_for(run, self.subject, self.config).start()
        for run in runs:
            try:
                run.worker.ready()
            except WorkerError as e:
                run.fail(f"worker failed to start: {e}")
        for run in [r for r in runs if r.active]:
            self.log(f"{run.name}: loading")
            try:
                run.load = {**run.worker.call("load"), "loads": run.load.get("loads", 0) + 1}
                run.status = "ok"
            except WorkerError as e:
                run.fail(f"loading failed: {e}")

    def _check_memory(self) -> None:
        """Warn when the paths, all resident at once, may not fit in the memory available now. Rough: a path
        holds about its fp32 weights × MEMORY_FACTOR (sd15 at 128²: torch 1.18×, ONNX Runtime 1.08×)."""
        sizes = [r.one_off.get("artifact_bytes") or 0 for r in self.active()]
        weights = max(sizes, default=0)
        need = weights * MEMORY_FACTOR * len(sizes)
        available = env.memory_bytes().get("memavailable", 0)
        if available and need > 0.9 * available:
            self.warnings.append(
                f"{len(sizes)} paths resident together need ~{need / 1e9:.0f} GB, "
                f"{available / 1e9:.1f} GB is available: if a worker is killed, bench one path at a time "
                "(--one-at-a-time) or fewer paths (--paths)"
            )
            self.log(f"warning: {self.warnings[-1]}")

    def _close_workers(self) -> None:
        for run in self.runs:
            run.retire()

    # -- phase 3: interleaved calls -------------------------------------------------------------------------------

    def interleaved(
        self,
        calls: list[tuple[str, dict]],
        runs: int,
        warmup: int,
        warmup_calls: list[tuple[str, dict]] | None = None,
        settle: float = SETTLE_S,
    ) -> Iterator[tuple]:
        """Yield (path run, call index, result, measured) for `warmup + runs` rounds of every (op, kwargs) call,
        each call sent to every active path in turn (A B C A B C …) so slow drift affects all paths alike.
        Warm-up rounds send `warmup_calls` (cheaper calls on the same shapes) when given."""
        if self.one_at_a_time:
            yield from self._path_by_path(calls, runs, warmup, warmup_calls, settle)
            return
        for r in range(warmup + runs):
            measured = r >= warmup
            label = f"run {r - warmup + 1}/{runs}" if measured else f"warm-up {r + 1}/{warmup}"
            for index, (op, kwargs) in enumerate(calls if measured else warmup_calls or calls):
                for run in self.active():
                    result = self._call(run, op, kwargs, settle)
                    if result is not None:
                        yield run, index, result, measured
                self.log(f"{label}, call {index + 1}/{len(calls)} done")

    def _path_by_path(self, calls, runs: int, warmup: int, warmup_calls, settle: float) -> Iterator[tuple]:
        """The same rounds with one path resident at a time: each round brings every path up in turn (start, load,
        `warmup` warm-up passes), sends it every call and closes it. Paths still alternate, round by round."""
        for r in range(runs):
            for run in self.active():
                self._bring_up([run])
                passes = [(False, warmup_calls or calls)] * warmup + [(True, calls)]
                for measured, batch in passes:
                    for index, (op, kwargs) in enumerate(batch):
                        result = self._call(run, op, kwargs, settle) if run.active else None
                        if result is not None:
                            yield run, index, result, measured
                run.retire()
            self.log(f"run {r + 1}/{runs} done")

    def _call(self, run: PathRun, op: str, kwargs: dict, settle: float):
        """One op on one path's worker, after a settling pause; None (and the path failed) when it fails."""
        time.sleep(settle)
        try:
            return run.worker.call(op, **kwargs)
        except WorkerError as e:
            run.fail(f"{op} failed: {e}")
            self.log(f"{run.name}: FAILED: {e}")
            return None


def _worker_for(run: PathRun, subject: Subject, config: BenchConfig) -> Worker:
    d = run.definition
    if d.backend == "torch":
        return Worker(
            run.name, "torch", source_ref=subject.source_ref, precision=d.precision, scheduler=config.scheduler
        )
    hint = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}.get(d.precision) if d.backend == "openvino" else None
    return Worker(run.name, "kiln", kiln_dir=str(run.kiln_dir), runtime=d.backend, precision_hint=hint)
