"""torch → ONNX export of each component, with parity against PyTorch proven before anything is kept.

Per component (one at a time, memory released in between):
  build the torch module (its config kept for config.json; a text encoder's layer count sets its hidden_states
  outputs) → reference outputs at two shapes → trace to ONNX (dynamic batch/height/width) → fingerprint weights →
  free torch → map weights → run ONNX Runtime at both shapes → compare (fail hard).
The whole kiln directory is staged in a temp folder and renamed into place only when every component passed.
The source's model_index.json (or one made like it) and the modules' configs go into the manifest's `interop`
record, which the stage writer writes out as the files optimum and ONNX Runtime's SD tools read (interop.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffkiln import __version__, interop, kiln
from diffkiln.errors import DiffkilnError, SourceError
from diffkiln.exporter.sources import MODULE_OF, Source
from diffkiln.onnxio import consolidate_external_data, stamp_io_shapes
from diffkiln.parity import MAX_REL_ERR, check, ort_session
from diffkiln.specs import ComponentSpec, PipelineInfo, component_specs, parity_dims
from diffkiln.weight_map import map_weights

DEFAULT_OPSET = 17
# a full gc pass over torch's and diffusers' objects takes ~0.2 s: worth it only to free a big module's weights
# before the next step loads another
COLLECT_ABOVE_BYTES = 256 << 20
OPSETS = range(14, 21)  # what torch's TorchScript-based exporter emits


@dataclass(frozen=True)
class ExportOptions:
    components: tuple[str, ...] | None = None  # None: all of the pipeline's components
    opset: int = DEFAULT_OPSET
    force: bool = False
    wait: bool = False  # block on another process writing the same output (the user cache) instead of failing
    max_rel_err: float = MAX_REL_ERR["fp32"]


def export(source: Source, out: Path, options: ExportOptions = ExportOptions(), log: Callable = print) -> dict:
    """Export `source` into the kiln directory `out`; returns the manifest."""
    out = Path(out)
    specs = component_specs(source.info)
    names = list(options.components or source.components)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise DiffkilnError(f"unknown component {', '.join(unknown)}; this pipeline has {', '.join(specs)}")
    if options.opset not in OPSETS:
        raise DiffkilnError(f"--opset {options.opset} is not supported; use {OPSETS.start}..{OPSETS.stop - 1}")
    source_fp = source.fingerprint()
    stamp = {"source": source_fp, "components": sorted(names), "opset": options.opset}
    sources = [source.path] if source.path else []
    with kiln.StageWriter(out, "export", stamp, force=options.force, sources=sources, wait=options.wait, log=log) as w:
        if w.up_to_date:
            log(f"{out} is up to date with {source.ref} (use --force to re-export)")
            return w.existing
        manifest = _manifest_head(source, source_fp, options)
        info, weight_map, configs = source.info, {}, {}
        for name in names:
            done = export_component(source, name, info, w.tmp, options, log)
            manifest["components"][name] = done.record
            weight_map[name], configs[name], info = done.mapping, done.config, done.info
        manifest["pipeline"] = info.to_json()
        manifest["tokenizers"] = source.copy_tokenizers(w.tmp)
        (w.tmp / kiln.SCHEDULER).mkdir()
        scheduler = source.scheduler_config()
        kiln.write_json(w.tmp / kiln.SCHEDULER / "scheduler_config.json", scheduler)
        kiln.write_json(w.tmp / kiln.WEIGHT_MAP, weight_map)
        manifest["interop"] = interop.block(
            interop.model_index(info, configs, scheduler, _source_index(source)), configs
        )
        manifest = w.finish(manifest)
    return manifest


@dataclass(frozen=True)
class Exported:
    record: dict  # the component's manifest entry
    mapping: dict  # its weight map
    config: dict  # the torch module's config, as `save_pretrained` writes config.json
    info: PipelineInfo  # the pipeline info, with a text encoder's layer count filled in


def export_component(
    source: Source, name: str, info: PipelineInfo, root: Path, options: ExportOptions, log: Callable
) -> Exported:
    """Export one component into root/<name>/model.onnx."""
    import torch

    from diffkiln.exporter import wrappers  # torch modules: imported only when exporting
    from diffkiln.exporter.torch_weights import fingerprint, lora_weights

    start = time.perf_counter()
    module = source.load(MODULE_OF[name])
    config = module_config(module)
    if name in interop.TEXT_ENCODERS:
        layers = list(info.text_layers) + [0] * (len(info.text_hidden) - len(info.text_layers))
        layers[interop.TEXT_ENCODERS.index(name)] = wrappers.text_layers(module)
        info = dataclasses.replace(info, text_layers=tuple(layers))
    spec = component_specs(info)[name]
    model = wrappers.wrap(name, module)
    del module
    cases = parity_dims(info)
    feeds = [spec.sample_inputs(d, info, seed=i) for i, d in enumerate(cases)]
    with torch.no_grad():
        refs = [_run_torch(model, spec, f) for f in feeds]
    keys = fingerprint(lora_weights(model, spec.name))
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > COLLECT_ABOVE_BYTES

    path = kiln.model_path(root, spec.name)
    path.parent.mkdir(parents=True)
    _trace(model, spec, feeds[0], path, options.opset)
    del model
    if big:
        gc.collect()
    external = consolidate_external_data(path)
    stamp_io_shapes(path, {t.name: t.shape for t in spec.inputs + spec.outputs})
    mapping, unmapped = map_weights(path, keys)
    if unmapped:
        log(f"warning: {spec.name}: {len(unmapped)} LoRA-touchable weights not found in the graph: {unmapped[:3]}")

    session = ort_session(path)
    results = []
    for d, f, ref in zip(cases, feeds, refs, strict=True):
        got = dict(zip(spec.output_names, session.run(spec.output_names, f), strict=True))
        diffs = check("export", spec.name, got, ref, options.max_rel_err)
        results.append({"dims": d, "outputs": {k: v.to_json() for k, v in diffs.items()}})
    del session
    if big:
        gc.collect()

    files = kiln.file_records(path.parent)
    worst = max(o["rel_err"] for r in results for o in r["outputs"].values())
    seconds = time.perf_counter() - start
    size = sum(f["bytes"] for f in files.values())
    log(f"{spec.name}: exported in {seconds:.1f} s, {size / 1e6:.1f} MB, parity rel err {worst:.2e}")
    record = {
        "path": f"{spec.name}/model.onnx",
        "files": files,
        "external_data": external,
        "contract": spec.to_json(),
        "parity": {"max_rel_err": options.max_rel_err, "worst_rel_err": worst, "cases": results},
        "weights_mapped": len(mapping),
        "weights_unmapped": unmapped,
        "export_seconds": round(seconds, 2),
    }
    return Exported(record, mapping, config, info)


def module_config(module) -> dict:
    """The config.json `save_pretrained` would write for a diffusers model or a transformers model (JSON types)."""
    if hasattr(module, "to_json_string") and hasattr(module, "save_config"):  # diffusers ConfigMixin
        config = json.loads(module.to_json_string())
        config.pop("_name_or_path", None)
        return config
    config = json.loads(module.config.to_json_string(use_diff=False))
    config["architectures"] = [type(module).__name__]
    return config


def _source_index(source: Source) -> dict | None:
    """The source folder's own model_index.json (None for presets: one is made from the configs)."""
    path = source.path / interop.INDEX if source.path else None
    if path is None or not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise SourceError(f"{path} is not valid JSON; the model folder is corrupt") from None
    return index if isinstance(index, dict) else None


def _run_torch(model, spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    args = [torch.from_numpy(feeds[n]) for n in spec.input_names]
    out = model(*args)
    out = out if isinstance(out, tuple) else (out,)
    return {n: o.detach().numpy() for n, o in zip(spec.output_names, out, strict=True)}


def _trace(model, spec: ComponentSpec, feeds: dict[str, np.ndarray], path: Path, opset: int) -> None:
    import torch

    from diffkiln.exporter import symbolics

    symbolics.register(opset)
    args = tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(path),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _manifest_head(source: Source, source_fp: str, options: ExportOptions) -> dict:
    return {
        "format_version": kiln.FORMAT_VERSION,
        "created_by": f"diffkiln {__version__}",
        "pipeline": source.info.to_json(),
        "source": {"kind": source.kind, "ref": source.ref, "fingerprint": source_fp},
        "opset": options.opset,
        "precision": "fp32",
        "exporter": "torch.onnx (TorchScript)",
        "versions": _versions(),
        "scheduler": "scheduler/scheduler_config.json",
        "components": {},
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for pkg in ("torch", "diffusers", "transformers", "onnx", "onnxruntime"):
        with contextlib.suppress(PackageNotFoundError):
            found[pkg] = version(pkg)
    return found
