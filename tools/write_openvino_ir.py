"""Write a kiln dir's graphs as OpenVINO IR in optimum-intel's layout, the folder OpenVINO GenAI's
`Text2ImagePipeline` reads (used by benchmarks/cpp_vs_run.py to compare diffkiln-cpp with GenAI).

    python tools/write_openvino_ir.py KILN_DIR OUT_DIR [--scheduler EulerDiscreteScheduler]

OUT_DIR gets model_index.json, scheduler/scheduler_config.json, tokenizer/ (the kiln's files plus
openvino_tokenizer.xml / openvino_detokenizer.xml from openvino-tokenizers), and text_encoder/, unet/,
vae_decoder/, vae_encoder/ each with openvino_model.xml/.bin (`ov.save_model` of the kiln's model.onnx, fp32
weights kept) and the kiln's config.json. Two adaptations, both in the graph's input preprocessing, not its body:
GenAI feeds the UNet an int64 timestep and the text encoder int64 ids (diffkiln's graphs take float32, int32).

Needs openvino, openvino-tokenizers and transformers (for the tokenizer conversion), e.g. a venv with
`pip install openvino-genai transformers`; diffkiln itself is not imported (the kiln is read as plain JSON).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


def _inside(root: Path, rel: str) -> Path:
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise SystemExit(f"{rel!r} points outside {root}; refusing this kiln dir")
    return path


def convert_graph(onnx_path: Path, out_dir: Path) -> None:
    import openvino as ov

    model = ov.Core().read_model(str(onnx_path))
    names = {port.get_any_name() for port in model.inputs}
    wanted = {"timestep": ov.Type.i64, "input_ids": ov.Type.i64}  # GenAI: ov::Tensor(i64, {1}, &t); i64 ids
    if names & set(wanted):
        ppp = ov.preprocess.PrePostProcessor(model)
        for name in names & set(wanted):
            ppp.input(name).tensor().set_element_type(wanted[name])
        model = ppp.build()
    out_dir.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(out_dir / "openvino_model.xml"), compress_to_fp16=False)


def convert_tokenizer(folder: Path, out_dir: Path) -> None:
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from transformers import CLIPTokenizer

    shutil.copytree(folder, out_dir, dirs_exist_ok=True)
    tokenizer, detokenizer = convert_tokenizer(CLIPTokenizer.from_pretrained(str(folder)), with_detokenizer=True)
    ov.save_model(tokenizer, str(out_dir / "openvino_tokenizer.xml"))
    ov.save_model(detokenizer, str(out_dir / "openvino_detokenizer.xml"))


def write(kiln: Path, out: Path, scheduler: str | None = None) -> None:
    manifest = json.loads((kiln / "manifest.json").read_text())
    if manifest["pipeline"]["kind"] == "sdxl":
        raise SystemExit("SD 1.x/2.x kiln dirs only (this writer does not lay out SDXL's second encoder)")
    out.mkdir(parents=True, exist_ok=True)
    index = json.loads((kiln / "model_index.json").read_text())
    config = json.loads(_inside(kiln, manifest.get("scheduler", "scheduler/scheduler_config.json")).read_text())
    if scheduler:
        config["_class_name"] = scheduler
        index["scheduler"] = ["diffusers", scheduler]
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    convert_tokenizer(_inside(kiln, manifest["tokenizers"][0]), out / "tokenizer")
    for name in COMPONENTS:
        record = manifest["components"].get(name)
        if record is None:
            continue
        convert_graph(_inside(kiln, record["path"]), out / name)
        shutil.copy(_inside(kiln, f"{name}/config.json"), out / name / "config.json")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kiln", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--scheduler", help="diffusers scheduler class to record (GenAI picks its sampler by it)")
    args = parser.parse_args()
    write(args.kiln, args.out, args.scheduler)


if __name__ == "__main__":
    main()
