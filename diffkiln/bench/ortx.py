"""Peer optimizer: onnxruntime.transformers' stable-diffusion fusions, applied to the plain kiln directory.

The fusions ORT's own `models/stable_diffusion/optimize_pipeline.py` applies per component (attention →
MultiHeadAttention, LayerNorm / SkipLayerNorm, Gelu / BiasGelu, …). Without a CUDA provider the fusions whose
contrib ops only CUDA implements (GroupNorm, SkipGroupNorm, BiasSplitGelu, NhwcConv, packed QKV/KV, BiasAdd) are
turned off, as a CPU user would have to. Writes `KILN/optimized/ort-transformers-fp32/`, a kiln directory (txt2img
components only) the diffkiln runtime runs as is.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from pathlib import Path

from diffkiln import kiln

MODEL_TYPES = {"text_encoder": "clip", "text_encoder_2": "clip", "unet": "unet", "vae_decoder": "vae"}
CUDA_ONLY = (
    "enable_nhwc_conv",
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_bias_splitgelu",
    "enable_packed_qkv",
    "enable_packed_kv",
    "enable_bias_add",
)
REPORT = "ortx_report.json"


def _fusion_options(model_type: str, gpu: bool):
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    if not gpu:
        for flag in CUDA_ONLY:
            if hasattr(options, flag):
                setattr(options, flag, False)
    return options


def _optimize_component(src: Path, dst: Path, model_type: str, gpu: bool, external: bool) -> dict:
    from onnxruntime.transformers.optimizer import optimize_model

    with contextlib.redirect_stderr(io.StringIO()):  # its tqdm progress bars would interleave with the bench's log
        model = optimize_model(
            str(src),
            model_type=model_type,
            num_heads=0,  # deduced from the graph
            hidden_size=0,
            opt_level=0,
            optimization_options=_fusion_options(model_type, gpu),
            use_gpu=gpu,
        )
    dst.parent.mkdir(parents=True)
    model.save_model_to_file(str(dst), use_external_data_format=external)
    return {k: v for k, v in model.get_fused_operator_statistics().items() if v}


def optimize_with_ort_transformers(kiln_dir: Path) -> dict:
    """Optimize (or reuse) the peer's kiln directory; returns {kiln_dir, seconds, done_now, fused}."""
    import onnxruntime as ort

    out = kiln_dir / "optimized" / "ort-transformers-fp32"
    manifest = kiln.read_manifest(kiln_dir)
    stamp = {"source_manifest": kiln.file_sha256(kiln_dir / kiln.MANIFEST)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with kiln.StageWriter(out, "ort-transformers", stamp, sources=[kiln_dir], nested_ok=True, same_kind=()) as w:
        previous = _read_report(out) if w.up_to_date else None
        if previous:
            return {"kiln_dir": str(out), "seconds": previous["seconds"], "done_now": False, "fused": previous["fused"]}
        logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
        gpu = "CUDAExecutionProvider" in ort.get_available_providers()
        components = {n: dict(r) for n, r in manifest["components"].items() if n in MODEL_TYPES}
        start, fused = time.perf_counter(), {}
        for name, record in components.items():
            dst = kiln.model_path(w.tmp, name)
            external = bool(record.get("external_data"))
            fused[name] = _optimize_component(kiln.model_path(kiln_dir, name), dst, MODEL_TYPES[name], gpu, external)
            record["files"] = kiln.file_records(dst.parent)
        w.copy_support(kiln_dir, manifest)
        seconds = time.perf_counter() - start
        optimized = {"target": "onnxruntime.transformers", "precision": "fp32", "from": str(kiln_dir.resolve())}
        report = {**stamp, "gpu_fusions": gpu, "fused": fused, "seconds": seconds}
        w.finish({**manifest, "components": components, "optimized": optimized}, reports={REPORT: report})
    return {"kiln_dir": str(out), "seconds": seconds, "done_now": True, "fused": fused}


def _read_report(out: Path) -> dict | None:
    try:
        return json.loads((out / REPORT).read_text())
    except (OSError, json.JSONDecodeError):
        return None
