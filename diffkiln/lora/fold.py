"""Fold LoRAs (and textual-inversion embeddings) into a kiln directory: new weights, same graphs.

For every torch weight W a LoRA names, weight_map.json gives the ONNX initializer holding W (or Wᵀ where
`transposed`: a Linear exported as MatMul). The new value, in float32 and in the order the LoRAs are given, is

    W' = W + Σ_i s_i · (α_i / r_i) · up_i @ down_i          up [out, r], down [r, in] (conv: [r, in·kh·kw])

(stored as W'ᵀ = Wᵀ + Σ s·(α/r)·downᵀ @ upᵀ where transposed), exactly what diffusers' `fuse_lora(lora_scale=s)`
computes. Nothing is re-exported: initializers are streamed one at a time from the base kiln into a copy (see
initializers.py), untouched components are hard-linked, and the result is a complete kiln dir staged in a temp
folder and renamed into place, so a failure leaves nothing behind. Raw and optimized kiln dirs fold alike (their
weight maps point at their own initializers).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from diffkiln import kiln
from diffkiln.errors import OutputError
from diffkiln.lora.embeddings import TOKEN_EMBEDDING, place_rows, write_tokens
from diffkiln.lora.errors import LoraError
from diffkiln.lora.formats import LoraModule
from diffkiln.lora.initializers import GraphCache, link_or_copy, tensor_sha256
from diffkiln.lora.plan import TOKENIZER_OF, Contribution, Plan, Tokens, plan_embeddings, plan_loras
from diffkiln.lora.refit import PayloadWriter, payload_key


def fold_loras(
    kiln_dir: Path,
    loras: Iterable[tuple[Path, float]],
    out: Path | None,
    *,
    embeddings: Iterable[tuple[Path, str | None]] = (),
    allow_partial: bool = False,
    refit_payload: Path | None = None,
    force: bool = False,
    log: Callable = print,
) -> dict:
    """Write `out`, a complete kiln dir holding `kiln_dir`'s graphs with `loras` ((file, scale), …) folded in and
    `embeddings` ((file, token or None), …) added; and/or `refit_payload`, the new values of just the changed
    initializers (see refit.py). Returns a report (what was folded, skipped, timings)."""
    start = time.perf_counter()
    kiln_dir = Path(kiln_dir)
    manifest = kiln.read_manifest(kiln_dir)
    weight_map = kiln.read_weight_map(kiln_dir)
    refit_payload = _check_payload(refit_payload, force)
    if out is None and refit_payload is None:
        raise LoraError("nothing to write: give an output kiln dir (-o OUT) and/or a refit payload (--refit-payload)")
    writer = (
        kiln.StageWriter(out, "lora", None, force=force, sources=[kiln_dir], nested_ok=True, log=log) if out else None
    )
    loras = [(Path(p), _scale(p, s)) for p, s in loras]
    embeddings = [(Path(p), t) for p, t in embeddings]
    if not loras and not embeddings:
        raise LoraError("nothing to fold: give at least one LoRA (--lora FILE:SCALE) or embedding (--embedding FILE)")

    with writer or contextlib.nullcontext() as w:
        graphs = GraphCache(kiln_dir)
        plan, lora_records = plan_loras(loras, weight_map, manifest, graphs, allow_partial, log)
        tokens, embedding_records = plan_embeddings(embeddings, manifest, weight_map, graphs, kiln_dir)
        if w:  # unchanged components are hard links, unless `out` is on another disk
            same_disk = os.stat(kiln_dir).st_dev == os.stat(w.out.parent).st_dev
            rewritten = [c for c in manifest["components"] if c in plan or c in tokens or not same_disk]
            w.check_space(kiln.components_bytes(kiln_dir, rewritten))
        record = {
            "base": {"path": str(kiln_dir.resolve()), "manifest_sha256": kiln.manifest_sha256(kiln_dir)},
            "loras": lora_records,
            "embeddings": embedding_records,
        }
        payload = _payload_writer(refit_payload, plan, graphs, record)
        if payload and tokens:
            log(
                "note: the refit payload holds the LoRA weights only; new tokens change a token table's shape, "
                "so engines with them must be built from the folded kiln dir"
            )
        components: dict[str, dict] = {}
        try:
            with kiln.full_disk_is_an_error(out or refit_payload):
                for name in manifest["components"]:
                    dst = w.tmp / name if w else None
                    if name in plan or name in tokens:
                        components[name] = _fold_component(
                            name, graphs, plan.get(name, {}), tokens.get(name), dst, payload, weight_map, log
                        )
                    elif dst:
                        dst.mkdir()
                        for f in (kiln_dir / name).iterdir():
                            link_or_copy(f, dst / f.name)
                if w:
                    _write_rest(kiln_dir, w, manifest, tokens, components, graphs, record, weight_map)
                if payload:
                    payload.close()
        except BaseException:
            if payload:
                payload.abort()
            raise
        if payload:
            os.replace(payload.path, refit_payload)
    seconds = time.perf_counter() - start
    log(f"folded into {out or refit_payload} in {seconds:.1f} s")
    refit = {"path": str(refit_payload), "tensors": len(payload.record["base_sha256"])} if payload else None
    return {
        **record,
        "out": str(out) if out else None,
        "components": components,
        "refit_payload": refit,
        "seconds": round(seconds, 2),
    }


def lora_delta(module: LoraModule, scale: float, shape: tuple[int, ...], transposed: bool) -> np.ndarray:
    """s · (α/r) · up @ down in the initializer's layout `shape` (float32)."""
    down, up = module.file.get(module.down_key), module.up()
    rank = down.shape[0]
    up2 = up.reshape(up.shape[0], rank) * np.float32(scale * module.factor)  # [out, r]
    down2 = down.reshape(rank, -1)  # [r, in·kh·kw]
    if transposed:
        return down2.T @ up2.T  # [in, out]
    return (up2 @ down2).reshape(shape)


