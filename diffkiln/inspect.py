"""`diffkiln inspect`: what a kiln directory holds, read from its manifest and graphs (weights stay on disk)."""

from __future__ import annotations

from pathlib import Path

from diffkiln import kiln
from diffkiln.errors import KilnError
from diffkiln.onnxio import io_shapes, load_graph, op_histogram


def summarize(kiln_dir: Path) -> dict:
    kiln_dir = Path(kiln_dir)
    manifest = kiln.read_manifest(kiln_dir)
    components = {}
    for name, record in manifest.get("components", {}).items():
        path = kiln_dir / record["path"]
        if not path.is_file():
            raise KilnError(f"{kiln_dir} is missing {record['path']}; re-export with --force")
        graph = load_graph(path)
        components[name] = {
            **io_shapes(graph),
            "bytes": sum(f["bytes"] for f in record["files"].values()),
            "nodes": len(graph.graph.node),
            "ops": op_histogram(graph),
            "parity_rel_err": record.get("parity", {}).get("worst_rel_err"),  # none for foreign (optimum) folders
            "parity_threshold": record.get("parity", {}).get("max_rel_err"),
            "weights_mapped": record.get("weights_mapped"),
            "precision": record.get("precision", manifest.get("precision", "fp32")),
        }
    return {
        "kiln_dir": str(kiln_dir),
        "pipeline": manifest["pipeline"]["kind"],
        "source": manifest["source"],
        "opset": manifest["opset"],
        "precision": manifest.get("precision", "fp32"),
        "created_by": manifest["created_by"],
        "components": components,
    }


def _shape(t: dict) -> str:
    return f"{t['name']} {t['dtype']}[{','.join(str(d) for d in t['shape'])}]"


def render(summary: dict, echo=print) -> None:
    """Plain text that stays readable in any terminal width and in CI logs."""
    echo(
        f"{summary['kiln_dir']}: {summary['pipeline']} from {summary['source']['ref']} "
        f"({summary['precision']}, opset {summary['opset']}, {summary['created_by']})"
    )
    echo(f"{'component':16s} {'size':>10s} {'nodes':>7s} {'precision':>9s}  parity (max rel err)")
    for name, c in summary["components"].items():
        size = f"{c['bytes'] / 1e6:.1f} MB"
        if c["parity_rel_err"] is None:
            parity = "not recorded (not exported by diffkiln)"
        else:
            ok = "ok" if c["parity_rel_err"] <= c["parity_threshold"] else "FAIL"
            parity = f"{c['parity_rel_err']:.1e} {ok} (≤ {c['parity_threshold']:g})"
        echo(f"{name:16s} {size:>10s} {c['nodes']:7d} {c['precision']:>9s}  {parity}")
    for name, c in summary["components"].items():
        echo(f"\n{name}")
        for t in c["inputs"]:
            echo(f"  in   {_shape(t)}")
        for t in c["outputs"]:
            echo(f"  out  {_shape(t)}")
        echo("  ops  " + ", ".join(f"{op} {n}" for op, n in c["ops"].items()))
