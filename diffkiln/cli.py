"""The `diffkiln` command: thin click commands over library functions.

Errors a user can fix (DiffkilnError) print one line and exit 1; nothing prints a traceback for bad input.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from diffkiln import __version__
from diffkiln.errors import DiffkilnError


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


@main.command()
@click.argument("source")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Kiln directory to write.")
@click.option(
    "--components",
    help="Comma-separated subset: text_encoder,text_encoder_2,unet,vae_decoder,vae_encoder (default: all).",
)
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (14..20).")
@click.option("--force", is_flag=True, help="Replace an existing kiln directory / re-export even if up to date.")
@user_errors
def export(source, out, components, opset, force):
    """Export SOURCE (a local diffusers folder or a preset) to ONNX with proven parity.

    Presets: tiny, tiny-sdxl, sd15, sd21, sdxl (real architectures, seeded random weights).
    """
    from diffkiln.exporter import ExportOptions, open_source
    from diffkiln.exporter import export as run_export

    names = tuple(c.strip() for c in components.split(",") if c.strip()) if components else None
    options = ExportOptions(components=names, opset=opset, force=force)
    run_export(open_source(source), out, options, log=lambda msg: click.echo(msg, err=True))
    click.echo(f"wrote {out}")


@main.command()
@click.argument("kiln_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def inspect(kiln_dir, as_json):
    """Summarize a kiln directory: components, I/O shapes, sizes, op histogram, parity."""
    from diffkiln.inspect import render, summarize

    summary = summarize(kiln_dir)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        render(summary, echo=click.echo)


if __name__ == "__main__":
    main()
