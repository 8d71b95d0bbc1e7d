"""The ``ghn-onnx`` command line: thin adapters that parse options and call the library.

Exit codes: 0 success; 1 an output could not be produced (matplotlib missing for --png/--svg,
an output path not writable: permissions, read-only file system, disk full); 2 bad input (bad
usage, including an output path that names a device, FIFO or folder, or the input itself; a
model that cannot be read or that a GHN cannot serve). Errors are one line on stderr, never a
traceback: usage errors too (:class:`OneLineErrors`), and warnings raised on the way to an error
are dropped (:func:`quiet_failure`). ``predict -O`` reports each input that fails on a line of its
own and goes on with the others.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import click

from ghn_onnx.errors import GhnOnnxError, OutputError
from ghn_onnx.version import __version__

if TYPE_CHECKING:
    from ghn_onnx.graph.graph import Graph

EXIT_CODES_HELP = ("Exit codes: 0 ok; 1 an output could not be written (e.g. matplotlib missing, "
                   "permission denied); 2 bad input (unreadable or unsupported model, bad usage, an output "
                   "path that is a device, FIFO, folder or the input).")


CHECKPOINT_HELP = ("GHN checkpoint: a name from `ghn-onnx checkpoints` (fetched into the cache and converted on "
                   "first use; GHN_ONNX_OFFLINE=1 keeps downloads off) or a .safetensors file. Default: the "
                   "checkpoint shipped with the package.")


class InputError(click.ClickException):
    """A user error about the input: printed as one line, exit code 2 (like click's usage errors)."""

    exit_code = 2


def _user_error(exc: GhnOnnxError) -> click.ClickException:
    """The one-line CLI error for a library error: exit 1 for an output that could not be
    written (:class:`OutputError`), else 2."""
    return click.ClickException(str(exc)) if isinstance(exc, OutputError) else InputError(str(exc))


class OneLineErrors(click.Group):
    """The ``ghn-onnx`` group: a usage error (unknown option, missing argument, a path of the
    wrong kind for ``-o`` / ``-O`` / ``--checkpoint``) is one line, ``Error: ...``, exit code 2,
    like every other error, instead of click's four-line usage block."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise _one_line(exc) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line(exc) from None


def _one_line(exc: click.UsageError) -> click.ClickException:
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):  # `ghn-onnx` alone: the help text
        return exc
    where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
    return InputError(" ".join(exc.format_message().split()).rstrip(".") + where)


def quiet_failure(command: Callable) -> Callable:
    """Hold back the Python warnings a command raises (torch's and onnx's notes on odd files)
    until it succeeds, then show them; a command that fails prints its error line alone."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            result = command(*args, **kwargs)
        for w in caught:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
        return result

    return run


def threads_option(command: Callable) -> Callable:
    """--threads N: one definition for every command that computes. While the command runs, torch,
    numba and every onnxruntime session have N threads (:func:`ghn_onnx.threads.using_threads`); a
    command with a ``threads`` parameter receives the count."""
    import inspect as signature_of

    wants_count = "threads" in signature_of.signature(command).parameters

    @functools.wraps(command)
    def run(*args, threads: int | None, **kwargs):
        from ghn_onnx.threads import using_threads

        with using_threads(threads) as count:  # restored after: the CLI also runs in-process (tests, scripts)
            return command(*args, **kwargs, **({"threads": count} if wants_count else {}))

    return click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
                        help="CPU threads for torch, numba and onnxruntime. Default: the CPUs this process may "
                             "run on ($OMP_NUM_THREADS where set).")(run)


def _check_input(path: Path, what: str) -> None:
    """Refuse an input that is not a regular file (a FIFO would block the reader) before any work."""
    from ghn_onnx.onnx_io.files import regular_file_stat

    try:
        regular_file_stat(path, GhnOnnxError, what)
    except GhnOnnxError as exc:
        raise _user_error(exc) from None


def _check_output(path: Path, *inputs: Path) -> None:
    """Refuse an output path early (before any work): see :func:`~ghn_onnx.onnx_io.files.check_output_file`."""
    from ghn_onnx.onnx_io.files import check_output_file

    try:
        check_output_file(path, inputs)
    except GhnOnnxError as exc:
        raise _user_error(exc) from None


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
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
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="NAME|FILE",
              help="The GHN whose class count the classifier is compared with (a name is not downloaded: its "
                   "configuration is in the registry). Default: the checkpoint shipped with the package.")
@quiet_failure
def inspect(model: Path, as_json: bool, png: Path | None, svg: Path | None, checkpoint: Path | None) -> None:
    """Show the GHN graph of MODEL.onnx and how much of the model a GHN would predict.

    Reports the node count per primitive, nodes, one-hop edges and edges once virtual edges are
    added, then every float tensor stored in the model in one group: predicted; statistics
    (BatchNorm running mean/var: calibrated, not predicted); unsupported (ops with no GHN
    primitive); other (scales, bounds, scalar constants). Coverage is the share of predicted
    elements among stored float elements with statistics excluded, and among all of them.

    Identity aliases that an exporter made of equal initializers count as tensors of their own,
    as prediction writes them. The classifier is reported with how the GHN fills it: a head whose
    out-features are not the GHN's class count gets the GHN's class rows, sliced or tiled. The
    model file is only read.
    """
    # Imported here, not at the top, so that --help and --version answer without loading onnx.
    from ghn_onnx.report.inspection import format_report, inspect_model

    images = [(p, fmt) for p, fmt in ((png, "png"), (svg, "svg")) if p is not None]
    for path, _ in images:
        if path.resolve() == model.resolve():
            raise InputError(f"{path}: refusing to draw over the input model")
        _check_output(path, model)
    from ghn_onnx.ghn.registry import config_of

    try:
        classes = config_of(checkpoint).num_classes
        report, graph = inspect_model(model)
    except GhnOnnxError as exc:
        raise _user_error(exc) from None
    report = report.for_classes(classes)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(format_report(report))
    for path, fmt in images:
        _draw(graph, path, fmt)