def _payload_writer(path: Path | None, plan: Plan, graphs: GraphCache, record: dict) -> PayloadWriter | None:
    if path is None:
        return None
    specs = []
    for component, initializers in plan.items():
        graph = graphs.get(component)
        specs += [(payload_key(component, n), graph.dtype(n), graph.shape(n)) for n in initializers]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    return PayloadWriter(tmp, specs, record)


def _fold_component(name, graphs: GraphCache, initializers: dict, tokens, dst, payload, weight_map, log) -> dict:
    """Stream one component: each changed initializer is read, gets its LoRA deltas (or new token rows) and is
    written (and added to the payload) before the next is read, in the order its bytes lie on disk."""
    start = time.perf_counter()
    graph = graphs.get(name)
    table = weight_map[name][TOKEN_EMBEDDING]["initializer"] if tokens else None
    order = graph.in_file_order([*initializers, *([table] if table else [])])
    with graph.writing(dst, order) as put:
        for initializer in order:
            base = graph.read(initializer)
            if initializer == table:
                put(table, place_rows(base, *tokens[1:]))
                continue
            new = _folded(base, initializers[initializer])
            if payload:
                payload.write(payload_key(name, initializer), new, tensor_sha256(base))
            put(initializer, new)
    seconds = time.perf_counter() - start
    what = f"{len(initializers)} initializers" + (f", {len(tokens[0])} tokens" if tokens else "")
    log(f"{name}: folded {what} in {seconds:.1f} s")
    return {"initializers": len(initializers), "tokens": len(tokens[0]) if tokens else 0, "seconds": round(seconds, 2)}


def _folded(base: np.ndarray, contributions: list[Contribution]) -> np.ndarray:
    """W + Σ_i deltas_i, summed in float32, in the initializer's dtype."""
    new = None
    for module, scale, transposed in contributions:
        delta = lora_delta(module, scale, base.shape, transposed)
        new = delta if new is None else np.add(new, delta, out=new)
    new += base
    return new.astype(base.dtype, copy=False)


def _write_rest(
    kiln_dir: Path,
    w: kiln.StageWriter,
    manifest: dict,
    tokens: Tokens,
    components: dict,
    graphs: GraphCache,
    record,
    weight_map: dict,
) -> None:
    """Tokenizers (with new tokens), scheduler, weight map, other top-level files, and the updated manifest."""
    new = copy.deepcopy(manifest)
    grown = {TOKENIZER_OF[c] for c in tokens}
    w.copy_support(kiln_dir, manifest, skip=grown)
    for folder in grown:
        write_tokens(
            kiln.inside(kiln_dir, folder, f"tokenizer folder {folder!r}"),
            w.tmp / folder,
            tokens[_component_of(folder)][0],
        )
    for f in kiln_dir.iterdir():
        if f.is_file() and not f.is_symlink() and f.name != kiln.MANIFEST and not f.name.startswith("."):
            shutil.copy2(f, w.tmp / f.name)
    if not (w.tmp / kiln.WEIGHT_MAP).exists():  # an optimum base has none: keep the map read off its graphs
        kiln.write_json(w.tmp / kiln.WEIGHT_MAP, weight_map)
    for name in components:
        files = new["components"][name]["files"]
        written = graphs.get(name).written  # new files and their hashes; the rest are links to the base's
        for p in sorted((w.tmp / name).iterdir()):
            old, size = files.get(p.name, {}), p.stat().st_size
            sha = written.get(p.name) or (old.get("bytes") == size and old.get("sha256")) or kiln.file_sha256(p)
            files[p.name] = {"bytes": size, "sha256": sha}
        graphs.close(name)
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    new["source"]["fingerprint"] = f"{manifest['source'].get('fingerprint', '')}+lora:{digest}"
    new["lora"] = {**record, **({"previous": manifest["lora"]} if "lora" in manifest else {})}
    w.finish(new)


def _component_of(folder: str) -> str:
    return next(c for c, f in TOKENIZER_OF.items() if f == folder)


def _check_payload(payload, force: bool) -> Path | None:
    if payload is None:
        return None
    payload = Path(os.path.abspath(payload))
    if not payload.parent.is_dir() or not os.access(payload.parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {payload}: folder {payload.parent} does not exist or is not writable")
    if payload.is_symlink() or (payload.exists() and not payload.is_file()):
        raise OutputError(f"{payload} exists and is not a regular file; choose another --refit-payload path")
    if payload.exists() and not force:
        raise OutputError(f"{payload} already exists; pass --force to replace it")
    return payload


def _scale(path, scale) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise LoraError(f"scale {scale!r} for {path} is not a finite number")
    return value
