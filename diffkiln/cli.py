"""The `diffkiln` command: thin click commands over library functions.

Errors a user can fix (DiffkilnError) print one line and exit 1; nothing prints a traceback for bad input.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
from pathlib import Path

import click

from diffkiln import __version__
from diffkiln.bench.command import click_options as bench_options  # option definitions only (no bench run code)
from diffkiln.errors import DiffkilnError
from diffkiln.runtime.schedulers import REGISTRY  # names for --help: numpy only


def user_errors(fn):
    """Turn DiffkilnError into a one-line `error: …` and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DiffkilnError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)

    return wrapper


@click.group()
@click.version_option(__version__, prog_name="diffkiln")
def main():
    """diffkiln: compile Stable Diffusion pipelines into fast, compact ONNX / TensorRT engines."""
    signal.signal(signal.SIGTERM, _terminate)  # like Ctrl-C: staged outputs are removed on the way out


def _terminate(signum, frame):
    raise KeyboardInterrupt


@main.command()
@click.argument("source")
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    help="Kiln directory to write (default: the user cache, where `run -m SOURCE` looks).",
)
@click.option(
    "--arch",
    type=click.Choice(["sd15", "sd21", "sd21-v", "sdxl"]),
    help="Architecture of a single-file checkpoint (default: from its keys; SD 2.x needs sd21 = 512 px noise "
    "prediction or sd21-v = 768 px v-prediction).",
)
@click.option(
    "--components",
    help="Comma-separated subset: text_encoder,text_encoder_2,unet,vae_decoder,vae_encoder (default: all).",
)
@click.option("--opset", type=int, help="ONNX opset (14..20; default 17).")
@click.option(
    "--text-encoders",
    help="Flux: CLIP_L.safetensors,T5.safetensors (ComfyUI's single files) for a folder without its encoders.",
)
@click.option("--force", is_flag=True, help="Replace an existing kiln directory / re-export even if up to date.")
@user_errors
def export(source, out, arch, components, opset, text_encoders, force):
    """Export SOURCE to ONNX with proven parity. SOURCE is a local diffusers folder, a single-file checkpoint
    (an A1111/ComfyUI *.safetensors with UNet, VAE and text encoders; pickles such as .ckpt are refused), the
    bundled demo model or a preset.

    Bundled: demo (trained, the default of `run`). Presets: tiny, tiny-sdxl, sd15, sd21, sdxl (real
    architectures, seeded random weights).
    """
    from diffkiln.exporter import ExportOptions, open_source
    from diffkiln.exporter import export as run_export

    log = lambda msg: click.echo(msg, err=True)  # noqa: E731
    if out is None:
        if components or opset is not None or arch or text_encoders:
            raise click.UsageError(
                "--components/--opset/--arch/--text-encoders need -o OUT: the cache holds default exports"
            )
        from diffkiln.models import export_to_cache

        click.echo(f"wrote {export_to_cache(source, force=force, log=log)}")
        return
    names = tuple(c.strip() for c in components.split(",") if c.strip()) if components else None
    options = ExportOptions(components=names, force=force, **({} if opset is None else {"opset": opset}))
    files = tuple(Path(p.strip()) for p in text_encoders.split(",")) if text_encoders else None
    if files is not None and len(files) != 2:
        raise click.UsageError("--text-encoders takes two files: CLIP_L.safetensors,T5.safetensors")
    run_export(open_source(source, arch, files), out, options, log=log)
    click.echo(f"wrote {out}")


@main.command()
@click.argument("kiln_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option(
    "--engines", "engines_root", type=click.Path(path_type=Path), help="Engines root (default: KILN_DIR/engines)."
)
@user_errors
def inspect(kiln_dir, as_json, engines_root):
    """Summarize a kiln directory: components, I/O shapes, sizes, op histogram, parity, and its TensorRT engines
    (what each was built with and for, and whether it is stale for the kiln dir)."""
    from diffkiln.engines import engine_dirs
    from diffkiln.inspect import render, summarize

    if engines_root is not None and not engine_dirs(engines_root):
        raise DiffkilnError(f"{engines_root} holds no engine folders (<trt version>-sm<cc>/engine.json)")
    summary = summarize(kiln_dir, engines_root)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        render(summary, echo=click.echo)


