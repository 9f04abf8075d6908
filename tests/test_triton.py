"""`diffkiln export-triton`: every config.pbtxt parses with Triton's own ModelConfig schema and says what the graphs
and engines take; the pipeline model's model.py, run against a stand-in for Triton (BLS requests checked against
the configs, then run by ONNX Runtime), gives the runtime's image; stale engines and hostile outputs are refused.

Triton's schema is `model_config_pb2` from the tritonclient wheel, loaded by file path: installing tritonclient
would pin ml-dtypes below what onnx needs here, and its grpc half needs grpcio, so the wheel is downloaded once
(no dependencies) into a cache, like the TensorRT bindings in test_trt_api_surface.py.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from diffkiln import engines, kiln
from diffkiln.builder import triton
from diffkiln.builder.profiles import ShapeRequest, input_profiles
from diffkiln.cli import main
from diffkiln.errors import KilnError, OutputError
from diffkiln.runtime.pipeline import GenerationParams, Pipeline
from diffkiln.runtime.runners import OrtOptions, session_from_onnx

ROOT = Path(__file__).parents[1]
CACHE = Path.home() / ".cache" / "diffkiln-tests" / "triton"
TRITONCLIENT = "2.73.0"
NUMPY_TYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64}
L4 = engines.Device("10.13.0.35", "NVIDIA L4", "8.9")
H100 = engines.Device("10.13.0.35", "NVIDIA H100", "9.0")


@pytest.fixture(scope="session")
def model_config():
    """Triton's `model_config_pb2` module (ModelConfig), from the tritonclient wheel."""
    found = sorted(CACHE.glob(f"tritonclient-{TRITONCLIENT}-*.whl"))
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"tritonclient=={TRITONCLIENT}",
             "-d", str(CACHE)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        found = sorted(CACHE.glob(f"tritonclient-{TRITONCLIENT}-*.whl"))
        if not found:
            pytest.skip(f"the package index is unreachable: {done.stderr.strip()[-200:]}")
    module_path = CACHE / f"model_config_pb2-{TRITONCLIENT}.py"
    if not module_path.is_file():
        with zipfile.ZipFile(found[0]) as z:
            module_path.write_bytes(z.read("tritonclient/grpc/model_config_pb2.py"))
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", module_path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # protobuf checks here that its runtime can load this gencode
    except Exception as e:
        import google.protobuf

        pytest.fail(
            f"protobuf {google.protobuf.__version__} (installed with onnx) cannot load tritonclient {TRITONCLIENT}'s "
            f"model_config_pb2: {e}; move TRITONCLIENT to a release generated for this protobuf"
        )
    return module


def parse(model_config, path: Path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(encoding="utf-8"), model_config.ModelConfig())


def tensors(model_config, entries) -> list[tuple[str, str, list[int]]]:
    return [(t.name, model_config.DataType.Name(t.data_type), list(t.dims)) for t in entries]


@pytest.fixture(scope="module")
def repo(tiny_kiln, tmp_path_factory):
    return triton.export_triton(tiny_kiln, tmp_path_factory.mktemp("triton") / "repo", log=lambda _: None)


