"""Hostile input through the CLI: no hang, no crash, no traceback, one error line, the documented
exit code, inputs untouched, no partial output, no pickle executed.

The corpus (``tests/fuzz/corpus.py``): every hand-written hostile case plus ``MUTATIONS`` seeded
mutations of the committed fixtures. The runner (``tests/fuzz/runner.py``) runs each case in a
process of its own with a timeout and an address-space cap. Bounded: about two minutes on a
busy 2-core machine (corpus ~15 s, ~100 s of runs), most of it the ``predict`` cases.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from fuzz.corpus import Case, hostile_cases, mutation_cases

RUNNER = Path(__file__).resolve().parent / "fuzz" / "runner.py"
SEED = 20261202
MUTATIONS = 240
# Cases also run in a fresh interpreter (import-time warnings, the real entry point).
FRESH = ("self-loop-predict", "ref-pt-evil-pickle", "out-directory")
FAILURES = ("hang", "crash", "traceback", "multi-line error", "wrong exit code", "modified input",
            "partial output", "pickle executed")


def classify(case: Case, r: dict) -> list[str]:
    """What went wrong in one run (an empty list: nothing), in the terms of :data:`FAILURES`."""
    if r["timed_out"]:
        return [f"hang (killed after {case.timeout:.0f} s)"]
    problems = []
    if r["signal"] is not None:
        problems.append(f"crash (signal {r['signal']})")
    if "Traceback" in r["stderr"]:
        problems.append("traceback")
    code = r["exit"]
    if code not in case.expect:
        problems.append(f"wrong exit code ({code}, expected {' or '.join(map(str, sorted(case.expect)))})")
    lines = [ln for ln in r["stderr"].splitlines() if ln.strip() and not ln.startswith("write:")]
    if code not in (0, None) and not (len(lines) == 1 and lines[0].startswith("Error: ")):
        problems.append(f"multi-line error ({len(lines)} lines on stderr)")
    outputs = {case.output} if case.output else set()
    before, after = r["before"], r["after"]
    changed = sorted(k for k, v in before.items() if k not in outputs and after.get(k) != v)
    if changed:
        problems.append(f"modified input ({', '.join(changed)})")
    new = sorted(k for k in after if k not in before)
    allowed = (outputs if code == 0 else set()) | set(case.written)
    stray = [k for k in new if k not in allowed and not _data_file_of(k, allowed)]
    if stray:
        problems.append(f"partial output ({', '.join(stray)})")
    for name in case.written:
        if not _complete(Path(r["folder"]) / name):
            problems.append(f"partial output ({name} missing or incomplete)")
    if case.output and code != 0 and after.get(case.output, "absent") != before.get(case.output, "absent"):
        problems.append(f"partial output ({case.output} changed by a failed run)")
    if case.output and code == 0 and not _complete(Path(r["folder"]) / case.output):
        problems.append(f"partial output ({case.output} is not a complete file)")
    if case.marker and case.marker in after:
        problems.append("pickle executed")
    return problems


def _data_file_of(name: str, outputs: set[str]) -> bool:
    return any(name.startswith(o + ".") and name.endswith(".data") for o in outputs)


def _complete(path: Path) -> bool:
    if path.suffix == ".safetensors":
        from ghn_onnx.ghn import checkpoint

        checkpoint.load(path)
        return True
    try:
        onnx.load(str(path), load_external_data=False)
        return True
    except Exception:  # noqa: BLE001 - any failure to parse is a partial file
        return False


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory) -> tuple[list[Case], list[dict]]:
    root = tmp_path_factory.mktemp("fuzz")
    cases = hostile_cases(root) + mutation_cases(root, MUTATIONS, seed=SEED)
    by_name = {c.name: c for c in cases}
    for name in FRESH:
        c = by_name[name]
        cases.append(Case(f"{name}-fresh", c.args, c.expect, c.inputs, c.output, c.marker, fresh=True,
                          timeout=90, folder=c.cwd, written=c.written))
    assert len(by_name) == len(cases) - len(FRESH), "case names must be unique"
    (root / "cases.json").write_text(json.dumps([c.to_json() for c in cases]))
    results_path = root / "results.json"
    proc = subprocess.run([sys.executable, str(RUNNER), str(root / "cases.json"), str(results_path), str(root)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(results_path.read_text())
    for r in results:
        r["folder"] = str(root / next(c.cwd for c in cases if c.name == r["name"]))
    return cases, results


def test_every_case_ran(fuzz_run):
    cases, results = fuzz_run
    assert [r["name"] for r in results] == [c.name for c in cases]


def test_no_hang_crash_traceback_or_damage(fuzz_run):
    cases, results = fuzz_run
    report = []
    for case, r in zip(cases, results):
        problems = classify(case, r)
        if problems:
            err = r["stderr"].strip().splitlines()
            report.append(f"{case.name}: {'; '.join(problems)}\n    $ ghn-onnx {' '.join(case.args)}\n    "
                          + "\n    ".join(err[-6:]))
    assert not report, f"{len(report)} of {len(cases)} cases failed:\n" + "\n".join(report)


def test_fuzz_is_bounded(fuzz_run):
    """~100 s of runs on a busy 2-core machine, twice that beside another test run: the bound
    catches a case that became slow (each also has its own timeout), not a slow machine."""
    cases, results = fuzz_run
    total = sum(r["seconds"] for r in results)
    slowest = max(results, key=lambda r: r["seconds"])
    assert total < 480, f"the fuzz run took {total:.0f} s (slowest: {slowest['name']}, {slowest['seconds']:.0f} s)"


def test_refusals_say_why(fuzz_run):
    """A few cases, with the message they must give (the rest is checked by kind above); a tuple
    lists the wordings of either reference loader."""
    cases, results = fuzz_run
    by_name = {r["name"]: r["stderr"] for r in results}
    expected = {
        "self-loop-inspect": "reads its own output 'y'",
        "cycle-3-inspect": "cycle of 3 nodes",
        "duplicate-output-inspect": "tensor 'y' is produced by two nodes",
        "gemm-2^31x2^31-predict": "declares shape (2147483648, 2147483648)",
        "bad-utf8-op-type-inspect": "op_type = b'\\xffigmoid' is not valid UTF-8 text",
        "constant-shape-vs-data-inspect": "declares shape (2, 5) (10 values) but holds",
        "fifo-model": "is a FIFO, not a regular file",
        "dev-zero-link": "is a character device, not a regular file",
        "sparse-3gib": "bytes, more than",
        "out-link-dev-null": "is a character device (through a symbolic link), not a regular file",
        "out-hard-link": "refusing to overwrite the input model's files",
        "out-sys": "cannot write",
        "outdir-proc": "cannot create the output folder",
        "out-directory": "is a directory",
        "ckpt-hid-huge": "GHN config hid: expected an integer in [4, 1024] (got 10000000)",
        "ckpt-max-shape-string": "GHN config max_shape",
        "ckpt-shapes-over-file": "keys do not match",
        "ref-npz-object-pickle": "holds Python objects (a pickle): refused",
        "ref-npz-is-torch-zip": "not an .npz of arrays",
        "ref-pt-evil-pickle": ("not a loadable PyTorch checkpoint", "refused (nothing was run)"),
        "ref-pt-state-not-dict": "expected a state dict of named tensors",
        "ref-npz-bomb": ("decoder.fc.0.weight has shape (1000000, 1000000)", "declares 4,000,000,000,000 bytes"),
        "ext-outside": "points outside the model's folder",
        "node-without-outputs-inspect": "has no outputs",
        "batch-one-bad": "bad.onnx: not a readable ONNX model",
    }
    wrong = {k: by_name.get(k, "(not run)").strip() for k, v in expected.items()
             if not any(text in by_name.get(k, "") for text in ((v,) if isinstance(v, str) else v))}
    assert not wrong, "\n".join(f"{k}: expected {expected[k]!r} in {v!r}" for k, v in wrong.items())
