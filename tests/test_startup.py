"""Start-up and threads (issue 15): ``ghn-onnx --help`` and ``inspect`` load neither torch, numba
nor onnxruntime (checked in a fresh interpreter's ``sys.modules``, not timed), and ``--threads`` /
:mod:`ghn_onnx.threads` give torch, numba and onnxruntime one count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ghn_onnx import threads as threads_mod
from ghn_onnx.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "frameworks" / "torch_cnn.onnx"
HEAVY = ("torch", "numba", "onnxruntime")

# Runs the CLI in this interpreter, then prints which heavy libraries it loaded (stdout's last line).
PROBE = """
import json, sys
from ghn_onnx.cli import main
try:
    main(sys.argv[1:], prog_name="ghn-onnx")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print(json.dumps({"code": code, "loaded": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def probe(*args: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **(env or {})}, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["predict", "--help"], ["inspect", str(FIXTURE)],
                                  ["inspect", str(FIXTURE), "--json"]], ids=" ".join)
def test_help_and_inspect_load_no_torch_numba_or_onnxruntime(args):
    result = probe(*args)
    assert result == {"code": 0, "loaded": []}


def test_predict_loads_torch_but_not_onnxruntime_without_calibration(tmp_path):
    result = probe("predict", str(FIXTURE), "-o", str(tmp_path / "out.onnx"), "--threads", "1")
    assert result["code"] == 0
    assert "torch" in result["loaded"] and "onnxruntime" not in result["loaded"]


def test_default_is_the_usable_cpus_or_omp_num_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads_mod.default_threads() == len(os.sched_getaffinity(0)) == threads_mod.usable_cpus()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_mod.default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert threads_mod.default_threads() == threads_mod.usable_cpus()


def test_default_follows_the_affinity_mask():
    """A process restricted to one CPU (as ``taskset -c 0`` does) defaults to one thread."""
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from ghn_onnx.threads import default_threads; print(default_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "1", out.stderr


def test_set_threads_before_the_libraries_load_reaches_them():
    """``calibrate`` sets the count before torch or numba is imported (it needs neither): they
    start with it."""
    code = ("from ghn_onnx.threads import set_threads; set_threads(1); import torch, numba; "
            "print(torch.get_num_threads(), numba.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.split() == ["1", "1"], out.stderr


@pytest.fixture
def restore_threads():
    import numba
    import torch

    before = torch.get_num_threads(), numba.get_num_threads(), threads_mod._configured
    yield
    torch.set_num_threads(before[0])
    numba.set_num_threads(before[1])
    threads_mod._configured = before[2]


def test_threads_option_sets_torch_numba_and_sessions_for_the_command(tmp_path, restore_threads, monkeypatch):
    import numba
    import torch

    from ghn_onnx import pipeline

    seen = {}
    real = pipeline.predict_files

    def spy(*args, **kwargs):
        opts = threads_mod.session_options()
        seen.update(torch=torch.get_num_threads(), numba=numba.get_num_threads(),
                    intra=opts.intra_op_num_threads, inter=opts.inter_op_num_threads)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "predict_files", spy)
    torch.set_num_threads(2)
    before = torch.get_num_threads(), numba.get_num_threads()
    result = CliRunner().invoke(main, ["predict", str(FIXTURE), "-o", str(tmp_path / "o.onnx"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert seen == {"torch": 1, "numba": 1, "intra": 1, "inter": 1}
    assert (torch.get_num_threads(), numba.get_num_threads()) == before  # restored after the command
    assert threads_mod.session_options(threads=2).intra_op_num_threads == 2  # an explicit count wins


def test_every_computing_command_takes_threads():
    for command in ("predict", "calibrate", "explain", "eval", "bench", "train"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert "--threads N" in result.output, command


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_bad_thread_counts_are_one_line_usage_errors(value):
    result = CliRunner().invoke(main, ["predict", str(FIXTURE), "-o", "x.onnx", "--threads", value])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "--threads" in result.output


def test_set_threads_refuses_bad_counts():
    from ghn_onnx.errors import GhnOnnxError

    for bad in (0, -2, 1.5, True):
        with pytest.raises(GhnOnnxError, match="threads"):
            threads_mod.set_threads(bad)


def test_no_session_is_built_outside_the_helper():
    """Every onnxruntime session of the package goes through :func:`inference_session` (one
    place for threads, spinning, logging)."""
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "ghn_onnx").rglob("*.py")
                 if p.name != "threads.py" and ("InferenceSession(" in p.read_text() or "SessionOptions(" in p.read_text())]
    assert offenders == []


def _console(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The executable's entry point (``ghn_onnx.cli:console``), in a fresh interpreter."""
    return subprocess.run([sys.executable, "-c", "from ghn_onnx.cli import console; console()", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_the_console_exit_keeps_codes_streams_and_outputs(tmp_path):
    """The console entry skips the interpreter's teardown: exit codes, flushed output (a pipe is
    block-buffered) and the written file are what the in-process CLI gives."""
    inspect = CliRunner().invoke(main, ["inspect", str(FIXTURE), "--json"])
    got = _console("inspect", str(FIXTURE), "--json")
    assert got.returncode == 0 and got.stdout == inspect.output
    bad = _console("predict", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "out.onnx"))
    assert bad.returncode == 2 and bad.stderr.strip().startswith("Error:") and len(bad.stderr.splitlines()) == 1
    ok = _console("predict", str(FIXTURE), "-o", str(tmp_path / "out.onnx"), "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)[0]["output"] == str(tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").stat().st_size > 0 and not list(tmp_path.glob(".out.onnx.*"))
    usage = _console("predict", "--no-such-option")
    assert usage.returncode == 2 and "Error:" in usage.stderr
