"""The pass manager: runs a preset's passes in order on one graph, timing each and recording what it changed.

A pass is `fn(model: onnx_ir.Model) -> int` (how many places it rewrote). The manager records, per pass, the
count, the wall time and the op histogram before and after, so "why did nothing fuse?" starts from the report.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

import onnx_ir as ir

Pass = Callable[[ir.Model], int]


@dataclass
class PassRecord:
    name: str
    count: int
    seconds: float
    nodes_before: int
    nodes_after: int
    ops_added: dict[str, int]  # op → how many more after the pass
    ops_removed: dict[str, int]

    def to_json(self) -> dict:
        return asdict(self)


def op_counts(model: ir.Model) -> Counter[str]:
    counts: Counter[str] = Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        counts[f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
    return counts


def run_passes(model: ir.Model, passes: list[tuple[str, Pass]]) -> list[PassRecord]:
    records = []
    before = op_counts(model)
    for name, fn in passes:
        start = time.perf_counter()
        count = fn(model)
        seconds = time.perf_counter() - start
        after = op_counts(model)
        records.append(
            PassRecord(
                name=name,
                count=int(count),
                seconds=round(seconds, 3),
                nodes_before=sum(before.values()),
                nodes_after=sum(after.values()),
                ops_added=dict(after - before),
                ops_removed=dict(before - after),
            )
        )
        before = after
    return records