def _draw(graph: Graph, path: Path, fmt: str) -> None:
    from ghn_onnx.report.drawing import DrawingUnavailableError, draw_graph

    try:
        draw_graph(graph, path, fmt)
    except DrawingUnavailableError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot write ({exc.strerror or exc})") from None
    click.echo(f"wrote {path}", err=True)


# -- predict -------------------------------------------------------------------------------------

def for_training_options(command):
    """--for-training [--noise F] [--orthogonal-from F | --no-orthogonal] [--rescale/--no-rescale] [--perturb P]
    [--noise-seed N],
    given to the command as one ``for_training`` argument: a :class:`~ghn_onnx.writeback.for_training.ForTraining`, or
    ``None`` without --for-training."""
    @functools.wraps(command)
    def run(*args, for_training: bool, noise: float | None, orthogonal_from: float | None,
            no_orthogonal: bool, rescale: bool | None, perturb: float | None, noise_seed: int, **kwargs):
        if not for_training:
            if noise is not None or orthogonal_from is not None or no_orthogonal or rescale is not None \
                    or perturb is not None:
                raise InputError("--noise, --orthogonal-from, --no-orthogonal, --rescale/--no-rescale and --perturb "
                                 "go with --for-training")
            return command(*args, for_training=None, **kwargs)
        if no_orthogonal and orthogonal_from is not None:
            raise InputError("give --orthogonal-from or --no-orthogonal, not both")
        from ghn_onnx.writeback.for_training import ForTraining

        default = ForTraining()
        ortho = None if no_orthogonal else default.orthogonal_from if orthogonal_from is None else orthogonal_from
        try:
            options = ForTraining(noise=default.noise if noise is None else noise, orthogonal_from=ortho,
                                  seed=noise_seed, rescale=default.rescale if rescale is None else rescale,
                                  perturb=default.perturb if perturb is None else perturb)
        except GhnOnnxError as exc:
            raise InputError(str(exc)) from None
        return command(*args, for_training=options, **kwargs)

    run = click.option("--noise-seed", type=int, default=0, show_default=True,
                       help="Seed of the --for-training noise.")(run)
    run = click.option("--perturb", type=float, default=None, metavar="P",
                       help="With --for-training: mix every conv/linear weight but the classifier with a seeded "
                            "draw of its default init, (1-P) W + P R at W's norm (default 0: off).")(run)
    run = click.option("--rescale/--no-rescale", default=None,
                       help="With --for-training: scale each weight that a normalisation follows to its "
                            "default init's norm (the function is unchanged under batch statistics; the "
                            "learning rate then suits every layer alike).")(run)
    run = click.option("--no-orthogonal", is_flag=True,
                       help="With --for-training: noise on repeated rows only, no orthogonalisation.")(run)
    run = click.option("--orthogonal-from", type=float, default=None, metavar="FRACTION",
                       help="With --for-training: orthogonalise the conv/linear weights from this fraction "
                            "of the depth on (default 0: all; the classifier never).")(run)
    run = click.option("--noise", type=float, default=None, metavar="F",
                       help="With --for-training: noise std on repeated rows, relative to the tensor's "
                            "std (default 0.01).")(run)
    return click.option("--for-training", is_flag=True,
                        help="Make the predictions ready for fine-tuning: break the symmetry of tiled "
                             "(repeated) channels with seeded noise; recorded in the output's metadata. "
                             "Fine-tune with a smaller learning rate than from scratch (see README).")(run)


def normalisation_options(command):
    """--mean / --std / --no-normalize: how calibration images are normalised (predict, calibrate)."""
    command = click.option("--no-normalize", is_flag=True,
                           help="Feed calibration images as pixel values 0..255, for models with their own "
                                "rescaling / normalisation layers (excludes --mean and --std).")(command)
    command = click.option("--std", default=None, metavar="S[,S,...]",
                           help="Per-channel std of calibration images, (x/255 - mean)/std; one value or one "
                                "per channel. Default: CIFAR-10's 0.2470,0.2435,0.2616.")(command)
    return click.option("--mean", default=None, metavar="M[,M,...]",
                        help="Per-channel mean of calibration images (scaled to 0..1); one value or one per "
                             "channel. Default: CIFAR-10's 0.4914,0.4822,0.4465.")(command)


def _normalisation(mean: str | None, std: str | None, no_normalize: bool) -> dict:
    """The PredictOptions / calibration_set keywords of --mean, --std, --no-normalize."""
    if no_normalize and (mean is not None or std is not None):
        raise InputError("--no-normalize feeds raw pixel values: give it without --mean and --std")
    out: dict = {"no_normalize": no_normalize}
    for flag, value in (("mean", mean), ("std", std)):
        if value is None:
            continue
        try:
            out[flag] = tuple(float(v) for v in value.split(","))
        except ValueError:
            raise InputError(f"--{flag}: expected comma-separated numbers (got {value!r})") from None
    return out


#: Old spellings of calibration options, kept working (hidden, with a warning) for one release: old → new.
RENAMED_CALIBRATION_OPTIONS = {"--data": "--calibrate", "--images": "--calibration-images",
                               "--batch-size": "--calibration-batch"}
_CALIBRATION_DESTS = {"--calibrate": "calibrate_data", "--calibration-images": "calibration_images",
                      "--calibration-batch": "calibration_batch"}


def calibration_images_option(command):
    """--calibration-images N: one definition for every command that calibrates (predict, calibrate, eval)."""
    return click.option("--calibration-images", type=click.IntRange(min=1), default=512, show_default=True,
                        help="How many training images to draw (at random) for BN calibration.")(command)