def lora_options(fn):
    """--lora FILE[:SCALE] … --embedding FILE[:TOKEN] … --allow-partial, shared by `lora` and `optimize`."""

    def parse(name):
        def callback(ctx, param, values):
            from diffkiln.lora import options as parsers  # imported only when a command with these options runs

            try:
                return [getattr(parsers, name)(v) for v in values]
            except DiffkilnError as e:
                raise click.BadParameter(str(e)) from None

        return callback

    options = [
        click.option(
            "--lora", "loras", multiple=True, callback=parse("parse_lora"), help="LoRA FILE[:SCALE] (repeat)."
        ),
        click.option(
            "--embedding",
            "embeddings",
            multiple=True,
            callback=parse("parse_embedding"),
            help="Textual-inversion FILE[:TOKEN] (repeat).",
        ),
        click.option("--allow-partial", is_flag=True, help="Fold what fits and list what was skipped."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command()
@click.argument("kiln_dir", type=click.Path(path_type=Path))
@click.option(
    "-o", "--out", type=click.Path(path_type=Path), help="New kiln directory (optional with --refit-payload)."
)
@click.option("--refit-payload", type=click.Path(path_type=Path), help="Write the touched weights for TensorRT refit.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@lora_options
@user_errors
def lora(kiln_dir, out, refit_payload, force, loras, embeddings, allow_partial):
    """Fold LoRAs (kohya/A1111 or diffusers/peft safetensors) and textual-inversion embeddings into KILN_DIR's
    graphs, without re-exporting: W' = W + scale · (alpha / rank) · up @ down."""
    from diffkiln.lora import fold_loras

    if out is None and refit_payload is None:
        raise click.UsageError("give -o OUT, --refit-payload FILE, or both")
    log = lambda msg: click.echo(msg, err=True)  # noqa: E731
    report = fold_loras(
        kiln_dir,
        loras,
        out,
        embeddings=embeddings,
        allow_partial=allow_partial,
        refit_payload=refit_payload,
        force=force,
        log=log,
    )
    click.echo(f"folded {len(loras)} LoRA(s), {len(embeddings)} embedding(s) in {report['seconds']:.1f} s")
    for path in (out, refit_payload):
        if path is not None:
            click.echo(f"wrote {path}")


@main.command()
@click.argument("kiln_dir", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(["ort-cpu", "tensorrt"]), required=True, help="What will run the graphs.")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8"]),
    default="fp32",
    show_default=True,
    help="Written into the graphs: fp16 with fp32 islands, or int8 Q/DQ (the UNet), calibrated on the pipeline.",
)
@click.option(
    "--calibration",
    "calibration_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Calibration prompts, one per line (default: diffkiln's shipped file; the demo model's training captions).",
)
@click.option("--calib-prompts", type=click.IntRange(1, 256), default=4, show_default=True, help="Prompts to record.")
@click.option(
    "--calib-size",
    type=click.IntRange(16, 4096),
    help="Image side (pixels) of the calibration generations (default: the model's native size; smaller is "
    "faster for big models such as Flux, ranges then come from fewer tokens).",
)
@click.option(
    "--recipe",
    "recipe_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="An earlier precision_report.json: its ranges and kept layers, instead of measuring them again.",
)
@click.option(
    "--min-psnr",
    type=float,
    help="int8: keep the most sensitive layer groups in float until the UNet "
    "output's PSNR against fp32 (held-back calibration inputs) reaches this many dB.",
)
@click.option(
    "--percentile",
    type=click.FloatRange(50, 100),
    default=99.0,
    show_default=True,
    help="int8: an activation's range is this percentile over denoising steps of each step's max |x|.",
)
@click.option(
    "--smooth",
    type=click.FloatRange(0, 1),
    help="int8: SmoothQuant with this alpha on the linear layers (moves activation outliers into the weights).",
)
@click.option("--fp16-io", is_flag=True, help="fp16: fp16 graph inputs/outputs (default: fp32, casts inside).")
@click.option(
    "--components", "components_csv", help="Components to convert, comma-separated (default: fp16 all, int8 unet)."
)
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Default: KILN_DIR/optimized/<target>-<precision>.")
@click.option("--force", is_flag=True, help="Replace an existing output / re-optimize even if up to date.")
@lora_options
@user_errors
def optimize(
    kiln_dir, target, precision, calibration_file, calib_prompts, calib_size, recipe_file, min_psnr, percentile,
    smooth, fp16_io, components_csv, out, force, loras, embeddings, allow_partial,
):  # fmt: skip
    """Rewrite every graph of KILN_DIR for a target (fusions counted, parity checked) and report what changed.

    --precision fp16|int8 records calibration inputs by running the fp32 kiln on prompts (20 steps each), converts,
    scores against fp32 and writes precision_report.json (also a --recipe for later builds).
    With --lora/--embedding, the optimized graphs (cached in KILN_DIR/optimized/) get them folded in, into OUT."""
    from diffkiln.calibration import optimize_with_calibration
    from diffkiln.optimizers.optimize import default_out
    from diffkiln.optimizers.precision.apply import PrecisionOptions

    log = lambda msg: click.echo(msg, err=True)  # noqa: E731
    folding = bool(loras or embeddings)
    if folding and out is None:
        raise click.UsageError("--lora/--embedding need -o OUT (the optimized graphs stay cached without them)")
    optimized = default_out(kiln_dir, target, precision) if folding else out
    components = [c.strip() for c in components_csv.split(",") if c.strip()] if components_csv else None
    report = optimize_with_calibration(
        kiln_dir,
        target,
        precision,
        prompts_file=calibration_file,
        count=calib_prompts,
        size=calib_size,
        components=components,
        options=PrecisionOptions(percentile=percentile, min_psnr=min_psnr, fp16_io=fp16_io, smooth=smooth),
        recipe_file=recipe_file,
        out=optimized,
        force=force and not folding,
        log=log,
    )
    if folding:
        from diffkiln.lora import fold_loras

        fold_loras(optimized, loras, out, embeddings=embeddings, allow_partial=allow_partial, force=force, log=log)
    out = out or default_out(kiln_dir, target, precision)
    click.echo(
        f"{'component':16s} {'nodes':>15s}  {'attention':>9s} {'gelu':>5s} {'groupnorm':>9s} {'layernorm':>9s}  parity"
    )
    for name, c in report["components"].items():
        counts = c["counts"]
        nodes = f"{c['nodes_before']} → {c['nodes_after']}"
        click.echo(
            f"{name:16s} {nodes:>15s}  {counts.get('attention', 0):9d} {counts.get('gelu', 0):5d} "
            f"{counts.get('groupnorm', 0):9d} {counts.get('layernorm', 0):9d}  {c['parity']['worst_rel_err']:.1e}"
        )
    _echo_precision(out)
    click.echo(f"wrote {out}")


def _echo_precision(out: Path) -> None:
    """One line per converted component: precision, what stayed in higher precision, PSNR against fp32."""
    import json

    from diffkiln.optimizers.optimize import PRECISION_REPORT

    try:
        report = json.loads((out / PRECISION_REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    for name, c in report.get("components", {}).items():
        kept = len(c.get("kept", c.get("islands", {})))
        psnr = c.get("fidelity", {}).get("psnr_db")
        score = f"{psnr:.1f} dB vs fp32" if isinstance(psnr, float) else "not scored"
        click.echo(f"{name:16s} {c.get('precision')}: {kept} node(s) kept in higher precision, {score}")


@main.command()
@click.argument("prompt")
@click.option("-m", "--model", help="Kiln directory, diffusers folder, demo or preset (default: demo, trained).")
@click.option("--negative", default="", help="Negative prompt.")
@click.option("--steps", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option(
    "--sampler",
    "--scheduler",
    "scheduler",
    default="euler",
    show_default=True,
    help=f"Sampler (diffusers calls it the scheduler): {', '.join(REGISTRY)}.",
)
@click.option(
    "--guidance", type=float, help="Classifier-free guidance scale, ≤1: off (default 7.5; Flux: distilled, 3.5)."
)
@click.option("--true-cfg", type=float, default=1.0, show_default=True, help="Flux: true CFG over --negative when > 1.")
@click.option("--seed", type=int, default=0, show_default=True, help="numpy Generator seed for the initial noise.")
@click.option("--height", type=int, help="Image height in pixels (default: the model's native size).")
@click.option("--width", type=int, help="Image width in pixels (default: the model's native size).")
@click.option("--batch", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--image", "image_path", type=click.Path(path_type=Path), help="Init image for img2img.")
@click.option("--strength", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.8, show_default=True)
@click.option("--latents", type=click.Path(path_type=Path), help="Initial noise [B,4,h,w] as .npy (instead of --seed).")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("out.png"), show_default=True)
@click.option("--backend", type=click.Choice(["ort", "openvino", "tensorrt"]), default="ort", show_default=True)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda", "gpu"]),
    help="ort: cpu|cuda (default: cuda if any); openvino: cpu|gpu; tensorrt: cuda.",
)
@click.option(
    "--engines",
    "engines_root",
    type=click.Path(path_type=Path),
    help="tensorrt: the engines root `diffkiln build` wrote (default: KILN_DIR/engines).",
)
@click.option(
    "--refit-payload",
    type=click.Path(path_type=Path),
    help="tensorrt: LoRAs to refit into the engines (`diffkiln lora KILN LORA --refit-payload FILE`).",
)
@click.option(
    "--precision-hint",
    type=click.Choice(["f32", "bf16", "f16"]),
    help="OpenVINO's inference precision (default f32: OpenVINO would silently pick bf16 on CPUs that have it).",
)
@user_errors
def run(
    prompt,
    model,
    negative,
    steps,
    scheduler,
    guidance,
    true_cfg,
    seed,
    height,
    width,
    batch,
    image_path,
    strength,
    latents,
    out,
    backend,
    device,
    engines_root,
    refit_payload,
    precision_hint,
):
    """Generate an image from PROMPT with ONNX Runtime, OpenVINO or TensorRT (no torch at inference)."""
    from diffkiln.models import resolve_model
    from diffkiln.runtime.backends import runner_factory
    from diffkiln.runtime.generate import generate

    if refit_payload is not None and backend != "tensorrt":
        raise click.UsageError("--refit-payload refits TensorRT engines: use it with --backend tensorrt")
    factory = runner_factory(backend, device, precision_hint, engines_root)  # refuses a missing backend up front
    kiln_dir = resolve_model(model, log=lambda msg: click.echo(msg, err=True))
    generate(
        kiln_dir,
        runner_factory=factory,
        prompt=prompt,
        negative_prompt=negative,
        steps=steps,
        scheduler=scheduler,
        guidance=guidance,
        true_cfg=true_cfg,
        seed=seed,
        height=height,
        width=width,
        batch=batch,
        image_path=image_path,
        strength=strength,
        latents_path=latents,
        refit_payload=refit_payload,
        out=out,
        echo=lambda msg: click.echo(msg, err=True),
    )


@main.command()
@click.argument("kiln_dir", type=click.Path(path_type=Path))
@click.option("--batch", help="Images per prompt, N or MIN:OPT:MAX (the UNet's CFG batch is twice this).")
@click.option("--height", help="Image height in pixels, N or MIN:OPT:MAX (default: the kiln's profile).")
@click.option("--width", help="Image width in pixels, N or MIN:OPT:MAX (default: the kiln's profile).")
@click.option("--static", is_flag=True, help="min = opt = max shapes (lets the runtime capture CUDA graphs).")
@click.option("--refit", is_flag=True, help="Refittable engines (LoRA payloads swap weights in place).")
@click.option("--strip-weights", is_flag=True, help="Weight-stripped plans, refitted from the ONNX at load.")
@click.option("--timing-cache", type=click.Path(path_type=Path), help="Timing cache shared by every build.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True)
@click.option("--workspace", type=click.FloatRange(0.1, 1024), help="Builder workspace limit in GB.")
@click.option("--components", help="Comma-separated subset of the kiln's components (default: all).")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Engines root (default: KILN_DIR/engines).")
@click.option("--force", is_flag=True, help="Rebuild even when the engines are up to date.")
@user_errors
def build(kiln_dir, batch, height, width, static, refit, strip_weights, timing_cache, opt_level, workspace,
          components, out, force):  # fmt: skip
    """Build one TensorRT engine per component of KILN_DIR (strongly typed: the graphs carry their precision)."""
    from diffkiln.builder.build import BuildRequest
    from diffkiln.builder.build import build as run_build
    from diffkiln.builder.profiles import ShapeRequest, parse_range
    from diffkiln.builder.trt import BuildOptions

    shapes = ShapeRequest(
        parse_range(batch, "--batch"), parse_range(height, "--height"), parse_range(width, "--width"), static
    )
    names = tuple(c.strip() for c in components.split(",") if c.strip()) if components else None
    options = BuildOptions(opt_level, workspace, refit, strip_weights)
    request = BuildRequest(shapes, options, names, timing_cache, out, force)
    click.echo(f"wrote {run_build(kiln_dir, request, log=lambda msg: click.echo(msg, err=True))}")


@main.command()
@click.argument("source", required=False)
@bench_options
@user_errors
def bench(source, **options):
    """Benchmark the PyTorch reference and every diffkiln path side by side on the same prompts, seeds and
    latents (SOURCE: preset, diffusers folder or kiln dir; default: demo, the bundled trained model); writes
    report.md, report.json and plots."""
    from diffkiln.bench.command import bench_command

    bench_command(source, **options, echo=lambda msg: click.echo(msg, err=True))


@main.command("export-triton")
@click.argument("kiln_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Model repository to write.")
@click.option(
    "--engines",
    "engines_dir",
    type=click.Path(path_type=Path),
    help="TensorRT engines (a root of <trt>-sm<cc>/ folders, or one): their components become tensorrt_plan models.",
)
@click.option(
    "--instance-kind",
    type=click.Choice(["auto", "gpu", "cpu"]),
    default="auto",
    show_default=True,
    help="Where the onnxruntime models run (auto: cpu for a kiln optimized for ort-cpu, else gpu); plans: gpu.",
)
@click.option("--force", is_flag=True, help="Replace an existing repository / rewrite it even if up to date.")
@user_errors
def export_triton(kiln_dir, out, engines_dir, instance_kind, force):
    """Write an NVIDIA Triton Inference Server model repository for KILN_DIR: one model per component (ONNX
    Runtime, or TensorRT with --engines) and diffkiln_pipeline, a Python-backend model that runs diffkiln's
    sampling loop over them (PROMPT in, IMAGE out)."""
    from diffkiln.builder.triton import export_triton as run_export

    log = lambda msg: click.echo(msg, err=True)  # noqa: E731
    repo = run_export(kiln_dir, out, engines_dir=engines_dir, instance_kind=instance_kind, force=force, log=log)
    click.echo(f"wrote {repo}")


if __name__ == "__main__":
    main()
