"""`diffkiln export-triton`: a kiln dir (and its TensorRT engines) as an NVIDIA Triton Inference Server model
repository, written through the stage writer (staged, renamed into place, never over a user's folder).

    REPO/diffkiln_triton.json          what the repository was made from (Triton reads only its folders)
    REPO/<component>/config.pbtxt      one model per component: platform onnxruntime_onnx with
         1/model.onnx [+ model.onnx.data]   the kiln's graph, hard-linked (copied across file systems)
      or, with --engines, platform tensorrt_plan with
         1/model.plan                       one engine folder, or
         1/model.sm89.plan, model.sm90.plan …   several GPU architectures: cc_model_filenames picks per GPU
    REPO/diffkiln_pipeline/            Python backend: prompt → IMAGE through diffkiln's own loop
         config.pbtxt  1/model.py (builder/triton_model.py)  1/kiln/{manifest.json, tokenizer/, scheduler/}

A config's names and data types are the component's contract (checked against the graph's own I/O); its dims
are -1 where the contract's are symbolic, or, for engines, where the engine's profile has min ≠ max (an output
dim is fixed when the input dims it follows are). A rank-0 tensor (optimum's timestep) is declared [1] and
reshaped to [] as Triton requires. No batching by Triton (max_batch_size 0): diffkiln's loop batches itself.
Engines are refused when stale for this kiln (source graph, precision, LoRA state: engines.source_mismatch);
the GPU they need is the server's, so no GPU is asked about here. Pure Python: nothing heavy is imported.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from diffkiln import engines, kiln
from diffkiln.builder import triton_model
from diffkiln.errors import DiffkilnError, KilnError
from diffkiln.kiln_reader import MANIFEST, external_locations, graph_io, inside
from diffkiln.specs import VAE_SCALE

REPO_MANIFEST = "diffkiln_triton.json"
FORMAT = "diffkiln-triton/1"
PIPELINE_MODEL = "diffkiln_pipeline"
VERSION = "1"  # the one model version folder
TEMPLATE = Path(triton_model.__file__)
INSTANCE_KINDS = ("auto", "gpu", "cpu")
DATA_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "float64": "TYPE_FP64",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "bool": "TYPE_BOOL",
}


@dataclass(frozen=True)
class TensorConfig:
    """One input/output entry of a config.pbtxt; dims () is a scalar (declared [1], reshaped to [])."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    optional: bool = False


def export_triton(
    kiln_dir: Path, out: Path, *, engines_dir: Path | None = None, instance_kind: str = "auto", force=False, log=print
) -> Path:
    """Write the model repository `out` for `kiln_dir` (see the module docstring); returns its path."""
    kiln_dir = Path(kiln_dir)
    manifest = kiln.read_manifest(kiln_dir)
    names = served_components(kiln_dir, manifest)
    folders, planned = engine_folders(Path(engines_dir), kiln_dir, manifest, names) if engines_dir else ([], [])
    kind = onnx_instance_kind(manifest, instance_kind)
    platforms = {name: "tensorrt_plan" if name in planned else "onnxruntime_onnx" for name in names}
    files = {
        name: plan_files(folders, name) if name in planned else onnx_files(kiln_dir, manifest, name) for name in names
    }
    contracts = {name: manifest["components"][name]["contract"] for name in names}
    configs = {  # made before anything is written: a refusal leaves nothing behind
        name: plan_config(name, contracts[name], folders)
        if name in planned
        else onnx_config(name, contracts[name], kind)
        for name in names
    }
    stamp = {
        "kiln": str(kiln_dir.resolve()),
        "kiln_manifest_sha256": kiln.manifest_sha256(kiln_dir),
        "engines": {str(p.resolve()): kiln.file_sha256(p / engines.ENGINE_MANIFEST) for p, _ in folders},
        "instance_kind": kind,
        "model_py_sha256": kiln.file_sha256(TEMPLATE),
    }
    sources = [kiln_dir, *([Path(engines_dir)] if engines_dir else [])]
    with kiln.StageWriter(
        out, "export-triton", stamp, force=force, sources=sources, same_kind=("kiln",), log=log,
        manifest_name=REPO_MANIFEST, reader=read_repo_manifest, interop_files=False,
    ) as w:  # fmt: skip
        if w.up_to_date:
            log(f"{w.out} is up to date")
            return w.out
        w.check_space(_bytes_to_copy(files, w.out))
        records = {}
        for name in names:
            records[name] = {
                "platform": platforms[name],
                "files": write_model(w.tmp / name, files[name], configs[name]),
            }
            log(f"{name}: {platforms[name]}")
        records[PIPELINE_MODEL] = write_pipeline_model(w, kiln_dir, manifest)
        devices = {p.name: e["device"] for p, e in folders}
        w.finish({"format": FORMAT, "kiln": stamp["kiln"], "engines": devices, "components": records})
    return w.out


