"""One component to fp16 or int8, inside a stage's staging folder, measured on held-back calibration inputs.

`apply(...)` takes the component's fp32 (already fused) graph in `folder/model.onnx`, writes the converted graph
into `folder.<precision>/`, scores it against fp32 on the held-back inputs (every HOLD_OUT-th recorded input
is kept out of calibration) and swaps the folders. The record says what was kept in higher precision and why,
the ranges used (the recipe) and the fidelity reached.
"""

from __future__ import annotations

import gc
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from diffkiln.errors import DiffkilnError, ParityError
from diffkiln.optimizers.precision import fp16, int8, sensitivity, smooth, stats
from diffkiln.runtime.runners import OrtOptions, session_from_onnx

HOLD_OUT = 5  # every 5th recorded input scores, the rest calibrate
EXTERNAL_THRESHOLD = 1 << 31
# activation type per target: TensorRT takes symmetric int8 only (S8S8); ONNX Runtime's x86 int8 kernels favour
# uint8 activations (U8S8): sd15 UNet 512² batch 2 on this CPU 2.63 s vs 3.14 s per call, 44.7 dB both
ACTIVATIONS = {"tensorrt": "int8", "ort-cpu": "uint8"}
# ops whose outputs get Q/DQ as well: ORT's CPU QLinearConv needs one (without it Conv runs fp32 on dequantized
# weights); TensorRT fuses DQ → Conv with a float output, so its graph keeps outputs in higher precision
QUANTIZED_OUTPUTS = {"tensorrt": (), "ort-cpu": ("Conv",)}


@dataclass(frozen=True)
class PrecisionOptions:
    percentile: float = 99.0  # of the per-step amax over calibration steps (100: their max)
    min_psnr: float | None = None  # int8: keep the most sensitive groups in float until the UNet output meets it
    fp16_io: bool = False
    data_max: float = fp16.DATA_MAX
    activations: str | None = None  # int8 activation type: None = the target's (ACTIVATIONS), "int8" or "uint8"
    smooth: float | None = None  # int8: SmoothQuant's alpha for the linear layers (None: off)

    def __post_init__(self):
        if self.activations not in (None, "int8", "uint8"):
            raise DiffkilnError(f"int8 activations are int8 or uint8, not {self.activations!r}")
        if not (50 <= self.percentile <= 100):
            raise DiffkilnError(f"--percentile {self.percentile} must be in 50..100")
        if self.smooth is not None and not (0 <= self.smooth <= 1):
            raise DiffkilnError(f"--smooth {self.smooth} must be in 0..1 (SmoothQuant's alpha)")

    def to_json(self) -> dict:
        return {
            "percentile": self.percentile,
            "min_psnr": self.min_psnr,
            "fp16_io": self.fp16_io,
            "activations": self.activations,
            "smooth": self.smooth,
        }


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size > EXTERNAL_THRESHOLD:
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save(model, str(path))


def split(feeds: list[dict]) -> tuple[list[dict], list[dict]]:
    """(calibration, held-back): every HOLD_OUT-th input is held back; at least one of each."""
    if len(feeds) < 2:
        raise DiffkilnError("calibration recorded fewer than 2 inputs; give more --calib-prompts")
    held = feeds[HOLD_OUT - 1 :: HOLD_OUT] or feeds[-1:]
    calib = [f for i, f in enumerate(feeds) if (i + 1) % HOLD_OUT or len(feeds) < HOLD_OUT] or feeds[:-1]
    return calib, held


def outputs_on(path: Path, feeds: list[dict]) -> list[list[np.ndarray]]:
    session = session_from_onnx(path, OrtOptions(optimization="all"))
    result = [[np.asarray(o, dtype=np.float32) for o in session.run(None, stats.fit_inputs(session, f))] for f in feeds]
    del session
    gc.collect()
    return result


def score(path: Path, feeds: list[dict], reference: list[list[np.ndarray]]) -> dict:
    got = outputs_on(path, feeds)
    worst = min(sensitivity.psnr_db([g[i] for g in got], [r[i] for r in reference]) for i in range(len(reference[0])))
    rel = max(
        float(np.max(np.abs(g[i].astype(np.float64) - r[i])) / max(float(np.max(np.abs(r[i]))), 1e-12))
        for g, r in zip(got, reference, strict=True)
        for i in range(len(r))
    )
    return {"psnr_db": worst, "rel_err": rel if math.isfinite(rel) else float("inf")}