def test_every_config_parses_with_tritons_schema(repo, tiny_kiln, model_config):
    models = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    assert models == ["diffkiln_pipeline", "text_encoder", "unet", "vae_decoder", "vae_encoder"]
    configs = {name: parse(model_config, repo / name / "config.pbtxt") for name in models}
    for name, config in configs.items():
        assert config.name == name and config.max_batch_size == 0
    unet = configs["unet"]
    assert unet.platform == "onnxruntime_onnx"
    assert tensors(model_config, unet.input) == [
        ("sample", "TYPE_FP32", [-1, 4, -1, -1]),
        ("timestep", "TYPE_FP32", [-1]),
        ("encoder_hidden_states", "TYPE_FP32", [-1, -1, 32]),
    ]
    assert tensors(model_config, unet.output) == [("out_sample", "TYPE_FP32", [-1, 4, -1, -1])]
    assert [g.kind for g in unet.instance_group] == [model_config.ModelInstanceGroup.KIND_GPU]
    encoder = configs["text_encoder"]
    assert tensors(model_config, encoder.input) == [("input_ids", "TYPE_INT32", [-1, 77])]
    assert [t.name for t in encoder.output][:2] == ["last_hidden_state", "pooler_output"]
    assert tensors(model_config, configs["vae_decoder"].output) == [("sample", "TYPE_FP32", [-1, 3, -1, -1])]
    pipeline = configs["diffkiln_pipeline"]
    assert pipeline.backend == "python" and not pipeline.platform
    assert [(t.name, t.optional) for t in pipeline.input][:2] == [("PROMPT", False), ("NEGATIVE_PROMPT", True)]
    assert tensors(model_config, pipeline.input)[0] == ("PROMPT", "TYPE_STRING", [1])
    assert tensors(model_config, pipeline.output) == [("IMAGE", "TYPE_UINT8", [-1, -1, -1, 3])]
    assert [g.kind for g in pipeline.instance_group] == [model_config.ModelInstanceGroup.KIND_CPU]
    for name in ("text_encoder", "unet", "vae_decoder"):  # hard links to the kiln's graphs: no bytes copied
        graph = repo / name / "1" / "model.onnx"
        assert not graph.is_symlink() and os.path.samefile(graph, kiln.model_path(tiny_kiln, name))
    support = repo / "diffkiln_pipeline" / "1"
    assert (support / "model.py").read_text() == Path(triton.TEMPLATE).read_text()
    assert {p.name for p in (support / "kiln").iterdir()} == {"manifest.json", "tokenizer", "scheduler"}
    assert triton.read_repo_manifest(repo)["kiln"] == str(tiny_kiln.resolve())


def test_scalar_inputs_are_declared_one_and_reshaped(model_config, tmp_path):
    """optimum's UNet takes one timestep for all rows (shape []): Triton wants dims [1] reshaped to []."""
    contract = {"inputs": [{"name": "timestep", "dtype": "float32", "shape": []}],
                "outputs": [{"name": "out_sample", "dtype": "float16", "shape": ["batch", 4, 8, 8]}]}  # fmt: skip
    (tmp_path / "config.pbtxt").write_text(triton.onnx_config("unet", contract, "KIND_CPU"))
    config = parse(model_config, tmp_path / "config.pbtxt")
    assert list(config.input[0].dims) == [1] and config.input[0].HasField("reshape")
    assert list(config.input[0].reshape.shape) == []
    assert tensors(model_config, config.output) == [("out_sample", "TYPE_FP16", [-1, 4, 8, 8])]


def engine_folder(root: Path, kiln_dir: Path, device: engines.Device, shapes: ShapeRequest, **changes) -> Path:
    """A fake engine folder for `device` (fake plan bytes, real profiles), written as build() writes it."""
    manifest = kiln.read_manifest(kiln_dir)
    out = root / device.key
    out.parent.mkdir(exist_ok=True)
    records = {}
    with kiln.StageWriter(out, "build", {"x": 1}, reader=engines.read_engine_manifest, **engines.WRITER_OPTIONS) as w:
        for name in changes.pop("components", ("unet", "vae_decoder")):
            (w.tmp / f"{name}.plan").write_bytes(device.key.encode() * 4)
            sha, precision = engines.graph_facts(manifest, name)
            records[name] = engines.component_record(
                plan=f"{name}.plan",
                size=len(device.key) * 4,
                source_sha256=changes.get("source_sha256", sha),
                precision=changes.get("precision", precision),
                profiles=input_profiles(name, manifest["components"][name]["contract"], shapes),
                refit=False,
                stripped=changes.get("stripped", False),
            )
        lora = changes.get("lora", manifest.get("lora"))
        w.finish(engines.engine_manifest(device, kiln.manifest_sha256(kiln_dir), lora, records, {}))
    return out


