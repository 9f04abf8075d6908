"""The `diffkiln_pipeline` model of a Triton model repository (written there as `1/model.py` by export-triton).

Triton's Python backend runs it: each request (PROMPT, optional NEGATIVE_PROMPT, SEED, STEPS, GUIDANCE,
SCHEDULER, HEIGHT, WIDTH; one value each) goes through diffkiln's own loop, `runtime.Pipeline`, whose
component runners call the text encoder(s), UNet and VAE decoder models of the same repository through
Business Logic Scripting (BLS); the answer is IMAGE, uint8 [B, H, W, 3]. `1/kiln/` holds what the loop reads
besides graphs: the kiln manifest (contracts, pipeline facts), tokenizer files and scheduler config.

The Triton server's Python needs diffkiln installed (its core install); nothing else is imported here.
Outside Triton (export-triton reads INPUTS from this module) `triton_python_backend_utils` is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffkiln import kiln
from diffkiln.errors import DiffkilnError
from diffkiln.runtime.pipeline import GenerationParams
from diffkiln.runtime.pipelines import open_pipeline
from diffkiln.runtime.runners import Runner
from diffkiln.runtime.schedulers import SAMPLERS

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # not inside Triton's Python backend
    pb_utils = None

KILN_FOLDER = "kiln"  # beside this file: manifest.json, tokenizer[_2]/, scheduler/
# request inputs: (name, Triton data type, GenerationParams field); all but PROMPT are optional, one value each
INPUTS = (
    ("PROMPT", "TYPE_STRING", "prompt"),
    ("NEGATIVE_PROMPT", "TYPE_STRING", "negative_prompt"),
    ("SEED", "TYPE_INT64", "seed"),
    ("STEPS", "TYPE_INT32", "steps"),
    ("GUIDANCE", "TYPE_FP32", "guidance"),
    ("SCHEDULER", "TYPE_STRING", "scheduler"),
    ("HEIGHT", "TYPE_INT32", "height"),
    ("WIDTH", "TYPE_INT32", "width"),
)
REQUIRED = ("PROMPT",)
OUTPUT = ("IMAGE", "TYPE_UINT8", (-1, -1, -1, 3))  # [B, H, W, RGB]


class TritonRunner(Runner):
    """One component model of this repository, run through BLS; its outputs come back in CPU memory."""

    name = "triton"

    def __init__(self, model_name: str, input_names: list[str], output_names: list[str]):
        super().__init__()
        self.model_name, self.input_names, self.output_names = model_name, input_names, output_names

    def _activate(self) -> None:
        pass  # Triton serves the model; BLS may not run during initialize anyway

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # a rank-0 feed (optimum's timestep) travels as [1]: its config reshapes it back to []
        tensors = [
            pb_utils.Tensor(n, np.ascontiguousarray(feeds[n]).reshape(feeds[n].shape or (1,))) for n in self.input_names
        ]
        response = pb_utils.InferenceRequest(
            model_name=self.model_name,
            requested_output_names=self.output_names,
            inputs=tensors,
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
        ).exec()
        if response.has_error():
            raise DiffkilnError(f"the {self.model_name} model failed in Triton: {response.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in self.output_names}


def bls_runners(manifest: dict):
    """The Pipeline's runner factory: the path it passes is kiln/<component>/model.onnx, whose folder names the
    component, which is also its model's name; input and output names are the component's contract."""

    def make(path: Path) -> Runner:
        component = Path(path).parent.name
        contract = manifest["components"][component].get("contract", {})
        names = {kind: [t["name"] for t in contract.get(kind, [])] for kind in ("inputs", "outputs")}
        return TritonRunner(component, names["inputs"], names["outputs"])

    return make


def request_params(request, guidance: float = 7.5) -> GenerationParams:
    """The request's inputs as GenerationParams (absent optional inputs keep diffkiln run's defaults; `guidance`
    is the model's: SD's CFG 7.5, Flux's distilled 3.5)."""
    values = {"guidance": guidance}
    for name, data_type, field in INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            if name in REQUIRED:
                raise DiffkilnError(f"the request has no {name} input")
            continue
        array = tensor.as_numpy().reshape(-1)
        if array.size != 1:
            raise DiffkilnError(f"{name} holds {array.size} values; send exactly one")
        values[field] = _text(array[0], name) if data_type == "TYPE_STRING" else array[0].item()
    params = GenerationParams(**values)
    if params.scheduler not in SAMPLERS:
        raise DiffkilnError(f"unknown SCHEDULER {params.scheduler!r}; choose one of {', '.join(SAMPLERS)}")
    return params


def _text(value, name: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except (UnicodeDecodeError, TypeError):
        raise DiffkilnError(f"{name} is not UTF-8 text") from None


class TritonPythonModel:
    """Triton's entry point: one Pipeline per model instance, kept for every request."""

    def initialize(self, args: dict) -> None:
        folder = Path(__file__).resolve().parent / KILN_FOLDER
        manifest = kiln.read_manifest(folder)
        self.pipe = open_pipeline(folder, runner_factory=bls_runners(manifest), local_graphs=False)
        self.guidance = 3.5 if self.pipe.denoiser == "transformer" else 7.5

    def execute(self, requests: list) -> list:
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        """One response; a setting diffkiln refuses (or a component model's failure) is that request's error."""
        try:
            images = self.pipe(request_params(request, self.guidance)).to_uint8()
        except DiffkilnError as e:
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e)))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT[0], images)])

    def finalize(self) -> None:
        self.pipe.close()