def calibration_options(*, required: bool = False, renamed: tuple[str, ...] = (), modes: bool = False):
    """The calibration options of ``predict`` and ``calibrate``, defined once: --calibrate IMAGES,
    --calibration-images N, --calibration-batch N, --seed, --mean / --std / --no-normalize, and
    --calibration-mode where the command can pass it on (``modes``).

    ``renamed``: old spellings (keys of :data:`RENAMED_CALIBRATION_OPTIONS`) the command still
    takes, hidden from --help; one given prints one warning line and sets its new option (both
    given is a usage error). ``required``: --calibrate (or its old spelling) must be given.
    """
    def decorate(command):
        @functools.wraps(command)
        def run(*args, **kwargs):
            ctx = click.get_current_context()
            for old in renamed:
                new = RENAMED_CALIBRATION_OPTIONS[old]
                value, dest = kwargs.pop(_renamed_dest(old)), _CALIBRATION_DESTS[new]
                if value is None:
                    continue
                if ctx.get_parameter_source(dest) is not click.core.ParameterSource.DEFAULT:
                    raise InputError(f"{old} is the old name of {new}: give {new} alone")
                click.echo(f"warning: {old} is deprecated and goes in the next release: use {new}", err=True)
                kwargs[dest] = value
            if required and kwargs["calibrate_data"] is None:
                raise InputError("missing option '--calibrate IMAGES' (see "
                                 f"'{ctx.command_path} --help')")
            return command(*args, **kwargs)

        for old in reversed(renamed):
            new = RENAMED_CALIBRATION_OPTIONS[old]
            kind = click.Path(path_type=Path) if new == "--calibrate" else click.IntRange(min=1)
            run = click.option(old, _renamed_dest(old), type=kind, default=None, hidden=True,
                               help=f"Deprecated: {new}.")(run)
        run = normalisation_options(run)
        run = click.option("--seed", type=int, default=0, show_default=True,
                           help="Seed of the calibration subset (which images, in which order).")(run)
        if modes:
            from ghn_onnx.bn.modes import CALIBRATION_MODES  # no onnx: --help stays fast

            run = click.option("--calibration-mode", type=click.Choice(CALIBRATION_MODES), default=CALIBRATION_MODES[0],
                               show_default=True,
                               help="one-pass: every BN measured in one forward per batch, the BNs above on "
                                    "that batch's statistics (PyTorch's training mode); sequential: level by "
                                    "level, the BNs above on their calibrated statistics (exact eval-mode "
                                    "inputs, ~levels/2 passes); two-pass: one-pass, then one eval-mode pass "
                                    "with those statistics.")(run)
        run = click.option("--calibration-batch", type=click.IntRange(min=1), default=64, show_default=True,
                           help="Images per calibration batch (a model with a fixed batch size is calibrated "
                                "at its own).")(run)
        run = calibration_images_option(run)
        return click.option("--calibrate", "calibrate_data", type=click.Path(path_type=Path), default=None,
                            required=False, metavar="IMAGES",
                            help="Calibration images: a folder or .zip of images (train/ only where there are "
                                 "splits), or a .npy/.npz array." + (" Required." if required else
                                 " Measure BN running statistics on them."))(run)

    return decorate


def _renamed_dest(old: str) -> str:
    return "renamed_" + old.lstrip("-").replace("-", "_")


def _load_ghn(checkpoint_path: Path | None, device: str):
    """The GHN of ``--checkpoint`` (default: the shipped one) and its file."""
    from ghn_onnx.pipeline import load_ghn, resolve_checkpoint

    try:
        path = resolve_checkpoint(checkpoint_path)
        return load_ghn(path, device=device), path
    except GhnOnnxError as exc:
        raise _user_error(exc) from None


def _checkpoint_file(checkpoint_path: Path | None, device: str) -> Path:
    """The file of ``--checkpoint``, its configuration read (a bad file is one error line here),
    the GHN not loaded: ``predict --jobs`` workers load it."""
    from ghn_onnx.ghn.checkpoint import read_config
    from ghn_onnx.pipeline import resolve_checkpoint

    try:
        path = resolve_checkpoint(checkpoint_path)
        read_config(path)
    except GhnOnnxError as exc:
        raise _user_error(exc) from None
    return path


def _check_device(device: str) -> str:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available")
    return device


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("models", metavar="IN...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output file (one input only).")
@click.option("-O", "--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: each input file is written there under its own name, the files of a "
                   "folder or glob under their path relative to it.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Worker processes for -O (each loads, converts, predicts and writes its share of the "
                   "files; --threads is split between them).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="NAME|FILE",
              help=CHECKPOINT_HELP)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the GHN runs.")
@calibration_options(renamed=("--batch-size",), modes=True)
@click.option("--unfold-bn", is_flag=True,
              help="For BN-folded exports: predict as if a BN followed each folded conv, calibrate its "
                   "statistics on --calibrate images, and write the folded conv weight and bias.")