def write_model(folder: Path, files: dict[str, Path], config: str) -> dict[str, dict]:
    """One model folder: its files linked into the version folder, and config.pbtxt; returns its file records."""
    for rel, src in files.items():
        (folder / VERSION / rel).parent.mkdir(parents=True, exist_ok=True)
        kiln.link_or_copy(src, folder / VERSION / rel)
    (folder / "config.pbtxt").write_text(config, encoding="utf-8")
    return _file_records(folder)


def served_components(kiln_dir: Path, manifest: dict) -> list[str]:
    """The components that become models: what the pipeline runs (refused when missing, as the runtime would)
    and the VAE encoder when the kiln has one; each graph's I/O must be the contract the manifest records."""
    kind = manifest["pipeline"]["kind"]
    encoders = ["text_encoder", "text_encoder_2"] if kind in ("sdxl", "flux") else ["text_encoder"]
    denoiser = "transformer" if kind == "flux" else "unet"
    names = []
    for name in (*encoders, denoiser, "vae_decoder", "vae_encoder"):
        record = manifest["components"].get(name)
        graph = inside(kiln_dir, record["path"], f"components.{name}.path") if record else None
        if graph is None or not graph.is_file():
            if name == "vae_encoder":
                continue
            raise KilnError(
                f"{kiln_dir} has no {name}; a Triton repository serves the whole pipeline: re-export it with "
                f"`diffkiln export SOURCE -o {kiln_dir} --force`"
            )
        _check_graph(graph, name, record.get("contract"))
        names.append(name)
    return names


def _check_graph(graph: Path, name: str, contract) -> None:
    """The graph takes and gives what the contract names, in its dtypes (Triton refuses a config that differs)."""
    if not isinstance(contract, dict) or not contract.get("inputs") or not contract.get("outputs"):
        raise KilnError(f"the manifest records no I/O contract for {name}; re-export the kiln dir")
    io = graph_io(graph)
    for kind in ("inputs", "outputs"):
        have = {n: dtype for n, dtype, _ in io[kind]}
        for t in contract[kind]:
            if have.get(t.get("name")) != t.get("dtype"):
                got = have.get(t.get("name"), "nothing")
                raise KilnError(
                    f"{graph} gives {got} as {t.get('name')!r} where its contract records {t.get('dtype')}; "
                    "it is not the graph this kiln dir records: re-export it"
                )


def engine_folders(
    engines_dir: Path, kiln_dir: Path, manifest: dict, names: list[str]
) -> tuple[list[tuple[Path, dict]], list[str]]:
    """The engine folders `engines_dir` names (itself, or its <trt>-sm<cc>/ subfolders) with their manifests,
    each checked fresh for this kiln, and the components they hold engines for (every folder must hold each)."""
    if not engines_dir.is_dir():
        raise KilnError(f"no such engines folder: {engines_dir}; build engines with `diffkiln build {kiln_dir}`")
    found = [(p, engines.read_engine_manifest(p)) for p in engines.engine_dirs(engines_dir)]
    if not found:
        raise KilnError(
            f"{engines_dir} holds no engine folder (<trt version>-sm<cc>/{engines.ENGINE_MANIFEST}); "
            f"build engines with `diffkiln build {kiln_dir}`"
        )
    versions = sorted({e["device"]["trt_version"] for _, e in found})
    if len(versions) > 1:
        raise KilnError(
            f"{engines_dir} holds engines of TensorRT {' and '.join(versions)}; a Triton server runs one TensorRT "
            "version: pass the engine folder(s) of the one it has"
        )
    ccs = [e["device"]["compute_capability"] for _, e in found]
    if len(set(ccs)) < len(ccs):
        twice = next(cc for cc in ccs if ccs.count(cc) > 1)
        raise KilnError(f"{engines_dir} holds two engine folders for sm{twice}; pass one of them")
    planned = [name for name in names if any(name in e["components"] for _, e in found)]
    for path, engine in found:
        for name in planned:
            if name not in engine["components"]:
                raise KilnError(
                    f"{path} has no {name} engine where other engine folders have one; build the same components "
                    "for every GPU"
                )
            if reason := engines.source_mismatch(engine, name, kiln_manifest=manifest):
                raise KilnError(
                    f"stale engines in {path}: {reason}; rebuild with `{engines.rebuild_command(kiln_dir)} --force`"
                )
            if engine["components"][name].get("stripped"):
                raise KilnError(
                    f"the {name} engine in {path} is weight-stripped, which Triton cannot refit; rebuild it "
                    f"without --strip-weights (`{engines.rebuild_command(kiln_dir)} --force`)"
                )
    return found, planned


