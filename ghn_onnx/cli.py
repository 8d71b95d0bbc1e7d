"""The ``ghn-onnx`` command line: thin adapters that parse options and call the library.

Exit codes: 0 success; 1 an output could not be produced (matplotlib missing for --png/--svg,
image path not writable); 2 bad input (bad usage, a model that cannot be read or that a GHN
cannot serve). Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ghn_onnx import __version__
from ghn_onnx.errors import GhnOnnxError

if TYPE_CHECKING:
    from ghn_onnx.graph import Graph

EXIT_CODES_HELP = ("Exit codes: 0 ok; 1 an output could not be written (e.g. matplotlib missing); "
                   "2 bad input (unreadable or unsupported model, bad usage).")


class InputError(click.ClickException):
    """A user error about the input: printed as one line, exit code 2 (like click's usage errors)."""

    exit_code = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, "--version", prog_name="ghn-onnx")
def main() -> None:
    """Graph hypernetworks for ONNX models: predict the parameters of a network in one pass."""


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("model", metavar="MODEL.onnx", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, default=False, show_default=True,
              help="Print the whole report as JSON (keys in a fixed order) instead of text.")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw the GHN graph to this PNG file (needs the 'viz' extra).")
@click.option("--svg", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw the GHN graph to this SVG file (needs the 'viz' extra).")
def inspect(model: Path, as_json: bool, png: Path | None, svg: Path | None) -> None:
    """Show the GHN graph of MODEL.onnx and how much of the model a GHN would predict.

    Reports the node count per primitive, nodes, one-hop edges and edges once virtual edges are
    added, then every float tensor stored in the model in one group: predicted; statistics
    (BatchNorm running mean/var: calibrated, not predicted); unsupported (ops with no GHN
    primitive); other (scales, bounds, scalar constants). Coverage is the share of predicted
    elements among stored float elements with statistics excluded, and among all of them.

    Identity aliases that an exporter made of equal initializers count as tensors of their own,
    as prediction writes them. The model file is only read.
    """
    # Imported here, not at the top, so that --help and --version answer without loading onnx.
    from ghn_onnx.inspection import format_report, inspect_model

    images = [(p, fmt) for p, fmt in ((png, "png"), (svg, "svg")) if p is not None]
    for path, _ in images:
        if path.resolve() == model.resolve():
            raise InputError(f"{path}: refusing to draw over the input model")
    try:
        report, graph = inspect_model(model)
    except GhnOnnxError as exc:
        raise InputError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(format_report(report))
    for path, fmt in images:
        _draw(graph, path, fmt)


def _draw(graph: Graph, path: Path, fmt: str) -> None:
    from ghn_onnx.drawing import DrawingUnavailableError, draw_graph

    try:
        draw_graph(graph, path, fmt)
    except DrawingUnavailableError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot write ({exc.strerror or exc})") from None
    click.echo(f"wrote {path}", err=True)