@for_training_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
@threads_option
@quiet_failure
def predict(models, output, output_dir, checkpoint, device, calibrate_data, calibration_images, calibration_batch,
            calibration_mode, seed, mean, std, no_normalize, unfold_bn, for_training, as_json, jobs) -> None:
    """Predict every supported parameter of each IN and write the model(s) back out.

    IN is an .onnx file, a folder (every *.onnx under it, recursively) or a quoted glob
    ('models/**/*.onnx'). Inputs go through the GHN in batches as memory allows; a file that
    fails is reported (exit code 2, or 1 if only outputs could not be written) and the others go
    on. Each output keeps the input's
    opset, names, inputs and unpredicted tensors; predicted tensors keep their layout and dtype.
    BN running statistics are not predicted: pass --calibrate to measure them on images, or
    evaluate with batch statistics. Inputs are never modified; outputs are written atomically.
    """
    from tqdm import tqdm

    import multiprocessing

    from ghn_onnx.ghn.checkpoint import file_sha256
    from ghn_onnx.many_files import expand_inputs, predict_many
    from ghn_onnx.pipeline import PredictOptions, predict_files

    if (output is None) == (output_dir is None):
        raise InputError("give exactly one of -o OUT.onnx (one input) or -O OUTDIR")
    try:
        inputs = expand_inputs(models, exclude=output_dir)
    except GhnOnnxError as exc:
        raise _user_error(exc) from None
    if output is not None and len(inputs) != 1:
        raise InputError(f"-o takes one input (got {len(inputs)} files); use -O OUTDIR for several")
    if output_dir is not None:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            for _, rel in inputs:
                (output_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise click.ClickException(f"{output_dir}: cannot create the output folder "
                                       f"({exc.strerror or exc})") from None
        outputs = [output_dir / rel for _, rel in inputs]
    else:
        _check_output(output, inputs[0][0])
        outputs = [output]
    models = [src for src, _ in inputs]
    if output_dir is not None and jobs > 1:  # the workers load the GHN; this process only reads its file
        ghn, ckpt = None, _checkpoint_file(checkpoint, _check_device(device))
    else:
        ghn, ckpt = _load_ghn(checkpoint, _check_device(device))
    options = PredictOptions(calibrate=calibrate_data, calibration_images=calibration_images, calibration_batch=calibration_batch,
                             seed=seed, **_normalisation(mean, std, no_normalize), unfold_bn=unfold_bn, device=device,
                             calibration_mode=calibration_mode, for_training=for_training,
                             metadata={"checkpoint_sha256": file_sha256(ckpt)})
    try:
        if output is not None:  # files only: the predicted values never go into in-memory models
            summaries = [r.summary() for r in predict_files(models, outputs, ghn, options, return_models=False)]
            click.echo(json.dumps(summaries, indent=2)) if as_json else _print_predictions(summaries)
            return
        # None: tqdm shows the bar only on a terminal (a pipe or log gets the Error lines alone)
        with tqdm(total=len(models), desc="predict", unit="model",
                  disable=True if as_json or len(models) < 2 else None) as bar:
            fork = "fork" if "fork" in multiprocessing.get_all_start_methods() else None  # no op has run here yet
            results = predict_many(models, outputs, ckpt, options, jobs=jobs, ghn=ghn, progress=bar.update,
                                   start_method=fork)
    except GhnOnnxError as exc:
        raise _user_error(exc) from None
    if as_json:  # one entry per input, in input order, with its status
        click.echo(json.dumps([r.to_json() for r in results], indent=2))
    else:
        _print_predictions([r.summary for r in results if r.ok])
    failed = [r for r in results if not r.ok]
    for r in failed:
        click.echo(f"Error: {r.error}", err=True)
    if failed:  # 2 if any input was bad, 1 if only outputs could not be written
        click.get_current_context().exit(2 if any(not r.output_error for r in failed) else 1)


def _print_predictions(summaries: list[dict]) -> None:
    for s in summaries:
        click.echo(f"{s['name']} -> {s['output']}: {s['predicted_tensors']} tensors, "
                   f"{s['predicted_elements']:,} parameters predicted; BN {s['bn']}")
        for w in s["warnings"]:
            click.echo(f"  warning: {w}", err=True)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("model", metavar="IN.onnx", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output file.")
@calibration_options(required=True, renamed=("--data", "--images", "--batch-size"), modes=True)
@threads_option
@quiet_failure
def calibrate(model, output, calibrate_data, calibration_images, calibration_batch, calibration_mode, seed, mean, std,
              no_normalize) -> None:
    """Measure BN running statistics of IN.onnx on images and write them (nothing else changes).

    Images come from the train/ split of a folder or zip that has splits, are resized to the
    model's input size and laid out as its input is (NCHW or NHWC). A model with a fixed batch
    size is calibrated at that size. A model with no BatchNormalization is written unchanged."""
    from ghn_onnx.bn.calibration import calibrate_bn, calibration_set, calibration_targets
    from ghn_onnx.onnx_io.loading import load_model
    from ghn_onnx.writeback.write import save_model

    _check_output(output, model)
    normalisation = _normalisation(mean, std, no_normalize)
    try:
        m = load_model(model)
        if not calibration_targets(m):
            save_model(m, output, source_path=model)
            click.echo(f"wrote {output} unchanged: {model.name} has no BatchNormalization with stored running "
                       "statistics, nothing to calibrate")
            return
        calibration = calibration_set(m, calibrate_data, calibration_images, calibration_batch, seed, **normalisation)
        save_model(calibrate_bn(m, calibration.batches, mode=calibration_mode), output, source_path=model)
    except GhnOnnxError as exc:
        raise _user_error(exc) from None
    for note in calibration.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {output} (BN statistics from {calibration.images} images)")


# -- explain -------------------------------------------------------------------------------------

@main.command(epilog=EXIT_CODES_HELP)
@click.argument("model", metavar="MODEL.onnx", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Images (folder or .zip with class folders, .npy/.npz) for activations and accuracy; "
                   "the held-out split (test/, val/) is used when there is one. Default: tensor statistics only.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="NAME|FILE",
              help="Predict MODEL.onnx with this GHN first (a raw model); without it MODEL.onnx must be a file "
                   "written by `ghn-onnx predict`.")
@click.option("--images", type=click.IntRange(min=1), default=256, show_default=True,
              help="How many images to draw at random.")
@click.option("--layers", type=click.IntRange(min=0), default=None,
              help="Re-initialise only the K largest layers (by elements). Default: every layer.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per batch (batch-statistics BN depends on it).")
@click.option("--bn", type=click.Choice(["batch", "stored"]), default="batch", show_default=True,
              help="BatchNorm with the statistics of each batch (as the GHN papers) or the stored running ones.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the image subset and re-inits.")
@normalisation_options
@click.option("--json", "as_json", is_flag=True, help="Print the explanation as JSON instead of a table.")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw the per-layer bars to this PNG file (needs the 'viz' extra).")
@click.option("--quiet", is_flag=True, help="No progress bar on stderr.")
@threads_option
@quiet_failure
def explain(model, data, checkpoint, images, layers, batch_size, bn, seed, mean, std, no_normalize, as_json, png,
            quiet) -> None:
    """Per predicted layer of MODEL.onnx: what the GHN predicted and how much it matters.

    From the tensors: the norm against PyTorch's default init, the share of exactly repeated
    rows and input channels (tiling), the effective rank. With --data: each layer output's
    mean, std and dead-unit share on one batch, the model's top-1, and the top-1 lost when
    that layer alone is re-initialised at random; the table is sorted by that loss. The model
    is only read.
    """
    from tqdm import tqdm

    from ghn_onnx.report.explain import explain as explain_model

    if png is not None:
        if png.resolve() == model.resolve():
            raise InputError(f"{png}: refusing to draw over the input model")
        _check_output(png, model)
    _check_input(model, "model")
    ghn = _load_ghn(checkpoint, "cpu")[0] if checkpoint is not None else None
    try:
        result = explain_model(model, data, checkpoint=ghn, images=images, layers=layers, batch_size=batch_size,
                               seed=seed, bn=bn, **_normalisation(mean, std, no_normalize),
                               progress=lambda it: tqdm(it, desc="re-init", unit="layer", disable=True if quiet else None))
    except GhnOnnxError as exc:
        raise _user_error(exc) from None
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else result.format())
    if png is not None:
        from ghn_onnx.report.drawing import DrawingUnavailableError
        from ghn_onnx.report.explain_plot import plot_explanation

        try:
            plot_explanation(result, png)
        except DrawingUnavailableError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            raise click.ClickException(f"{png}: cannot write ({exc.strerror or exc})") from None
        click.echo(f"wrote {png}", err=True)


@main.command("convert-checkpoint", epilog=EXIT_CODES_HELP)
@click.argument("source", metavar="REFERENCE", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output .safetensors checkpoint.")
@click.option("--num-classes", type=int, default=None, help="Classes (default: read off the weights).")
@click.option("--spatial", type=int, default=None,
              help="s of max_shape (64, 64, s, s): 11 CIFAR-10, 16 ImageNet (default: read off the weights).")
@click.option("--hid", type=int, default=None, help="Node state size (default: read off the weights).")
@quiet_failure
def convert_checkpoint(source, output, num_classes, spatial, hid) -> None:
    """Convert a reference GHN-2 or GHN-3 state dict (ppuda / ghn3 key names: .npz arrays, a .pt
    training checkpoint, or ghn3's released pickle of a bare state dict, each read without
    executing code) to a ghn-onnx checkpoint.

    Reference files carry no configuration to trust, so it is read off the tensors' names and
    shapes (GHN-2 or GHN-3, CIFAR-10 or ImageNet, GHN-3's T/S/L/XL; weight normalisation assumed
    on); the options override it, and every key and shape is then checked against it."""
    from ghn_onnx.ghn import checkpoint, reference_formats

    _check_input(source, "a .npz or .pt reference checkpoint")
    _check_output(output, source)
    given = {k: v for k, v in (("num_classes", num_classes), ("hid", hid)) if v is not None}
    if spatial is not None:
        given["max_shape"] = (64, 64, spatial, spatial)
    try:
        ghn, found = reference_formats.load(source, given)
        checkpoint.save(ghn, output, extra={"converted_from": source.name}, source_path=source)
    except GhnOnnxError as exc:
        raise _user_error(exc) from None
    click.echo(f"wrote {output} ({found.describe()}, {sum(p.numel() for p in ghn.parameters()):,} parameters, "
               f"{ghn.config})")


@main.command("checkpoints", epilog=EXIT_CODES_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON instead of a table.")
def checkpoints_command(as_json: bool) -> None:
    """List the named GHN checkpoints that --checkpoint NAME takes: the shipped one and the public
    ones (family, data set, size, licence, source, sha256 where known, whether it is cached).

    A name not cached yet is downloaded, checked and converted into the cache
    ($GHN_ONNX_HOME/checkpoints/NAME.safetensors) the first time a command uses it. Nothing is
    downloaded here."""
    from ghn_onnx.ghn.registry import format_listing, listing

    rows = listing()
    click.echo(json.dumps(rows, indent=2) if as_json else format_listing(rows))


# -- train ---------------------------------------------------------------------------------------

@main.command(epilog=EXIT_CODES_HELP)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: checkpoints (ghn.safetensors, trainer.*) and logs (log.jsonl, val.jsonl).")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="CIFAR-10: image folder / .zip (train/<class>/*.jpg) or cifar-10-batches-py. Default: download.")
@click.option("--steps", type=int, default=1000, show_default=True, help="Total optimisation steps.")
@click.option("--meta-batch", type=int, default=8, show_default=True, help="Networks per step.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per step (shared by all networks).")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak AdamW learning rate.")
@click.option("--weight-decay", type=float, default=1e-5, show_default=True, help="AdamW weight decay.")
@click.option("--warmup", type=int, default=50, show_default=True, help="Linear warm-up steps (then cosine).")
@click.option("--clip", type=float, default=5.0, show_default=True, help="Gradient norm clip.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the architecture and data streams.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--save-every", type=int, default=100, show_default=True, help="Checkpoint every N steps.")
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Append a record to log.jsonl every N steps.")
@click.option("--eval-every", type=int, default=0, show_default=True,
              help="Validate every N steps on held-out networks and images (0: never).")
@click.option("--val-nets", type=int, default=20, show_default=True, help="Validation networks.")
@click.option("--val-images", type=int, default=1000, show_default=True, help="Validation images (random subset).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--init", "init", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Start a new run from this checkpoint's weights (fresh optimizer and streams).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="The networks' forward/backward (the GHN stays fp32). auto: bf16 on CPUs with native bf16 "
                   "(AVX512-BF16, AMX), fp16 + loss scaling on CUDA, else fp32.")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="Feed the networks NHWC images (faster convolutions on CPU).")
@click.option("--fast-ops/--no-fast-ops", default=True, show_default=True,
              help="msa through scaled_dot_product_attention; strided msa/cse compute only the pixels they keep.")
@click.option("--meta-nets/--no-meta-nets", default=False, show_default=True,
              help="Build training networks on the meta device (no memory or initialisation; the GHN supplies "
                   "every parameter).")
@threads_option
def train(out_dir, data, steps, meta_batch, batch_size, lr, weight_decay, warmup, clip, seed, device,
          save_every, log_every, eval_every, val_nets, val_images, resume, init, precision, channels_last, fast_ops,
          meta_nets) -> None:
    """Train a GHN-2 on CIFAR-10 over random DeepNets-like architectures.

    Runs on CPU, one GPU (--device cuda), or several processes with torchrun
    (e.g. `torchrun --nproc-per-node 2 -m ghn_onnx.cli train ...`). A resumed run refuses a
    different --seed, --batch-size or --meta-batch; other changes are recorded in trainer.json."""
    import torch

    from ghn_onnx.training.run import train as run_train
    from ghn_onnx.training.trainer import TrainConfig, resolve_precision

    cfg = TrainConfig(steps=steps, meta_batch=meta_batch, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      warmup_steps=warmup, grad_clip=clip, seed=seed, save_every=save_every, log_every=log_every,
                      eval_every=eval_every,
                      precision=precision, channels_last=channels_last, fast_ops=fast_ops, meta_nets=meta_nets)
    try:
        resolve_precision(precision, torch.device(device))
        run_train(out_dir, data, cfg, resume=resume, device=_check_device(device), val_nets=val_nets,
                  val_images=val_images, init=init)
    except GhnOnnxError as exc:
        raise InputError(str(exc)) from None


# -- bench ---------------------------------------------------------------------------------------

def _int_list(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise InputError(f"--sizes: expected comma-separated integers >= 1 (got {value!r})")
    return sizes


def _sections(value: str) -> tuple[str, ...]:
    from ghn_onnx.benchmarks.suite import SECTIONS

    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in SECTIONS]
    if not names or unknown:
        raise InputError(f"--sections: expected names from {','.join(SECTIONS)} (got {value!r})")
    return names


@main.command(epilog=EXIT_CODES_HELP + " A section that fails is reported in the table and gives exit code 1.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the GHN runs; cuda adds the Triton kernel timings.")
@click.option("--repeats", type=click.IntRange(min=1), default=15, show_default=True,
              help="Timed rounds of the latency forward; file to file runs repeats//3, throughput and "
                   "training repeats//5 (at least 1). Medians; each round runs fast and reference in turn.")
@click.option("--sizes", default="1,8,64,512", show_default=True,
              help="Throughput batch sizes (generated networks), comma-separated.")
@click.option("--distinct", type=click.IntRange(min=1), default=64, show_default=True,
              help="Architectures exported for the throughput batches (~0.5-1.5 s each); bigger batches "
                   "re-use them at re-sampled widths.")
@click.option("--reference-cap", type=float, default=60.0, show_default=True,
              help="Seconds: skip the sequential reference at a batch size where one call is estimated to "
                   "take longer (reported as 'not run').")
@click.option("--meta-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Networks per training step.")
@click.option("--train-batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per training step.")
@click.option("--sections", default="latency,throughput,train,kernels", show_default=True,
              help="Which sections to run, comma-separated (kernels runs on cuda only).")
@click.option("--model", "latency_model", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Time this ONNX file in the latency section instead of the CIFAR ResNet-50.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated networks and GHN.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write every figure, the machine and versions as JSON.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table with machine, versions, date and command as Markdown.")
@threads_option
def bench(device, repeats, sizes, distinct, reference_cap, meta_batch, train_batch_size, sections, latency_model,
          seed, threads, json_path, markdown_path) -> None:
    """Time parameter prediction: each fast path against the sequential reference, in one run.

    Sections: latency (CIFAR ResNet-50: GHN forward with the graph prebuilt, file to file, and the
    bound bytes written / copy bandwidth), throughput (batches of generated networks: networks/s
    and parameters/s), train (one training step and the GHN's forward + backward) and, on cuda,
    the Triton kernels. Progress goes to stderr; the table is printed last.
    """
    import shlex

    from ghn_onnx.benchmarks.report import format_table, to_markdown
    from ghn_onnx.benchmarks.suite import BenchConfig, BenchError, run_benchmarks

    cfg = BenchConfig(device=_check_device(device), repeats=repeats, sizes=_int_list(sizes), distinct=distinct,
                      reference_cap_s=reference_cap, meta_batch=meta_batch, train_batch_size=train_batch_size,
                      sections=_sections(sections), latency_model=str(latency_model) if latency_model else None,
                      seed=seed, threads=threads)
    # Every option spelled out, so the recorded command reproduces the run whatever the defaults become.
    command = shlex.join(
        ["ghn-onnx", "bench", "--device", device, "--repeats", str(repeats), "--sizes", ",".join(map(str, cfg.sizes)),
         "--distinct", str(distinct), "--reference-cap", f"{reference_cap:g}", "--meta-batch", str(meta_batch),
         "--train-batch-size", str(train_batch_size), "--sections", ",".join(cfg.sections), "--seed", str(seed)]
        + ["--threads", str(threads)] + (["--model", str(latency_model)] if latency_model else []))
    try:
        results = run_benchmarks(cfg, command=command, log=lambda m: click.echo(m, err=True))
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    except GhnOnnxError as exc:
        raise _user_error(exc) from None
    for path, text in ((json_path, lambda: json.dumps(results, indent=2)), (markdown_path, lambda: to_markdown(results))):
        if path is not None:
            try:
                path.write_text(text())
            except OSError as exc:
                raise click.ClickException(f"{path}: cannot write ({exc.strerror or exc})") from None
    click.echo(format_table(results))
    if results["errors"]:
        raise click.ClickException(f"failed sections: {', '.join(results['errors'])} (see the table)")


# -- eval ----------------------------------------------------------------------------------------

def _eval_steps(value: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        steps = (0,)
    if any(s < 1 for s in steps):
        raise InputError(f"--sgd-steps: expected comma-separated step counts >= 1 (got {value!r})")
    return steps


def _eval_models(value: str) -> tuple[str, ...]:
    """A comma-separated list of names (models, OOD splits); ``none``: the empty list."""
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    return () if names == ("none",) else names


# -- eval --finetune-bench (the fine-tuning benchmark, ghn_onnx/training/finetune.py) --------------

def _bench_list(option: str, value: str, parse: Callable = str) -> tuple:
    try:
        items = tuple(parse(v.strip()) for v in value.split(",") if v.strip())
    except ValueError:
        items = ()
    if not items:
        raise InputError(f"{option}: expected a comma-separated list (got {value!r})")
    return items


def _finetune_bench_options(command: Callable) -> Callable:
    """``eval --finetune-bench``: the fine-tuning benchmark instead of the sections above; it
    shares --checkpoint, --data, --out, --json, --plot, --test-images, --seed, --device, --threads
    and --quiet with them."""
    options = [
        click.option("--finetune-bench", is_flag=True,
                     help="Run the fine-tuning benchmark instead: every init x optimiser on the bench nets, lr "
                          "chosen on the validation split, curves on test (the sections above are skipped)."),
        click.option("--bench-generated", type=click.IntRange(min=0), default=8, show_default=True,
                     help="Fine-tuning benchmark: N held-out ID generated architectures."),
        click.option("--bench-generated-from", type=click.IntRange(min=0), default=0, show_default=True,
                     metavar="INDEX", help="Fine-tuning benchmark: index of the first held-out architecture "
                                           "(a long benchmark split into runs)."),
        click.option("--bench-models", default="resnet18,mobilenet_v2,efficientnet_b0", show_default=True,
                     help="Fine-tuning benchmark: torchvision models, 32x32 variants ('none': skip)."),
        click.option("--bench-inits", default="default,lsuv,ghn,ghn-ft", show_default=True,
                     help="Fine-tuning benchmark: inits (default, lsuv, ghn, ghn-ft[:noise=X,ortho=F,seed=S]), "
                          "separated by ';' when an init has options, else by ','."),
        click.option("--bench-optimizers", default="sgd,adamw", show_default=True,
                     help="Fine-tuning benchmark: optimiser recipes (sgd: GHN-2's; adamw)."),
        click.option("--bench-steps", default="100,300,1000", show_default=True,
                     help="Fine-tuning benchmark: step counts at which the curves are measured."),
        click.option("--bench-select-steps", type=click.IntRange(min=1), default=100, show_default=True,
                     help="Fine-tuning benchmark: steps of each learning-rate trial on the validation split."),
        click.option("--bench-lr-sgd", default="0.05,0.025,0.01,0.005", show_default=True,
                     help="Fine-tuning benchmark: SGD learning-rate grid."),
        click.option("--bench-lr-adamw", default="0.003,0.001,0.0003,0.0001", show_default=True,
                     help="Fine-tuning benchmark: AdamW learning-rate grid."),
        click.option("--bench-val-images", type=click.IntRange(1, 5000), default=1000, show_default=True,
                     help="Fine-tuning benchmark: random validation images the learning rate is chosen on."),
    ]

    @functools.wraps(command)
    def run(*args, finetune_bench, bench_generated, bench_generated_from, bench_models, bench_inits, bench_optimizers,
            bench_steps, bench_select_steps, bench_lr_sgd, bench_lr_adamw, bench_val_images, **kwargs):
        if not finetune_bench:
            return command(*args, **kwargs)
        from ghn_onnx.training.datasets import load_cifar10
        from ghn_onnx.training.eval_plot import plot_finetune
        from ghn_onnx.training.eval_suite import checkpoint_source, write_json
        from ghn_onnx.training.finetune import FinetuneConfig, finetune_benchmark, format_finetune

        k = kwargs
        inits = tuple(s.strip() for s in bench_inits.split(";" if ";" in bench_inits else ",")
                                                  if s.strip())
        if not inits:
            raise InputError(f"--bench-inits: expected a list of inits (got {bench_inits!r})")
        try:
            cfg = FinetuneConfig(
                generated=bench_generated, generated_from=bench_generated_from,
                torchvision=_eval_models(bench_models), inits=inits,
                optimizers=_bench_list("--bench-optimizers", bench_optimizers),
                steps=_bench_list("--bench-steps", bench_steps, int), select_steps=bench_select_steps,
                lr_grid={"sgd": _bench_list("--bench-lr-sgd", bench_lr_sgd, float),
                         "adamw": _bench_list("--bench-lr-adamw", bench_lr_adamw, float)},
                val_images=bench_val_images, test_images=k["test_images"], seed=k["seed"],
                device=_check_device(k["device"]))
            ghn, ckpt = _load_ghn(k["checkpoint"], cfg.device)
            source = checkpoint_source(ckpt)  # now: the file may be replaced during a run of hours
            splits = load_cifar10(k["data"])
            import torch

            threads = torch.get_num_threads()
            if k["threads"]:
                torch.set_num_threads(k["threads"])
            try:
                result = finetune_benchmark(ghn, splits, cfg, log=(lambda m: None) if k["quiet"]
                                            else (lambda m: click.echo(m, err=True)))
            finally:
                torch.set_num_threads(threads)
            result["meta"].update(source)
        except GhnOnnxError as exc:
            raise _user_error(exc) from None
        for path, write in ((k["out_path"], write_json), (k["plot_path"], plot_finetune)):
            if path is not None:
                try:
                    write(result, path)
                except GhnOnnxError as exc:
                    raise click.ClickException(str(exc)) from None
                except OSError as exc:
                    raise click.ClickException(f"{path}: cannot write ({exc.strerror or exc})") from None
                click.echo(f"wrote {path}", err=True)
        click.echo(json.dumps(result, indent=2) if k["as_json"] else format_finetune(result))

    for option in reversed(options):
        run = option(run)
    return run


@main.command("eval", epilog=EXIT_CODES_HELP)
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="NAME|FILE",
              help=CHECKPOINT_HELP)
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="CIFAR-10: image folder / .zip (train/<class>/*.jpg) or cifar-10-batches-py. Default: download.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the whole result (every figure with its images, nets and seed) as JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON result instead of the text summary.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw accuracy vs SGD steps, random init vs GHN init, to this PNG (needs matplotlib).")
@click.option("--test-images", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Random CIFAR-10 test images (seeded, random order; 10000 = all).")
@click.option("--id-nets", type=click.IntRange(min=0), default=50, show_default=True,
              help="Held-out in-distribution architectures (200 available).")
@click.option("--ood-nets", type=click.IntRange(min=0), default=10, show_default=True,
              help="Architectures per OOD split: wide, deep, dense, bnfree (50 available each).")
@click.option("--ood-splits", default="wide,deep,dense,bnfree", show_default=True,
              help="The OOD splits to evaluate, comma-separated (the full sets take hours on a CPU: "
                   "one process per split, each with its own --out, spreads them over cores).")
@click.option("--sgd-steps", default="100,500", show_default=True,
              help="Steps at which every training curve is measured, comma-separated.")
@click.option("--finetune-steps", type=click.IntRange(min=1), default=500, show_default=True,
              help="Training budget for GHN init vs random init on generated architectures.")
@click.option("--finetune-archs", type=click.IntRange(min=0), default=3, show_default=True,
              help="Generated ID architectures trained from both inits (0: none).")
@click.option("--torchvision", "tv_models", default="resnet18,resnet50,mobilenet_v2", show_default=True,
              help="torchvision models (32x32 variants) to predict and evaluate in both BN modes ('none': skip).")
@click.option("--sgd-torchvision", default="resnet18", show_default=True,
              help="torchvision models trained with SGD from random init ('none': skip; resnet50 is slow on CPU).")
@click.option("--finetune-torchvision", default="none", show_default=True,
              help="torchvision models also trained from the GHN's prediction (slow on CPU).")
@click.option("--sgd-batch-size", type=click.IntRange(min=2), default=64, show_default=True,
              help="Images per SGD step.")
@calibration_images_option
@click.option("--batch-size", type=click.IntRange(min=2), default=64, show_default=True,
              help="Test batch size: batch-statistics BN uses the statistics of each batch.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the test and calibration subsets, initialisations and SGD batches.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the GHN, generated nets and SGD run (onnxruntime runs on CPU).")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
@threads_option
@_finetune_bench_options
def eval_command(checkpoint, data, out_path, as_json, plot_path, test_images, id_nets, ood_nets, ood_splits, sgd_steps,
                 finetune_steps, finetune_archs, tv_models, sgd_torchvision, finetune_torchvision,
                 sgd_batch_size, calibration_images, batch_size, seed, device, threads, quiet) -> None:
    """Evaluate a GHN checkpoint on CIFAR-10 against random-init and SGD baselines.

    \b
    1. Held-out generated architectures (ID, and OOD wide/deep/dense/bnfree), BN on
       batch statistics at batch 64 as in GHN-2: mean ± standard error, every net's value.
    2. torchvision models for 32x32, predicted through ONNX as `predict` does, in
       onnxruntime with BN on batch statistics and calibrated; random init in both modes.
    3. SGD curves from random init and from the GHN's prediction, same batches and budget.

    Every figure carries the images, networks and seed that produced it. Progress goes to
    stderr, the summary (or --json) to stdout. --out is rewritten after each split and model
    (`"complete": false` in its meta until the end), so an interrupted run keeps what it measured.
    """
    from ghn_onnx.training.datasets import load_cifar10
    from ghn_onnx.training.eval_plot import plot_curves
    from ghn_onnx.training.eval_suite import EvalConfig, checkpoint_source, evaluate, format_summary, write_json

    try:
        cfg = EvalConfig(test_images=test_images, id_nets=id_nets, ood_nets=ood_nets,
                         ood_splits=_eval_models(ood_splits),
                         sgd_steps=_eval_steps(sgd_steps), finetune_steps=finetune_steps,
                         finetune_archs=finetune_archs, torchvision=_eval_models(tv_models),
                         sgd_torchvision=_eval_models(sgd_torchvision),
                         finetune_torchvision=_eval_models(finetune_torchvision),
                         sgd_batch_size=sgd_batch_size, calibration_images=calibration_images,
                         batch_size=batch_size, seed=seed, device=_check_device(device), threads=threads)
        ghn, ckpt = _load_ghn(checkpoint, cfg.device)
        splits = load_cifar10(data)
        def write(result: dict) -> None:
            try:
                write_json(result, out_path)
            except OSError as exc:
                raise click.ClickException(f"{out_path}: cannot write ({exc.strerror or exc})") from None

        result = evaluate(ghn, splits, cfg, source=checkpoint_source(ckpt),
                          log=(lambda m: None) if quiet else (lambda m: click.echo(m, err=True)),
                          on_section=write if out_path is not None else None)
    except GhnOnnxError as exc:
        raise _user_error(exc) from None
    if out_path is not None:
        write(result)
        click.echo(f"wrote {out_path}", err=True)
    if plot_path is not None:
        try:
            plot_curves(result, plot_path)
        except GhnOnnxError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            raise click.ClickException(f"{plot_path}: cannot write ({exc.strerror or exc})") from None
        click.echo(f"wrote {plot_path}", err=True)
    click.echo(json.dumps(result, indent=2) if as_json else format_summary(result))


def console() -> None:
    """The ``ghn-onnx`` executable: :func:`main`, then an exit that skips the interpreter's
    teardown.

    Why: once a command has finished (outputs written, fsynced and renamed), tearing down
    torch's and numba's modules is all that is left, and it took ~0.25 s of a 2 s one-file
    ``ghn-onnx predict`` (bench/RESULTS.md). The exit handlers still run (logging, temporary
    folders, worker pools) and the standard streams are flushed; with other threads still
    running that the interpreter would wait for (not daemons such as tqdm's monitor), or a
    stream that cannot be flushed, the exit is the interpreter's own.
    """
    import atexit
    import os
    import sys
    import threading

    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    waited_for = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if not isinstance(code, int) or waited_for:
        sys.exit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)  # a closed pipe: the interpreter reports it as it always does
    atexit._run_exitfuncs()  # what Py_Finalize would run first; the module teardown is skipped
    os._exit(code)


if __name__ == "__main__":
    console()
