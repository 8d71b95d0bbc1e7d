"""Many files (``ghn-onnx predict IN... -O DIR``): inputs given as files, folders or globs, predicted
in GHN batches bounded by a memory budget, optionally by several worker processes, one status per
file.

* **Inputs** (:func:`expand_inputs`): a file as is; a folder, every ``*.onnx`` file under it,
  recursively, its relative path kept under ``-O``; a glob (``'models/**/*.onnx'``, quoted so the
  tool expands it: shells that do not, and Windows, pass it through) the files it matches, their
  paths kept relative to the pattern's first wildcard-free folder. Files inside the output folder
  are left out, so that a second run over ``models/ -O models/ghn`` does not read its own outputs.
* **Batches** (:func:`batches`): consecutive inputs whose declared elements (file size / 4, a
  float32 upper bound) fit :func:`~ghn_onnx.onnx_io.loading.element_budget` divided by the
  workers; each batch goes through :func:`~ghn_onnx.pipeline.predict_files`, i.e. through the GHN
  together (split further by :data:`~ghn_onnx.pipeline.MAX_NODES_PER_CALL`).
* **Workers** (``jobs > 1``): processes, not threads. Converting a graph is Python and onnx's
  parser and serialiser hold the GIL, so threads ran no faster than one (``bench/RESULTS.md``,
  :mod:`ghn_onnx.benchmarks.many_files`). Each worker loads the GHN itself and runs with
  ``threads // jobs`` threads (at least 1). They start from a fork server by default (a clean
  process that imports the package once): a process forked from one that has run an OpenMP
  region (any multi-threaded torch op) hangs in its first one (GNU libgomp is not fork-safe).
  ``ghn-onnx predict`` has run no op when it starts its workers, so it forks them directly
  (``start_method="fork"``) and they share its imports, and numba's registries built just before
  the fork, instead of paying for them again.
* **Errors**: a file that cannot be read, converted, calibrated or written is reported
  (:class:`FileResult` with its one-line error) and the others go on.
"""

from __future__ import annotations

import glob
import math
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ghn_onnx.errors import GhnOnnxError, OutputError


@dataclass(frozen=True)
class FileResult:
    """One input's outcome. ``summary``: :meth:`~ghn_onnx.pipeline.Prediction.summary` when it
    was written; ``error``: the one-line error otherwise, ``output_error`` when only its output
    could not be written (exit code 1 rather than 2)."""

    input: str
    output: str
    summary: dict | None = None
    error: str | None = None
    output_error: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        """``predict --json``'s entry: the summary's fields, or ``name``/``output``/``error``."""
        head = {"input": self.input, "status": "ok" if self.ok else "error"}
        if self.ok:
            return {**head, **(self.summary or {})}
        return {**head, "name": Path(self.input).name, "output": self.output, "error": self.error}


# -- inputs --------------------------------------------------------------------------------------

def expand_inputs(args: Sequence[str | os.PathLike], exclude: str | os.PathLike | None = None
                  ) -> list[tuple[Path, Path]]:
    """``(input, output path relative to the output folder)`` for each file named by ``args``
    (files, folders, globs; see the module docstring), in the order given, folders and globs
    sorted, each input once. ``exclude``: a folder whose files are left out (the output folder).

    Raises:
        GhnOnnxError: a folder with no ``.onnx`` file, a glob that matches no file.
    """
    skip = Path(exclude).resolve() if exclude is not None else None
    seen: set[Path] = set()
    out: list[tuple[Path, Path]] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = [(p, p.relative_to(path)) for p in sorted(path.rglob("*.onnx")) if p.is_file()]
            what = f"{path}: no .onnx file in the folder (or under it)"
        elif not path.exists() and glob.has_magic(str(arg)):
            root = _fixed_prefix(str(arg))
            found = [(p, p.relative_to(root) if p.is_relative_to(root) else Path(p.name))
                     for p in map(Path, sorted(glob.glob(str(arg), recursive=True))) if p.is_file()]
            what = f"{arg}: the pattern matches no file"
        else:  # a file (or a missing one: predict_files reports it)
            found = [(path, Path(path.name))]
            what = ""
        if skip is not None:
            found = [(p, r) for p, r in found if not p.resolve().is_relative_to(skip)]
        if not found:
            raise GhnOnnxError(what)
        for p, rel in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                out.append((p, rel))
    return out


