"""The only code that calls TensorRT to build: one strongly typed engine from one ONNX graph.

TensorRT 10/11 API only: a strongly typed network (TensorRT 11 has no FP16/INT8 builder flags: the precision is
the graph's own dtypes and Q/DQ), the ONNX parser with native InstanceNorm, one optimization profile, a shared
timing cache, optional REFIT and STRIP_PLAN. tensorrt is imported inside the functions. Nothing here runs
without an NVIDIA GPU; every decision around it (profiles, manifests, options) is tested on CPU elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffkiln.errors import DiffkilnError


@dataclass(frozen=True)
class BuildOptions:
    opt_level: int = 3
    workspace_gb: float | None = None
    refit: bool = False
    strip_weights: bool = False


def write_engine_from_onnx(
    onnx_path: Path, plan_path: Path, profiles: dict, options: BuildOptions, timing_cache: Path | None
):
    """Parse `onnx_path`, build with `profiles` ({input: (min, opt, max)}), write the plan; returns its size."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DiffkilnError(f"TensorRT cannot parse {onnx_path}: {errors[:300]}")
    config = builder.create_builder_config()
    config.builder_optimization_level = options.opt_level
    if options.workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    if options.refit or options.strip_weights:
        config.set_flag(trt.BuilderFlag.REFIT)
    if options.strip_weights:
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profiles.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise DiffkilnError(f"TensorRT could not build {onnx_path} (see the log above)")
    Path(plan_path).write_bytes(memoryview(plan))
    if timing_cache:
        Path(timing_cache).write_bytes(memoryview(config.get_timing_cache().serialize()))
    return Path(plan_path).stat().st_size
