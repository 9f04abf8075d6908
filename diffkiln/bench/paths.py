"""The paths a bench can compare, and why one cannot run here.

A path is a way to turn a prompt into an image: the diffusers pipeline in PyTorch (the reference), or diffkiln's
runtime over some kiln directory. Each has a backend (which worker runs it) and an artifact (which kiln directory it
needs, made once before timing starts). A requested path that cannot run is kept in the report as
"skipped: <reason>", so every requested path is either measured or explained.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffkiln.errors import DiffkilnError


@dataclass(frozen=True)
class PathDef:
    name: str
    backend: str  # torch | ort | openvino | tensorrt
    precision: str  # fp32 | bf16 | fp16 | int8
    artifact: str  # source (torch) | export | optimize | ortx | engine
    description: str


PATHS: dict[str, PathDef] = {
    p.name: p
    for p in [
        PathDef("torch-fp32", "torch", "fp32", "source", "diffusers pipeline, fp32 eager (the reference)"),
        PathDef("torch-bf16", "torch", "bf16", "source", "diffusers pipeline under torch.autocast(bfloat16)"),
        PathDef("ort-fp32", "ort", "fp32", "export", "diffkiln runtime on the plain export"),
        PathDef("ort-opt", "ort", "fp32", "optimize", "diffkiln runtime on `diffkiln optimize --target ort-cpu`"),
        PathDef("ort-fp16", "ort", "fp16", "optimize", "diffkiln runtime on the ort-cpu fp16 graphs"),
        PathDef("ort-int8", "ort", "int8", "optimize", "diffkiln runtime on the ort-cpu int8 graphs"),
        PathDef("openvino-int8", "openvino", "int8", "optimize", "OpenVINO on diffkiln's int8 Q/DQ denoiser, f32 hint"),
        PathDef("ort-sdopt", "ort", "fp32", "ortx", "peer: onnxruntime.transformers' stable-diffusion optimizer"),
        PathDef("openvino-fp32", "openvino", "fp32", "export", "peer: OpenVINO on the plain export, f32 hint"),
        PathDef("openvino-bf16", "openvino", "bf16", "export", "peer: OpenVINO on the plain export, bf16 hint"),
        PathDef("trt-fp16", "tensorrt", "fp16", "engine", "diffkiln runtime on TensorRT fp16 engines"),
        PathDef("trt-int8", "tensorrt", "int8", "engine", "diffkiln runtime on TensorRT int8 engines"),
    ]
}
DEFAULT_PATHS = ("torch-fp32", "torch-bf16", "ort-fp32", "ort-opt")
REFERENCE = "torch-fp32"


def parse_paths(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """'a,b,c' or a list → names in the given order, duplicates dropped; unknown names are an error."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        raise DiffkilnError(f"unknown bench path {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    if not names:
        raise DiffkilnError(f"no bench paths given; choose from {', '.join(PATHS)}")
    return list(dict.fromkeys(names))


def skip_reason(path: PathDef, caps: dict) -> str | None:
    """Why `path` cannot run with these capabilities (None: it can). `caps` is filled by `capabilities`."""
    reasons = []
    if path.backend == "torch":
        reasons += [
            f"{m} is not installed (pip install diffkiln[export])" for m in ("torch", "diffusers") if not caps[m]
        ]
        if not caps.get("source"):
            reasons.append(caps.get("source_problem") or "no PyTorch source for this model")
        if path.precision == "bf16":
            reasons += _bf16_problems(caps)
    elif path.backend == "openvino":
        from diffkiln.runtime.backends import available

        if reason := available("openvino"):
            reasons.append(reason)
        elif path.precision == "bf16" and not caps.get("native_bf16"):
            reasons.append("this CPU has no native bf16 (avx512_bf16 or AMX): OpenVINO would run f32 instead")
    elif path.backend == "tensorrt":
        from diffkiln.runtime.backends import available

        if not caps["gpus"]:
            reasons.append("no NVIDIA GPU")
        elif reason := available("tensorrt"):
            reasons.append(reason)
    if path.artifact in ("export", "optimize", "ortx", "engine") and not caps.get("kiln"):
        reasons.append("no kiln directory and nothing to export it from")
    if path.artifact == "ortx" and caps.get("flux"):
        reasons.append("onnxruntime.transformers' stable-diffusion optimizer has no Flux (transformer, T5) model type")
    if path.artifact == "optimize" and path.precision not in caps["ort_precisions"]:
        landed = ", ".join(caps["ort_precisions"])
        reasons.append(f"`diffkiln optimize --precision {path.precision}` has not landed yet (available: {landed})")
    return "; ".join(reasons) or None


def _bf16_problems(caps: dict) -> list[str]:
    """bf16 counts as supported where the CPU computes it natively: elsewhere oneDNN emulates it through fp32,
    several times slower than fp32 itself, which says nothing about bf16 and would dominate the bench's time."""
    if caps.get("torch_bf16") is False:
        return ["torch has no bf16 kernels for this CPU (oneDNN bf16 needs AVX-512BW or AMX)"]
    if not caps.get("native_bf16"):
        return ["this CPU has no native bf16 (avx512_bf16 or AMX): torch would emulate it, slower than fp32"]
    return []