def test_engines_become_plans_with_cc_model_filenames(tiny_kiln, tmp_path, model_config):
    static = ShapeRequest(batch=(1, 1, 1), height=(64, 64, 64), width=(64, 64, 64), static=True)
    for device in (L4, H100):
        engine_folder(tmp_path / "engines", tiny_kiln, device, static)
    repo = triton.export_triton(tiny_kiln, tmp_path / "repo", engines_dir=tmp_path / "engines", log=lambda _: None)
    unet = parse(model_config, repo / "unet" / "config.pbtxt")
    assert unet.platform == "tensorrt_plan"
    assert dict(unet.cc_model_filenames) == {"8.9": "model.sm89.plan", "9.0": "model.sm90.plan"}
    assert (repo / "unet" / "1" / "model.sm90.plan").read_bytes() == H100.key.encode() * 4
    # static engines: CFG doubles the UNet batch; the decoder's output size follows its latent size ×8
    assert tensors(model_config, unet.input)[0] == ("sample", "TYPE_FP32", [2, 4, 8, 8])
    assert tensors(model_config, unet.input)[2] == ("encoder_hidden_states", "TYPE_FP32", [2, 77, 32])
    assert tensors(model_config, unet.output) == [("out_sample", "TYPE_FP32", [2, 4, 8, 8])]
    decoder = parse(model_config, repo / "vae_decoder" / "config.pbtxt")
    assert tensors(model_config, decoder.output) == [("sample", "TYPE_FP32", [1, 3, 64, 64])]
    assert [g.kind for g in decoder.instance_group] == [model_config.ModelInstanceGroup.KIND_GPU]
    assert parse(model_config, repo / "text_encoder" / "config.pbtxt").platform == "onnxruntime_onnx"  # no engine
    assert triton.read_repo_manifest(repo)["engines"][L4.key]["compute_capability"] == "8.9"

    dynamic = engine_folder(tmp_path / "dynamic", tiny_kiln, L4, ShapeRequest())  # one folder, given itself
    repo = triton.export_triton(tiny_kiln, tmp_path / "repo2", engines_dir=dynamic, log=lambda _: None)
    unet = parse(model_config, repo / "unet" / "config.pbtxt")
    assert not unet.cc_model_filenames and (repo / "unet" / "1" / "model.plan").is_file()
    assert tensors(model_config, unet.input)[0] == ("sample", "TYPE_FP32", [-1, 4, -1, -1])
    assert tensors(model_config, unet.input)[2] == ("encoder_hidden_states", "TYPE_FP32", [-1, -1, 32])


class FakeTriton:
    """A stand-in for `triton_python_backend_utils` whose BLS requests run the repository's ONNX models with ONNX
    Runtime after checking them against each model's config.pbtxt (names, data types, dims, reshape)."""

    def __init__(self, repo: Path, model_config):
        self.configs = {p.parent.name: parse(model_config, p) for p in repo.glob("*/config.pbtxt")}
        self.sessions = {}
        self.repo, self.calls = repo, []
        self.module = types.ModuleType("triton_python_backend_utils")
        fake = self

        class Tensor:
            def __init__(self, name, array):
                self._name, self._array = name, np.asarray(array)

            def name(self):
                return self._name

            def as_numpy(self):
                return self._array

        class TritonError:
            def __init__(self, message):
                self._message = message

            def message(self):
                return self._message

        class InferenceResponse:
            def __init__(self, output_tensors, error=None):
                self._outputs, self._error = output_tensors, error

            def has_error(self):
                return self._error is not None

            def error(self):
                return self._error

            def output_tensors(self):
                return self._outputs

        class InferenceRequest:
            def __init__(self, model_name, requested_output_names, inputs, preferred_memory=None):
                self.model_name, self.outputs, self.inputs = model_name, requested_output_names, inputs
                assert preferred_memory == ("cpu", 0)

            def exec(self):
                return fake.run(self.model_name, self.outputs, self.inputs)

        def by_name(holder, name):
            tensors = holder.inputs if hasattr(holder, "inputs") else holder.output_tensors()
            return next((t for t in tensors if t.name() == name), None)

        self.module.__dict__.update(
            Tensor=Tensor, TritonError=TritonError, InferenceResponse=InferenceResponse,
            InferenceRequest=InferenceRequest, PreferredMemory=lambda kind, device=0: (kind, device),
            TRITONSERVER_MEMORY_CPU="cpu", get_input_tensor_by_name=by_name, get_output_tensor_by_name=by_name,
        )  # fmt: skip

    def run(self, model: str, requested: list[str], inputs: list):
        self.calls.append(model)
        config = self.configs[model]
        declared = {t.name: t for t in config.input}
        feeds = {}
        for tensor in inputs:
            spec, array = declared[tensor.name()], tensor.as_numpy()
            check_tensor(model, spec, array)
            feeds[tensor.name()] = array.reshape(tuple(spec.reshape.shape)) if spec.HasField("reshape") else array
        assert set(feeds) == set(declared), (model, sorted(feeds))
        if model not in self.sessions:
            path = self.repo / model / "1" / "model.onnx"
            self.sessions[model] = session_from_onnx(path, OrtOptions(device="cpu"))
        outputs = dict(zip(requested, self.sessions[model].run(requested, feeds), strict=True))
        for spec in config.output:
            check_tensor(model, spec, outputs[spec.name])
        return self.module.InferenceResponse([self.module.Tensor(n, a) for n, a in outputs.items()])