def onnx_instance_kind(manifest: dict, choice: str) -> str:
    """Where the onnxruntime models run: `auto` is the CPU for a kiln optimized for ort-cpu, else the GPU."""
    if choice not in INSTANCE_KINDS:
        raise DiffkilnError(f"--instance-kind is one of {', '.join(INSTANCE_KINDS)}, not {choice!r}")
    if choice == "auto":
        choice = "cpu" if manifest.get("optimized", {}).get("target") == "ort-cpu" else "gpu"
    return f"KIND_{choice.upper()}"


def onnx_files(kiln_dir: Path, manifest: dict, name: str) -> dict[str, Path]:
    """{file in the version folder: the kiln file it links to}: model.onnx and every external data file it names
    (each confined to the component's folder)."""
    graph = inside(kiln_dir, manifest["components"][name]["path"], f"components.{name}.path")
    files = {"model.onnx": graph}
    for location in external_locations(graph):
        if ".." in Path(location).parts:
            raise KilnError(f"{graph}: external data location {location!r} leaves its folder; re-export it")
        files[Path(location).as_posix()] = inside(graph.parent, location, f"{name}: external data location")
    return files


def plan_file(engine: dict, several: bool) -> str:
    """The plan's name in the version folder: model.plan, or model.sm89.plan when there are several GPUs."""
    return f"model.sm{engine['device']['compute_capability'].replace('.', '')}.plan" if several else "model.plan"


def plan_files(folders: list[tuple[Path, dict]], name: str) -> dict[str, Path]:
    plans = {}
    for path, engine in folders:
        plan = inside(path, engine["components"][name]["plan"], f"{engines.ENGINE_MANIFEST} plan of {name!r}")
        plans[plan_file(engine, len(folders) > 1)] = plan
    return plans


def onnx_config(name: str, contract: dict, kind: str) -> str:
    inputs, outputs = tensor_configs(name, contract)
    return config_pbtxt(name, inputs, outputs, platform="onnxruntime_onnx", kind=kind)


def plan_config(name: str, contract: dict, folders: list[tuple[Path, dict]]) -> str:
    """A tensorrt_plan config whose dims hold for every engine folder (fixed only where fixed alike in all)."""
    per_folder = [tensor_configs(name, contract, e["components"][name]["profiles"]) for _, e in folders]
    inputs, outputs = ([_merge(same) for same in zip(*(c[i] for c in per_folder), strict=True)] for i in (0, 1))
    several = len(folders) > 1
    cc = {e["device"]["compute_capability"]: plan_file(e, several) for _, e in folders} if several else None
    return config_pbtxt(name, inputs, outputs, platform="tensorrt_plan", kind="KIND_GPU", cc_filenames=cc)


def _merge(configs: tuple[TensorConfig, ...]) -> TensorConfig:
    first = configs[0]
    if any(len(c.dims) != len(first.dims) for c in configs):
        raise KilnError(f"engines of different folders give {first.name} different ranks; rebuild them alike")
    dims = tuple(d if all(c.dims[i] == d for c in configs) else -1 for i, d in enumerate(first.dims))
    return TensorConfig(first.name, first.data_type, dims)


def tensor_configs(
    name: str, contract: dict, profiles: dict | None = None
) -> tuple[list[TensorConfig], list[TensorConfig]]:
    """(inputs, outputs) of one component: contract names and dtypes; dims from the contract (symbolic: -1) or,
    given an engine's profiles {input: [min, opt, max]}, fixed where min == max."""
    ranges = _symbol_ranges(name, contract, profiles) if profiles is not None else {}

    def entry(t: dict, shapes=None) -> TensorConfig:
        data_type = DATA_TYPES.get(t.get("dtype"))
        if data_type is None:
            raise KilnError(f"{name} {t.get('name')!r} has dtype {t.get('dtype')!r}, which Triton has no type for")
        if shapes is not None:
            dims = tuple(lo if lo == hi else -1 for lo, hi in zip(shapes[0], shapes[2], strict=True))
        else:
            dims = tuple(d if isinstance(d, int) else _fixed(ranges.get(d)) for d in t["shape"])
        return TensorConfig(t["name"], data_type, dims)

    inputs = [entry(t, None if profiles is None else profiles[t["name"]]) for t in contract["inputs"]]
    return inputs, [entry(t) for t in contract["outputs"]]


def _fixed(span: tuple[int, int] | None) -> int:
    return span[0] if span is not None and span[0] == span[1] else -1