def apply(
    name: str,
    folder: Path,
    precision: str,
    target: str,
    feeds: list[dict],
    options: PrecisionOptions,
    recipe: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    calib, held = split(feeds)
    src = folder / "model.onnx"
    work = folder.with_name(f"{folder.name}.{precision}")
    work.mkdir()
    try:
        reference = outputs_on(src, held)
        if precision == "fp16":
            record = fp16.to_fp16(
                src, work / "model.onnx", calib, save_onnx, data_max=options.data_max, fp16_io=options.fp16_io, log=log
            )
        else:
            record = _int8(src, work, target, calib, held, reference, options, recipe, log)
        record["fidelity"] = score(work / "model.onnx", held, reference)
        psnr = record["fidelity"]["psnr_db"]
        log(f"{name}: {precision} output PSNR {psnr:.1f} dB against fp32 on {len(held)} held-back inputs")
        if not math.isfinite(psnr):
            raise ParityError(f"{name} in {precision} gives non-finite outputs on real inputs; keep it in fp32")
        record.update(precision=precision, calibration_inputs=len(calib), held_back_inputs=len(held))
        shutil.rmtree(folder)
        work.rename(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return record


def model_graph(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def _int8(src, work, target, calib, held, reference, options, recipe, log) -> dict:
    model = onnx.load(str(src), load_external_data=False)
    nodes = int8.quantizable_nodes(model)
    tensors = int8.activation_inputs(model, nodes)
    tensors += [n.output[0] for n in nodes if n.op_type in QUANTIZED_OUTPUTS[target]]  # their ranges too
    del model
    activation_type = options.activations or ACTIVATIONS[target]
    outputs = QUANTIZED_OUTPUTS[target]
    if target == "tensorrt" and activation_type != "int8":
        raise DiffkilnError("TensorRT takes symmetric int8 activations only; drop uint8 for --target tensorrt")
    if recipe:
        kept = dict(recipe.get("kept", {}))
        amax = {t: float(recipe["amax"][t]) for t in tensors if t in recipe.get("amax", {})}
        missing = [t for t in tensors if t not in amax]
        if missing:
            raise DiffkilnError(
                f"the recipe has no range for {missing[0]} (and {len(missing) - 1} more); it was "
                "made for another graph: drop --recipe to calibrate"
            )
        log(f"  int8: ranges and kept nodes from the recipe ({len(kept)} kept)")
        search = recipe.get("search")
        if recipe.get("smooth"):
            raise DiffkilnError("recipes of smoothed graphs cannot be replayed yet; drop --recipe or --smooth")
    else:
        kept = {n.name: why for n in nodes if (why := int8.kept_reason(n.name, int8.KEEP))}
        plan = smooth.groups(model_graph(src), [n for n in nodes if n.name not in kept]) if options.smooth else {}
        channels = {x: k for x, (_c, k) in plan.items()}
        log(f"  int8: measuring {len(tensors)} activation ranges on {len(calib)} calibration inputs")
        per_sample = stats.amax_per_sample(src, tensors, calib, log, channels=channels)
        if plan:
            smoothed = work / "smoothed.onnx"
            done = smooth.smooth(src, smoothed, plan, per_sample, options.smooth, save_onnx)
            for x, (name, s) in done.items():
                per_sample[name] = smooth.smoothed_amax(per_sample.pop(x), s)
            log(f"  int8: SmoothQuant (alpha {options.smooth:g}) on {len(done)} linear-layer inputs")
            src = smoothed
        amax = {t: stats.over_steps(v, options.percentile) for t, v in per_sample.items()}
        search = None
    candidate = work / "candidate.onnx"

    def psnr_without(extra: list[str]) -> float:
        int8.quantize(src, candidate, amax, [*kept, *extra], activation_type=activation_type, quantized_outputs=outputs)
        value = score(candidate, held, reference)["psnr_db"]
        for f in work.glob("candidate.onnx*"):
            f.unlink()
        return value

    if options.min_psnr is not None and not recipe:
        groups: dict[str, list[str]] = {}
        for n in nodes:
            if n.name not in kept:
                groups.setdefault(sensitivity.group_of(n.name, n.op_type), []).append(n.name)
        search = sensitivity.search(groups, psnr_without, options.min_psnr, log)
        for group in search["kept_groups"]:
            for node in groups[group]:
                kept[node] = f"sensitivity: group {group} kept in float to reach {options.min_psnr:g} dB"
    int8.quantize(
        src, work / "model.onnx", amax, list(kept), activation_type=activation_type, quantized_outputs=outputs, log=log
    )
    for f in work.glob("smoothed.onnx*"):
        f.unlink()
    return {
        "activation_type": activation_type,
        "smooth": options.smooth,
        "weights": "int8 symmetric per channel",
        "percentile": options.percentile,
        "quantized_nodes": len(nodes) - len(kept),
        "kept": kept,
        "amax": amax,
        "search": search,
    }