def check_tensor(model: str, spec, array: np.ndarray) -> None:
    """What Triton checks of a tensor against its config entry: data type, rank and every fixed dim."""
    data_type = spec.DESCRIPTOR.fields_by_name["data_type"].enum_type.values_by_number[spec.data_type].name
    assert array.dtype == NUMPY_TYPES[data_type], (model, spec.name, array.dtype)
    dims = list(spec.dims)
    assert array.ndim == len(dims) and all(d in (-1, n) for d, n in zip(dims, array.shape, strict=True)), (
        model, spec.name, array.shape, dims,
    )  # fmt: skip


def load_model_py(repo: Path, fake: FakeTriton, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake.module)
    spec = importlib.util.spec_from_file_location("diffkiln_pipeline_model", repo / "diffkiln_pipeline/1/model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_repository": str(repo / "diffkiln_pipeline"), "model_version": "1"})
    return model


class Request:
    def __init__(self, pb, **values):
        kinds = {str: np.object_, int: np.int32, float: np.float32}
        self.inputs = [
            pb.Tensor(name, np.array([v.encode() if isinstance(v, str) else v], dtype=kinds[type(v)]))
            for name, v in values.items()
        ]


@pytest.fixture(scope="module")
def optimum_sdxl(tiny_sdxl_kiln, tmp_path_factory):
    """The tiny SDXL kiln as an optimum folder: int64 ids, two text encoders, one scalar timestep for all rows."""
    spec = importlib.util.spec_from_file_location("make_optimum_fixture", ROOT / "tools" / "make_optimum_fixture.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.convert(tiny_sdxl_kiln, tmp_path_factory.mktemp("optimum") / "tiny-sdxl")


@pytest.mark.parametrize("kiln_fixture", ["tiny_kiln", "demo_kiln", "optimum_sdxl"])
def test_pipeline_model_gives_the_runtimes_image(kiln_fixture, request, tmp_path, model_config, monkeypatch):
    kiln_dir = request.getfixturevalue(kiln_fixture)
    repo = triton.export_triton(kiln_dir, tmp_path / "repo", log=lambda _: None)
    fake = FakeTriton(repo, model_config)
    model = load_model_py(repo, fake, monkeypatch)
    pb = fake.module
    request = Request(pb, PROMPT="a red circle", NEGATIVE_PROMPT="blurry", STEPS=3, GUIDANCE=7.5, WIDTH=128)
    request.inputs.append(pb.Tensor("SEED", np.array([7], dtype=np.int64)))
    (response,) = model.execute([request])
    assert not response.has_error(), response.error().message()
    image = pb.get_output_tensor_by_name(response, "IMAGE").as_numpy()
    encoders = ["text_encoder", "text_encoder_2"] if kiln_fixture == "optimum_sdxl" else ["text_encoder"]
    assert fake.calls == [*encoders, "unet", "unet", "unet", "vae_decoder"]  # every component through BLS
    optimum = kiln_fixture == "optimum_sdxl"  # its UNet takes one timestep (dims [1], reshaped to []), int64 ids
    assert next(t for t in fake.configs["unet"].input if t.name == "timestep").HasField("reshape") == optimum
    ids = fake.configs["text_encoder"].input[0].data_type
    assert model_config.DataType.Name(ids) == ("TYPE_INT64" if optimum else "TYPE_INT32")
    with Pipeline(kiln_dir) as pipe:
        params = GenerationParams("a red circle", "blurry", steps=3, guidance=7.5, seed=7, width=128)
        expected = pipe(params).to_uint8()
    assert image.dtype == np.uint8 and image.shape == expected.shape == (1, 64, 128, 3)
    assert np.array_equal(image, expected)

    bad = [Request(pb, PROMPT="x", STEPS=0), Request(pb, PROMPT="x", SCHEDULER="heun"), Request(pb, STEPS=2)]
    errors = [r.error().message() for r in model.execute(bad)]
    assert errors == [
        "--steps 0 must be in 1..1000",
        "unknown SCHEDULER 'heun'; choose one of ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, lcm",
        "the request has no PROMPT input",
    ]
    model.finalize()


def test_flux_pipeline_model_gives_the_runtimes_image(tmp_path, model_config, monkeypatch):
    from diffkiln.exporter import export, open_source
    from diffkiln.runtime.pipelines import open_pipeline

    kiln_dir = tmp_path / "flux"
    export(open_source("tiny-flux"), kiln_dir, log=lambda _: None)
    repo = triton.export_triton(kiln_dir, tmp_path / "repo", log=lambda _: None)
    fake = FakeTriton(repo, model_config)
    model = load_model_py(repo, fake, monkeypatch)
    request = Request(fake.module, PROMPT="a red circle", STEPS=2)
    (response,) = model.execute([request])
    assert not response.has_error(), response.error().message()
    image = fake.module.get_output_tensor_by_name(response, "IMAGE").as_numpy()
    assert fake.calls == ["text_encoder", "text_encoder_2", "transformer", "transformer", "vae_decoder"]
    with open_pipeline(kiln_dir) as pipe:
        expected = pipe(GenerationParams("a red circle", steps=2, guidance=3.5)).to_uint8()  # Flux's default
    assert np.array_equal(image, expected)
    model.finalize()


def test_hostile_outputs_are_refused(repo, tiny_kiln, tmp_path):
    with pytest.raises(OutputError, match="lies inside the input"):
        triton.export_triton(tiny_kiln, tiny_kiln / "triton", log=lambda _: None)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(OutputError, match="not a kiln directory; it holds 1 file"):
            triton.export_triton(tiny_kiln, mine, force=force, log=lambda _: None)
    assert (mine / "notes.txt").read_text() == "mine" and len(list(mine.iterdir())) == 1
    with pytest.raises(OutputError, match="exists and is not a directory"):
        triton.export_triton(tiny_kiln, mine / "notes.txt", log=lambda _: None)
    said = []
    assert triton.export_triton(tiny_kiln, repo, log=said.append) == repo
    assert said == [f"{repo} is up to date"]
    assert not any(p.name.startswith(".repo.") for p in repo.parent.iterdir())  # no staging left behind


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"source_sha256": "0" * 64}, "unet was built from another graph"),
        ({"precision": "fp16"}, "unet engine is fp16, the kiln's graph is fp32"),
        ({"lora": {"loras": [{"name": "pink"}]}}, "other LoRAs folded in"),
        ({"stripped": True}, "weight-stripped, which Triton cannot refit"),
    ],
)
def test_stale_engines_are_refused(tiny_kiln, tmp_path, change, fragment):
    engine_folder(tmp_path / "engines", tiny_kiln, L4, ShapeRequest())
    engine_folder(tmp_path / "engines", tiny_kiln, H100, ShapeRequest(), **change)
    with pytest.raises(KilnError, match=fragment) as e:
        triton.export_triton(tiny_kiln, tmp_path / "repo", engines_dir=tmp_path / "engines", log=lambda _: None)
    assert "\n" not in str(e.value) and not (tmp_path / "repo").exists()