def _fixed_prefix(pattern: str) -> Path:
    """The folder a glob's paths are relative to: its leading components without wildcards."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


# -- batches -------------------------------------------------------------------------------------

def batches(inputs: Sequence[str | os.PathLike], jobs: int = 1, budget: int | None = None,
            max_files: int | None = None) -> list[list[int]]:
    """Consecutive input indices, each group's estimated elements (file size / 4) within
    ``budget / jobs`` (default :func:`~ghn_onnx.onnx_io.loading.element_budget`) and at most
    ``max_files`` files (default: enough groups for four per worker, at most 16 files each, so
    the workers stay busy and the progress bar moves). With several workers a group also holds
    at most a quarter of a worker's share of all the elements: folders are sorted by name, not
    by size, and a run of large files in one group kept one worker busy for seconds after the
    other had finished (50 generated exports, the wide ones last: 3.4 s alone at the end). A
    file over the budget is a group alone (its own load refuses it if it cannot fit)."""
    from ghn_onnx.onnx_io.loading import element_budget

    jobs = max(jobs, 1)
    share = (element_budget() if budget is None else budget) // jobs
    if max_files is None:
        max_files = max(1, min(16, math.ceil(len(inputs) / (4 * jobs))))
    sizes = [_declared_elements(src) for src in inputs]
    if jobs > 1:
        share = min(share, max(1, sum(sizes) // (4 * jobs)))
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, elements in enumerate(sizes):
        if current and (total + elements > share or len(current) >= max_files):
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += elements
    if current:
        groups.append(current)
    return groups


def _declared_elements(path: str | os.PathLike) -> int:
    """A file's elements as batching estimates them (size / 4, a float32 upper bound); 0 for a
    file that cannot be read (its own load reports it)."""
    try:
        return os.stat(path).st_size // 4
    except OSError:
        return 0


# -- prediction ----------------------------------------------------------------------------------

def _predict_group(pairs: Sequence[tuple[str, str]], ghn, options) -> list[FileResult]:
    """One batch through :func:`~ghn_onnx.pipeline.predict_files`, a result per input."""
    from ghn_onnx.pipeline import predict_files

    failed: dict[str, GhnOnnxError] = {}
    try:
        preds = predict_files([s for s, _ in pairs], [d for _, d in pairs], ghn, options,
                              on_error=lambda src, exc: failed.setdefault(str(src), exc), return_models=False)
    except GhnOnnxError as exc:  # the batch as a whole (the GHN, the options): every file fails
        return [FileResult(s, d, error=str(exc), output_error=isinstance(exc, OutputError)) for s, d in pairs]
    done = {p.output: p.summary() for p in preds}
    results = []
    for src, dst in pairs:
        if str(dst) in done:
            results.append(FileResult(src, dst, summary=done[str(dst)]))
        else:
            exc = failed.get(src)
            results.append(FileResult(src, dst, error=str(exc) if exc else f"{src}: not written",
                                      output_error=isinstance(exc, OutputError)))
    return results


_worker: dict = {}  # a worker process's GHN and options (set by _init_worker)


def _load_numba_registries() -> None:
    """Build numba's typing and lowering registries now, in the process the workers fork from.

    Why: a worker's first prediction spent ~0.3 s of its ~0.5 s start-up importing and
    installing them (the first load of a cached compiled loop does it), once per worker. Building
    them is plain Python and starts no threads, so forked workers inherit them. Loading the
    compiled loops themselves here would be faster still, but it starts numba's OpenMP layer,
    and a process forked after that aborts in its first parallel loop ("fork() called from a
    process already using GNU OpenMP"). Only an optimisation: a numba without this internal API
    leaves each worker to build them itself."""
    try:
        from numba.core.registry import cpu_target

        cpu_target.typing_context.refresh()
        cpu_target.target_context.refresh()
    except Exception:  # noqa: BLE001 - an internal API; the workers then build them as before
        pass


def _init_worker(checkpoint: str, device: str, threads: int, fields: dict) -> None:
    from ghn_onnx.pipeline import PredictOptions, load_ghn
    from ghn_onnx.threads import set_threads

    set_threads(threads)
    options = PredictOptions(**fields)
    try:
        _worker["ghn"] = load_ghn(checkpoint, device)
    except GhnOnnxError as exc:  # every batch of this worker reports it
        _worker["error"] = exc
    _worker["options"] = options


def _worker_group(pairs: list[tuple[str, str]]) -> list[FileResult]:
    if "error" in _worker:
        exc = _worker["error"]
        return [FileResult(s, d, error=str(exc)) for s, d in pairs]
    return _predict_group(pairs, _worker["ghn"], _worker["options"])


def _fields(options) -> dict:
    """``options`` as keyword arguments that pickle (a spawned worker gets them through a pipe)."""
    import dataclasses

    fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    return {**fields, "metadata": dict(fields["metadata"])}


def predict_many(inputs: Sequence[str | os.PathLike], outputs: Sequence[str | os.PathLike], checkpoint: str | os.PathLike,
                 options=None, *, jobs: int = 1, ghn=None, budget: int | None = None,
                 progress: Callable[[int], None] = lambda n: None, start_method: str | None = None
                 ) -> list[FileResult]:
    """Predict ``inputs`` into ``outputs`` (one each, all different) in batches (:func:`batches`),
    with ``jobs`` worker processes; a :class:`FileResult` per input, in input order.

    Args:
        checkpoint: the GHN's file (:func:`~ghn_onnx.pipeline.resolve_checkpoint`); each worker
            loads it.
        options: a :class:`~ghn_onnx.pipeline.PredictOptions` (its ``device`` is the workers').
        ghn: with ``jobs == 1``, the GHN already loaded from ``checkpoint`` (else it is loaded here).
        budget: elements per batch across the workers (default
            :func:`~ghn_onnx.onnx_io.loading.element_budget`).
        progress: called with the number of files each finished batch held.
        start_method: how workers start (:mod:`multiprocessing`); default ``forkserver`` where
            there is one, else ``spawn``. ``fork`` only from a process that has run no
            multi-threaded torch or numba op yet.

    Raises:
        GhnOnnxError: inputs and outputs that do not pair up, two inputs with one output, a bad
            ``jobs``; errors of single files are in their results.
    """
    from ghn_onnx.pipeline import PredictOptions
    from ghn_onnx.threads import configured_threads

    options = options or PredictOptions()
    if not isinstance(jobs, int) or jobs < 1:
        raise GhnOnnxError(f"jobs: expected an integer >= 1 (got {jobs!r})")
    if len(inputs) != len(outputs):
        raise GhnOnnxError(f"expected one output per input (got {len(inputs)} inputs, {len(outputs)} outputs)")
    resolved = [Path(o).resolve() for o in outputs]
    if len(set(resolved)) != len(resolved):
        raise GhnOnnxError("two inputs would be written to the same output file")
    pairs = [(str(s), str(d)) for s, d in zip(inputs, outputs)]
    groups = [[pairs[i] for i in g] for g in batches([s for s, _ in pairs], jobs, budget)]
    jobs = min(jobs, len(groups)) or 1
    results: list[FileResult] = []
    if jobs == 1:
        if ghn is None:
            from ghn_onnx.pipeline import load_ghn

            ghn = load_ghn(checkpoint, options.device or "cpu")
        for group in groups:
            results.extend(_predict_group(group, ghn, options))
            progress(len(group))
        return results
    methods = multiprocessing.get_all_start_methods()
    method = start_method or ("forkserver" if "forkserver" in methods else "spawn")
    threads = max(1, configured_threads() // jobs)
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["ghn_onnx.pipeline"])  # imported once, in the server
    elif method == "fork":
        _load_numba_registries()
    # Largest groups first (each to the next free worker), so that no large one starts last.
    order = sorted(range(len(groups)), key=lambda g: -sum(_declared_elements(s) for s, _ in groups[g]))
    done: dict[int, list[FileResult]] = {}
    with context.Pool(
            jobs, initializer=_init_worker, initargs=(str(checkpoint), options.device or "cpu", threads, _fields(options))
    ) as pool:
        for g, group_results in pool.imap_unordered(_indexed_group, [(g, groups[g]) for g in order]):
            done[g] = group_results
            progress(len(group_results))
    return [r for g in range(len(groups)) for r in done[g]]


def _indexed_group(item: tuple[int, list[tuple[str, str]]]) -> tuple[int, list[FileResult]]:
    return item[0], _worker_group(item[1])
