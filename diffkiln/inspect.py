"""`diffkiln inspect`: what a kiln directory holds, read from its manifest and graphs (weights stay on disk)."""

from __future__ import annotations

from pathlib import Path

from diffkiln import engines, kiln
from diffkiln.errors import KilnError
from diffkiln.onnxio import io_shapes, load_graph, op_histogram


def summarize(kiln_dir: Path, engines_root: Path | None = None) -> dict:
    """The kiln dir's components and the engines built from it (under KILN/engines, or `engines_root`)."""
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
        "engines": engine_summaries(manifest, Path(engines_root) if engines_root else kiln_dir / "engines"),
    }


def engine_summaries(manifest: dict, engines_root: Path) -> list[dict]:
    """Each engine folder: what it was built with and for, and per component whether it still fits this kiln dir
    (the stale rules of engines.mismatch, against the folder's own device: this machine may have no GPU)."""
    found = []
    for folder in engines.engine_dirs(engines_root):
        try:
            engine = engines.read_engine_manifest(folder)
        except KilnError as e:
            found.append({"folder": str(folder), "error": str(e)})
            continue
        built = engines.Device(**{k: engine["device"][k] for k in ("trt_version", "gpu_name", "compute_capability")})
        components = {
            name: {
                "precision": record.get("precision"),
                "bytes": record["bytes"],
                "profiles": record["profiles"],
                "refittable": record.get("refittable", False),
                "stripped": record.get("stripped", False),
                "stale": engines.mismatch(engine, name, device=built, kiln_manifest=manifest),
            }
            for name, record in engine["components"].items()
        }
        found.append({"folder": str(folder), "key": built.key, "device": engine["device"], "components": components})
    return found


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
    for folder in summary.get("engines", []):
        _render_engines(folder, echo)


def _render_engines(folder: dict, echo) -> None:
    if "error" in folder:
        echo(f"\nengines {folder['folder']}: unreadable: {folder['error']}")
        return
    device = folder["device"]
    echo(f"\nengines {folder['folder']}: TensorRT {device['trt_version']}, {device['gpu_name']} "
         f"(sm{device['compute_capability']})")  # fmt: skip
    for name, c in folder["components"].items():
        first = next(iter(c["profiles"].items()), None)
        profile = f"{first[0]} {first[1][0]}..{first[1][2]}" if first else "no inputs"
        flags = ", ".join(f for f, on in (("refit", c["refittable"]), ("stripped", c["stripped"])) if on) or "-"
        state = f"STALE: {c['stale']}" if c["stale"] else "current"
        size = f"{c['bytes'] / 1e6:8.1f} MB" if c["bytes"] >= 1e6 else f"{c['bytes'] / 1e3:8.1f} kB"
        echo(f"  {name:16s} {c['precision'] or '?':>5s} {size}  {profile}  {flags}  {state}")