def _symbol_ranges(name: str, contract: dict, profiles: dict) -> dict[str, tuple[int, int]]:
    """{symbol: (min, max)} read off an engine's input profiles (what an output dim of that symbol can be);
    image sides follow latent sides ×8 and back."""
    ranges = {}
    for t in contract["inputs"]:
        shapes = profiles.get(t["name"])
        if shapes is None or any(len(s) != len(t["shape"]) for s in shapes):
            raise KilnError(
                f"the {name} engine's profile does not fit its contract input {t['name']!r}; rebuild the engines"
            )
        for axis, dim in enumerate(t["shape"]):
            if isinstance(dim, str):
                ranges[dim] = (shapes[0][axis], shapes[2][axis])
    for side in ("height", "width"):
        if side in ranges:
            ranges.setdefault(f"image_{side}", tuple(VAE_SCALE * v for v in ranges[side]))
        elif f"image_{side}" in ranges:
            ranges[side] = tuple(v // VAE_SCALE for v in ranges[f"image_{side}"])
    return ranges


def config_pbtxt(name: str, inputs, outputs, *, platform=None, backend=None, kind="KIND_GPU", cc_filenames=None) -> str:
    """A model's config.pbtxt (protobuf text format of Triton's ModelConfig)."""
    lines = [f"name: {_quote(name)}"]
    lines += [f"platform: {_quote(platform)}"] if platform else [f"backend: {_quote(backend)}"]
    lines.append("max_batch_size: 0")
    lines.append("input [\n" + ",\n".join(_tensor_block(t) for t in inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(_tensor_block(t) for t in outputs) + "\n]")
    lines.append(f"instance_group [\n  {{\n    kind: {kind}\n    count: 1\n  }}\n]")
    if cc_filenames:
        entries = (f"  {{ key: {_quote(k)} value: {_quote(v)} }}" for k, v in sorted(cc_filenames.items()))
        lines.append("cc_model_filenames [\n" + ",\n".join(entries) + "\n]")
    return "\n".join(lines) + "\n"


def _tensor_block(t: TensorConfig) -> str:
    fields = [
        f"name: {_quote(t.name)}",
        f"data_type: {t.data_type}",
        f"dims: [ {', '.join(map(str, t.dims or (1,)))} ]",
    ]
    if not t.dims:
        fields.append("reshape: { shape: [ ] }")
    if t.optional:
        fields.append("optional: true")
    return "  {\n" + "".join(f"    {f}\n" for f in fields) + "  }"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def write_pipeline_model(w: kiln.StageWriter, kiln_dir: Path, manifest: dict) -> dict:
    """diffkiln_pipeline/: the Python backend's config, model.py and what the loop reads besides graphs."""
    folder = w.tmp / PIPELINE_MODEL
    support = folder / VERSION / triton_model.KILN_FOLDER
    support.mkdir(parents=True)
    shutil.copyfile(TEMPLATE, folder / VERSION / "model.py")
    w.copy_support(kiln_dir, manifest, into=support.relative_to(w.tmp).as_posix())
    kiln.write_json(support / MANIFEST, manifest)
    inputs = [
        TensorConfig(name, data_type, (1,), optional=name not in triton_model.REQUIRED)
        for name, data_type, _ in triton_model.INPUTS
    ]
    output = TensorConfig(*triton_model.OUTPUT)
    config = config_pbtxt(PIPELINE_MODEL, inputs, [output], backend="python", kind="KIND_CPU")
    (folder / "config.pbtxt").write_text(config, encoding="utf-8")
    return {"backend": "python", "files": _file_records(folder)}


def _file_records(folder: Path) -> dict[str, dict]:
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size} for p in sorted(folder.rglob("*"))
            if p.is_file()}  # fmt: skip


def _bytes_to_copy(files: dict[str, dict[str, Path]], out: Path) -> int:
    """What the repository costs on disk: files on the output's file system are hard-linked (nothing)."""
    device = os.stat(out.parent).st_dev
    return sum(p.stat().st_size for f in files.values() for p in f.values() if p.stat().st_dev != device)


def read_repo_manifest(repo: Path) -> dict:
    """diffkiln_triton.json of a repository this stage wrote, validated; every file it names is confined."""
    path = Path(repo) / REPO_MANIFEST
    fix = "it is not a repository `diffkiln export-triton` wrote"
    try:
        data = json.loads(inside(repo, REPO_MANIFEST, REPO_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise KilnError(f"{path} is not readable JSON; {fix}") from None
    models = data.get("components") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(models, dict):
        raise KilnError(f"{path}: not a {FORMAT} manifest; {fix}")
    for name, record in models.items():
        files = record.get("files") if isinstance(record, dict) else None
        if not isinstance(files, dict) or not all(isinstance(f, dict) and isinstance(f.get("bytes"), int)
                                                  for f in files.values()):  # fmt: skip
            raise KilnError(f"{path}: model {name!r} has no file records; {fix}")
        for rel in files:
            inside(repo, f"{name}/{rel}", f"{REPO_MANIFEST} file {name}/{rel}")
    return data
