"""Write a diffkiln kiln dir out as the folder `optimum-cli export onnx` writes, without optimum installed.

    python tools/make_optimum_fixture.py KILN OUT

OUT gets exactly optimum's layout and contract (checked against optimum-onnx 0.1.0 / optimum 2.1.0 exports of the
same tiny pipelines, see docs in tests/test_interop.py):

    model_index.json  scheduler/  tokenizer[_2]/
    text_encoder[_2]/model.onnx + config.json   input_ids int64 [batch, sequence]; outputs last_hidden_state,
                                                pooler_output (SDXL encoder 2: text_embeds, last_hidden_state),
                                                and for SDXL hidden_states.0 … hidden_states.L (SD1/2: none)
    unet/model.onnx + config.json               timestep a float32 scalar (one for every row)
    vae_decoder/  vae_encoder/                  unchanged
    no manifest.json, no weight_map.json

The graphs compute what the kiln's do: int64 ids are cast to the int32 the kiln's graph takes, the scalar
timestep is reshaped to [1] (the UNet broadcasts it over the batch), and the outputs optimum does not write are
dropped with the nodes only they used. The tests build their optimum fixtures with `convert` from tiny kilns;
real models would need external data handled (onnx.load keeps it in memory here).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def convert(kiln: Path, out: Path) -> Path:
    """Write `kiln` (a diffkiln kiln dir) into the new folder `out` in optimum's layout; returns `out`."""
    kiln, out = Path(kiln), Path(out)
    manifest = json.loads((kiln / "manifest.json").read_text())
    sdxl = manifest["pipeline"]["kind"] == "sdxl"
    out.mkdir(parents=True)
    for folder in [*manifest.get("tokenizers", []), "scheduler"]:
        shutil.copytree(kiln / folder, out / folder)
    shutil.copy2(kiln / "model_index.json", out / "model_index.json")
    for name in manifest["components"]:
        model = onnx.load(str(kiln / name / "model.onnx"))
        config = json.loads((kiln / name / "config.json").read_text())
        if name in TEXT_ENCODERS:
            _int64_input(model.graph, "input_ids")
            _keep_outputs(
                model.graph, lambda o: o != "penultimate_hidden_state" and (sdxl or not o.startswith("hidden_states."))
            )
            config["output_hidden_states"] = sdxl  # what optimum's exporter sets on SDXL's encoders
        if name == "unet":
            _scalar_input(model.graph, "timestep")
        (out / name).mkdir()
        onnx.checker.check_model(model)
        onnx.save(model, str(out / name / "model.onnx"))
        (out / name / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _rename_uses(graph, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]


def _int64_input(graph, name: str) -> None:
    """`name` becomes an int64 [batch, sequence] input, cast to the int32 the graph was built for."""
    value = next(v for v in graph.input if v.name == name)
    _rename_uses(graph, name, f"{name}_int32")
    graph.node.insert(0, helper.make_node("Cast", [name], [f"{name}_int32"], to=TensorProto.INT32))
    value.type.tensor_type.elem_type = TensorProto.INT64
    dims = value.type.tensor_type.shape.dim
    dims[0].dim_param, dims[1].dim_param = "batch_size", "sequence_length"


def _scalar_input(graph, name: str) -> None:
    """`name` becomes a scalar input, reshaped to the [1] the graph broadcasts over its batch."""
    value = next(v for v in graph.input if v.name == name)
    _rename_uses(graph, name, f"{name}_1d")
    shape = helper.make_tensor(f"{name}_shape", TensorProto.INT64, [1], [1])
    graph.initializer.append(shape)
    graph.node.insert(0, helper.make_node("Reshape", [name, f"{name}_shape"], [f"{name}_1d"]))
    del value.type.tensor_type.shape.dim[:]


def _keep_outputs(graph, keep) -> None:
    """Drop the graph outputs `keep` refuses, then every node nothing needs any more."""
    kept = [o for o in graph.output if keep(o.name)]
    del graph.output[:]
    graph.output.extend(kept)
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(live))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(f"wrote {convert(Path(sys.argv[1]), Path(sys.argv[2]))}")