def test_engine_folders_that_cannot_be_served_together(tiny_kiln, tmp_path):
    def refused(engines_dir, fragment):
        with pytest.raises(KilnError, match=fragment):
            triton.export_triton(tiny_kiln, tmp_path / "repo", engines_dir=engines_dir, log=lambda _: None)

    refused(tmp_path / "none", "no such engines folder")
    refused(tmp_path, "holds no engine folder")
    engine_folder(tmp_path / "mixed", tiny_kiln, L4, ShapeRequest())
    engine_folder(tmp_path / "mixed", tiny_kiln, engines.Device("10.16.1.11", "NVIDIA H100", "9.0"), ShapeRequest())
    refused(tmp_path / "mixed", r"TensorRT 10.13.0.35 and 10.16.1.11; a Triton server runs one")
    engine_folder(tmp_path / "partial", tiny_kiln, L4, ShapeRequest())
    engine_folder(tmp_path / "partial", tiny_kiln, H100, ShapeRequest(), components=("unet",))
    refused(tmp_path / "partial", "has no vae_decoder engine where other engine folders have one")


def test_a_kiln_missing_a_component(tiny_kiln, tmp_path, model_config):
    damaged = shutil.copytree(tiny_kiln, tmp_path / "kiln")
    (damaged / "unet" / "model.onnx").unlink()
    with pytest.raises(KilnError, match=r"has no unet; a Triton repository serves the whole pipeline"):
        triton.export_triton(damaged, tmp_path / "repo", log=lambda _: None)
    no_encoder = shutil.copytree(tiny_kiln, tmp_path / "kiln2")
    shutil.rmtree(no_encoder / "vae_encoder")  # optional: the txt2img pipeline never calls it
    repo = triton.export_triton(no_encoder, tmp_path / "repo", log=lambda _: None)
    assert not (repo / "vae_encoder").exists() and (repo / "vae_decoder" / "config.pbtxt").is_file()
    with pytest.raises(OutputError, match="already holds another kiln dir; pass --force"):  # another kiln's repo
        triton.export_triton(tiny_kiln, repo, log=lambda _: None)
    assert (triton.export_triton(tiny_kiln, repo, force=True, log=lambda _: None) / "vae_encoder").is_dir()
    swapped = shutil.copytree(tiny_kiln, tmp_path / "kiln3")
    manifest = json.loads((swapped / "manifest.json").read_text())
    manifest["components"]["unet"]["contract"]["inputs"][1]["dtype"] = "float16"
    (swapped / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KilnError, match="gives float32 as 'timestep' where its contract records float16"):
        triton.export_triton(swapped, tmp_path / "repo3", log=lambda _: None)


def test_cli_export_triton(tiny_kiln, tmp_path):
    result = CliRunner().invoke(main, ["export-triton", str(tiny_kiln), "-o", str(tmp_path / "r"),
                                       "--instance-kind", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'r'}" in result.output
    assert "kind: KIND_CPU" in (tmp_path / "r" / "unet" / "config.pbtxt").read_text()
    bad = CliRunner().invoke(main, ["export-triton", str(tiny_kiln), "-o", str(tmp_path / "s"),
                                    "--engines", str(tmp_path / "missing")])  # fmt: skip
    assert bad.exit_code == 1
    assert bad.output.strip().splitlines() == [
        f"Error: no such engines folder: {tmp_path / 'missing'}; build engines with `diffkiln build {tiny_kiln}`"
    ]
