"""Many files (issue 15): folders and globs as ``predict`` inputs with their relative paths kept
under ``-O``, batches bounded by an element budget, ``--jobs`` worker processes that write the
same bytes as one process, and a bad file reported (per-file status in ``--json``, exit 2) while
the others go on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ghn_onnx.cli import main
from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.many_files import batches, expand_inputs, predict_many

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "frameworks"
NAMES = ["torch_cnn.onnx", "keras_cnn.onnx", "flax_cnn.onnx"]


@pytest.fixture
def tree(tmp_path):
    """in/a/{torch,keras}_cnn.onnx, in/b/c/flax_cnn.onnx, in/b/notes.txt, in/b/bad.onnx (not a model)."""
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    (root / "b" / "c").mkdir(parents=True)
    shutil.copy(FIXTURES / NAMES[0], root / "a" / NAMES[0])
    shutil.copy(FIXTURES / NAMES[1], root / "a" / NAMES[1])
    shutil.copy(FIXTURES / NAMES[2], root / "b" / "c" / NAMES[2])
    (root / "b" / "notes.txt").write_text("not an onnx file")
    (root / "b" / "bad.onnx").write_bytes(b"not a model")
    return root


def rel(pairs, root):
    return [(str(p.relative_to(root)), str(r)) for p, r in pairs]


def test_a_folder_is_every_onnx_file_under_it_with_its_relative_path(tree):
    assert rel(expand_inputs([tree]), tree) == [("a/keras_cnn.onnx", "a/keras_cnn.onnx"),
                                                ("a/torch_cnn.onnx", "a/torch_cnn.onnx"),
                                                ("b/bad.onnx", "b/bad.onnx"),
                                                ("b/c/flax_cnn.onnx", "b/c/flax_cnn.onnx")]


def test_a_glob_is_expanded_relative_to_its_fixed_folder(tree):
    pairs = expand_inputs([str(tree / "**" / "*_cnn.onnx")])
    assert rel(pairs, tree) == [("a/keras_cnn.onnx", "a/keras_cnn.onnx"), ("a/torch_cnn.onnx", "a/torch_cnn.onnx"),
                                ("b/c/flax_cnn.onnx", "b/c/flax_cnn.onnx")]
    assert rel(expand_inputs([str(tree / "a" / "t*.onnx")]), tree) == [("a/torch_cnn.onnx", "torch_cnn.onnx")]


def test_files_keep_their_name_inputs_come_once_and_the_output_folder_is_left_out(tree):
    file = tree / "a" / "torch_cnn.onnx"
    pairs = expand_inputs([file, tree / "a", file])
    assert rel(pairs, tree) == [("a/torch_cnn.onnx", "torch_cnn.onnx"), ("a/keras_cnn.onnx", "keras_cnn.onnx")]
    assert rel(expand_inputs([tree], exclude=tree / "b"), tree) == [("a/keras_cnn.onnx", "a/keras_cnn.onnx"),
                                                                      ("a/torch_cnn.onnx", "a/torch_cnn.onnx")]


def test_empty_folders_and_globs_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(GhnOnnxError, match="no .onnx file"):
        expand_inputs([tmp_path / "empty"])
    with pytest.raises(GhnOnnxError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.onnx")])


def test_batches_fit_the_budget_and_the_file_cap(tmp_path):
    files = []
    for i, size in enumerate([400, 400, 400, 4000, 40]):  # elements: size / 4
        f = tmp_path / f"{i}.onnx"
        f.write_bytes(b"x" * size)
        files.append(f)
    assert batches(files, jobs=1, budget=250, max_files=10) == [[0, 1], [2], [3], [4]]
    # 250 each, and with two workers a quarter of a worker's half of the 1,310 elements: 163
    assert batches(files, jobs=2, budget=500, max_files=10) == [[0], [1], [2], [3], [4]]
    assert batches(files, jobs=1, budget=10**9, max_files=2) == [[0, 1], [2, 3], [4]]
    assert batches(files, jobs=1, budget=10**9) == [[0, 1], [2, 3], [4]]  # about 4 groups per worker
    assert batches(files, jobs=2, budget=10**9) == [[0], [1], [2], [3], [4]]


def test_batches_for_several_workers_split_a_run_of_large_files(tmp_path):
    """Folders are sorted by name: large files in one group would keep one worker busy alone."""
    files = []
    for i, size in enumerate([40, 40, 40, 40, 4000, 4000, 4000]):
        f = tmp_path / f"{i}.onnx"
        f.write_bytes(b"x" * size)
        files.append(f)
    assert batches(files, jobs=1, budget=10**9, max_files=10) == [[0, 1, 2, 3, 4, 5, 6]]
    assert batches(files, jobs=2, budget=10**9, max_files=10) == [[0, 1, 2, 3], [4], [5], [6]]


def test_predict_many_in_tiny_batches_matches_one_batch(tree, tmp_path):
    from ghn_onnx.pipeline import PredictOptions, load_ghn, resolve_checkpoint

    srcs = [p for p, _ in expand_inputs([tree / "a", tree / "b" / "c"])]
    ckpt = resolve_checkpoint(None)
    ghn, options = load_ghn(ckpt), PredictOptions()
    outs = {}
    for budget in (1, None):
        dsts = [tmp_path / f"out{budget}" / f"{i}.onnx" for i in range(len(srcs))]
        dsts[0].parent.mkdir()
        seen = []
        results = predict_many(srcs, dsts, ckpt, options, ghn=ghn, budget=budget, progress=seen.append)
        assert all(r.ok for r in results) and sum(seen) == len(srcs)
        outs[budget] = [d.read_bytes() for d in dsts]
        if budget == 1:
            assert seen == [1, 1, 1]  # every file over the budget: a batch of its own
    assert outs[1] == outs[None]


def run_cli(*args: str, threads: int = 1) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    return subprocess.run([sys.executable, "-m", "ghn_onnx.cli", "predict", *args, "--threads", str(threads)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_folder_with_a_bad_file_mirrors_the_others_reports_it_and_exits_2(tree, tmp_path):
    """Also ``--jobs 2`` (processes, one thread each) writes the bytes one process writes."""
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    r1 = run_cli(str(tree), "-O", str(out1), "--json")
    r2 = run_cli(str(tree), "-O", str(out2), "--json", "--jobs", "2", threads=2)
    for r in (r1, r2):
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error: ")]
        assert len(errors) == 1 and "bad.onnx: not a readable ONNX model" in errors[0]
        status = json.loads(r.stdout)
        assert [(Path(s["input"]).name, s["status"]) for s in status] == [
            ("keras_cnn.onnx", "ok"), ("torch_cnn.onnx", "ok"), ("bad.onnx", "error"), ("flax_cnn.onnx", "ok")]
        assert "not a readable ONNX model" in status[2]["error"]
    written = sorted(str(p.relative_to(out1)) for p in out1.rglob("*.onnx"))
    assert written == ["a/keras_cnn.onnx", "a/torch_cnn.onnx", "b/c/flax_cnn.onnx"]
    assert [(out1 / w).read_bytes() for w in written] == [(out2 / w).read_bytes() for w in written]


def test_workers_fork_after_numba_registries_but_before_its_threads(tree, tmp_path):
    """``predict --jobs`` builds numba's registries before forking (the workers' start-up) but must
    not start numba's OpenMP layer: numba aborts every parallel loop of a process forked after
    that ("fork() called from a process already using GNU OpenMP")."""
    code = ("from ghn_onnx.many_files import _load_numba_registries; _load_numba_registries(); "
            "import numba.np.ufunc.parallel as p; from numba.core.registry import cpu_target; "
            "print(p._is_initialized, len(cpu_target.target_context._registries) > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.stdout.split() == ["False", "True"], out.stderr
    r = run_cli(str(tree / "a"), "-O", str(tmp_path / "o"), "--json", "--jobs", "2", threads=4)
    assert r.returncode == 0 and "fork()" not in r.stderr, r.stderr
    assert [s["status"] for s in json.loads(r.stdout)] == ["ok", "ok"]


def test_o_takes_one_file_and_a_pattern_matching_none_is_an_error(tree, tmp_path):
    res = CliRunner().invoke(main, ["predict", str(tree / "a"), "-o", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert "-o takes one input (got 2 files)" in res.output
    res = CliRunner().invoke(main, ["predict", str(tree / "*.nothing"), "-O", str(tmp_path / "o")])
    assert res.exit_code == 2 and "matches no file" in res.output and res.output.count("\n") == 1
    res = CliRunner().invoke(main, ["predict", str(tree / "a" / "t*.onnx"), "-o", str(tmp_path / "t.onnx")])
    assert res.exit_code == 0, res.output  # a pattern for one file is fine with -o
    assert (tmp_path / "t.onnx").is_file()


def test_a_second_run_into_a_folder_inside_the_input_reads_no_outputs(tree):
    out = tree / "a" / "ghn"
    for _ in range(2):
        res = CliRunner().invoke(main, ["predict", str(tree / "a"), "-O", str(out), "--json"])
        assert res.exit_code == 0, res.output
        assert len(json.loads(res.output)) == 2


def test_library_workers_start_from_a_fork_server_after_torch_has_run(tree, tmp_path):
    """This process has run torch ops (forking it would hang OpenMP); the default start method
    does not fork it, and the workers write what one process writes at their thread count
    (torch splits a GEMM's work by its thread count, so the last bits depend on it: at one thread
    each, --jobs 2 writes the bytes of --jobs 1)."""
    import torch

    from ghn_onnx.pipeline import PredictOptions, resolve_checkpoint
    from ghn_onnx.threads import using_threads

    torch.ones(64, 64) @ torch.ones(64, 64)
    srcs = [tree / "a" / n for n in NAMES[:2]]
    ckpt, options = resolve_checkpoint(None), PredictOptions()
    outs = {}
    with using_threads(1):
        for jobs in (1, 2, "2 again"):
            dsts = [tmp_path / f"j{jobs}" / n for n in NAMES[:2]]
            dsts[0].parent.mkdir()
            results = predict_many(srcs, dsts, ckpt, options, jobs=2 if jobs == "2 again" else jobs)
            assert [r.ok for r in results] == [True, True]
            outs[jobs] = [d.read_bytes() for d in dsts]
    assert outs[1] == outs[2] == outs["2 again"]
