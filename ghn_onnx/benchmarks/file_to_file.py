"""File to file: what predicting a model's parameters costs next to copying its bytes (issue 15).

    python -m ghn_onnx.benchmarks.file_to_file [--model F.onnx] [--repeats 15] [--files 4] [--no-processes] [--json F]

One model (default: the CIFAR ResNet-50 of ``ghn-onnx bench``, 94 MB of parameters), the shipped
checkpoint (what ``ghn-onnx predict`` runs), one run; within a part the cases run in turn, round
after round (so background load hits all of them), after one warm-up call each, and each figure
is the median over the rounds.

* **In-process** (``repeats`` rounds): :func:`~ghn_onnx.pipeline.predict_files` as it writes
  (the predicted tensors spliced into the serialised rest, :mod:`ghn_onnx.writeback.raw`), with
  ``return_models=False`` (as ``ghn-onnx predict``) and with the models returned (the default),
  and with ``reserialize=True`` (the whole model serialised: the route before); the plain copy of the
  same bytes (read the file, write it to another), without and with ``fsync`` (every output is
  fsynced before its rename, for durability); and the stages of the spliced route: load (the
  large tensors left in the file, :mod:`ghn_onnx.onnx_io.deferred`), prepare (untie aliases,
  convert), GHN forward, :func:`~ghn_onnx.writeback.write.predicted_model`, ``read_kept`` (the
  deferred tensors the GHN does not predict, read from the file),
  :func:`~ghn_onnx.writeback.write.save_predicted` (which also fills the returned model, timed
  alone as ``fill``).
* **Per process** (``repeats // 3`` rounds): ``ghn-onnx predict`` in a new interpreter over one
  file and over ``files`` copies of it (``-O DIR``). The marginal cost of a file,
  ``(T(files) - T(1)) / (files - 1)``, is what one more file costs once the process has paid for
  its imports, the checkpoint and numba's cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from ghn_onnx.benchmarks.suite import export_cifar_resnet50


def copy_file(src: Path, dst: Path, durable: bool = False) -> None:
    """The plain copy the prediction is measured against: read the whole file, write it."""
    data = src.read_bytes()
    with open(dst, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())


def _stages(path: Path, out: Path, ghn) -> dict[str, float]:
    """The spliced route of ``predict_files``, stage by stage (seconds)."""
    from ghn_onnx.onnx_io.loading import open_model
    from ghn_onnx.pipeline import predict_graphs, prepare
    from ghn_onnx.writeback.write import predicted_model, resolve_shared, save_predicted

    times, t0 = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        times[name], t0 = now - t0, now

    model, data_files, source = open_model(path)
    lap("load")
    model, graph = prepare(model, path.name, ghn.config.rules, validated=True)
    lap("prepare")
    pred = predict_graphs(ghn, [graph])[0]
    lap("ghn")
    owners = resolve_shared(graph)
    pred = {k: v for k, v in pred.items() if k in owners}
    held = predicted_model(model, graph, pred, metadata={"bn": "uncalibrated"})
    lap("predicted_model")
    if source is not None:
        source.fill(held.model)
    lap("read_kept")
    save_predicted(held, out, source_path=path, source_data_files=data_files)
    lap("save_predicted")
    again = predicted_model(model, graph, pred, metadata={"bn": "uncalibrated"})
    t0 = time.perf_counter()
    again.fill()
    lap("fill")
    return times


def _rounds(cases: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Each case once as warm-up, then ``rounds`` rounds of each in turn: seconds of every call."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def bench_file_to_file(model: str | os.PathLike | None = None, repeats: int = 15, files: int = 4,
                       per_process: bool = True, log: Callable[[str], None] = lambda m: None) -> dict:
    """The figures described in the module docstring, in seconds, with the load average before and
    after each part (a JSON-friendly dict); ``per_process=False`` leaves the processes out."""
    from ghn_onnx.pipeline import load_ghn, predict_files

    if per_process and files < 2:
        raise ValueError(f"Expected files >= 2 (got {files})")
    ghn = load_ghn()
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "torch_threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(), "repeats": repeats, "files": files}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if model is None:
            log("exporting the CIFAR ResNet-50")
            path = export_cifar_resnet50(tmp / "resnet50.onnx")
        else:
            path = Path(model)
        result.update(model=path.name, bytes=path.stat().st_size)
        out = tmp / "out.onnx"
        stage_times: list[dict[str, float]] = []

        def stages() -> None:
            stage_times.append(_stages(path, out, ghn))

        cases = {
            "spliced": lambda: predict_files([path], [out], ghn, return_models=False),
            "spliced_with_models": lambda: predict_files([path], [out], ghn),
            "reserialized": lambda: predict_files([path], [out], ghn, reserialize=True),
            "copy": lambda: copy_file(path, tmp / "copy.onnx"),
            "copy_fsync": lambda: copy_file(path, tmp / "copy.onnx", durable=True),
            "stages": stages,
        }
        load_before = os.getloadavg()[0]
        log(f"in-process: {repeats} rounds of {', '.join(cases)}")
        times = _rounds(cases, repeats)
        stage_times = stage_times[1:]  # the warm-up's
        result["in_process"] = {
            **{f"{k}_s": statistics.median(v) for k, v in times.items() if k != "stages"},
            "stages_s": {k: statistics.median(s[k] for s in stage_times) for k in stage_times[0]},
            "load_average": [load_before, os.getloadavg()[0]],
        }
        if per_process:
            result["process"] = _per_process(path, tmp, files, max(1, repeats // 3), log)
    ip = result["in_process"]
    result["ratios"] = {
        "spliced_over_copy": ip["spliced_s"] / ip["copy_s"],
        "spliced_over_copy_fsync": ip["spliced_s"] / ip["copy_fsync_s"],
        "spliced_with_models_over_copy": ip["spliced_with_models_s"] / ip["copy_s"],
        "spliced_with_models_over_copy_fsync": ip["spliced_with_models_s"] / ip["copy_fsync_s"],
        "reserialized_over_copy": ip["reserialized_s"] / ip["copy_s"],
        "reserialized_over_copy_fsync": ip["reserialized_s"] / ip["copy_fsync_s"],
        "reserialized_over_spliced": ip["reserialized_s"] / ip["spliced_s"],
    }
    if per_process:
        marginal = result["process"]["marginal_per_file_s"]
        result["ratios"].update(marginal_over_copy=marginal / ip["copy_s"],
                                marginal_over_copy_fsync=marginal / ip["copy_fsync_s"])
    return result


def _per_process(path: Path, tmp: Path, files: int, rounds: int, log: Callable[[str], None]) -> dict:
    inputs = tmp / "inputs"
    inputs.mkdir()
    copies = [inputs / f"m{i}.onnx" for i in range(files)]
    for c in copies:
        shutil.copyfile(path, c)
    outdir = tmp / "outputs"

    def run(models: list[Path]) -> None:
        cmd = [sys.executable, "-m", "ghn_onnx.cli", "predict", *map(str, models), "-O", str(outdir)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-500:]}")

    load_before = os.getloadavg()[0]
    log(f"per process: {rounds} rounds of ghn-onnx predict over 1 and {files} files")
    times = _rounds({"one": lambda: run(copies[:1]), "many": lambda: run(copies)}, rounds)
    one, many = statistics.median(times["one"]), statistics.median(times["many"])
    return {"one_file_s": one, f"{files}_files_s": many, "marginal_per_file_s": (many - one) / (files - 1),
            "rounds": rounds, "load_average": [load_before, os.getloadavg()[0]]}


def format_result(r: dict) -> str:
    """A Markdown table of :func:`bench_file_to_file`'s result."""
    ip, pp, ratio = r["in_process"], r.get("process"), r["ratios"]
    ms = lambda s: f"{s * 1e3:.0f}"  # noqa: E731
    stages = ", ".join(f"{k} {ms(v)}" for k, v in ip["stages_s"].items())
    loads = f"load average {ip['load_average'][0]:.1f} -> {ip['load_average'][1]:.1f} (in-process)"
    if pp:
        loads += f", {pp['load_average'][0]:.1f} -> {pp['load_average'][1]:.1f} (per process)"
    lines = [
        f"{r['model']} ({r['bytes'] / 1e6:.0f} MB), {r['date']}, {r['cpus']} CPUs, torch threads {r['torch_threads']}, "
        + loads,
        "",
        "| case | ms | / copy | / copy + fsync |",
        "|---|---|---|---|",
        f"| predict_files, spliced, return_models=False (as `ghn-onnx predict`) | {ms(ip['spliced_s'])} "
        f"| {ratio['spliced_over_copy']:.2f}x | {ratio['spliced_over_copy_fsync']:.2f}x |",
        f"| predict_files, spliced, models returned (the default) | {ms(ip['spliced_with_models_s'])} "
        f"| {ratio['spliced_with_models_over_copy']:.2f}x | {ratio['spliced_with_models_over_copy_fsync']:.2f}x |",
        f"| predict_files, reserialize=True (the route before) | {ms(ip['reserialized_s'])} "
        f"| {ratio['reserialized_over_copy']:.2f}x | {ratio['reserialized_over_copy_fsync']:.2f}x |",
        f"| plain copy (read + write) | {ms(ip['copy_s'])} | 1 | |",
        f"| plain copy + fsync | {ms(ip['copy_fsync_s'])} | | 1 |",
    ]
    if pp:
        lines += [
            f"| `ghn-onnx predict`, marginal per file ({r['files']} files vs 1, {pp['rounds']} rounds) "
            f"| {ms(pp['marginal_per_file_s'])} | {ratio['marginal_over_copy']:.2f}x "
            f"| {ratio['marginal_over_copy_fsync']:.2f}x |",
            f"| `ghn-onnx predict`, 1 file / {r['files']} files (whole process) | {ms(pp['one_file_s'])} / "
            f"{ms(pp[str(r['files']) + '_files_s'])} | | |",
        ]
    lines += ["", f"Stages of the spliced route (ms, medians): {stages}. Medians of {r['repeats']} interleaved "
              "rounds in-process."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an ONNX file (default: the CIFAR ResNet-50, exported)")
    parser.add_argument("--repeats", type=int, default=15, help="in-process rounds; per process: a third (default: 15)")
    parser.add_argument("--files", type=int, default=4, help="files of the many-file process (default: 4)")
    parser.add_argument("--no-processes", action="store_true", help="in-process figures only")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    result = bench_file_to_file(args.model, args.repeats, args.files, per_process=not args.no_processes,
                                log=lambda m: print(m, file=sys.stderr))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(format_result(result))


if __name__ == "__main__":
    main()
