"""Run fuzz cases, each in a process of its own, with a timeout and an address-space cap.

    python tests/fuzz/runner.py CASES.json RESULTS.json ROOT

This process imports the CLI and what its commands load (torch, onnx, numba: ~6 s on a busy
2-core machine) once, then **forks** a child per case, so a case costs only its own work. A child
sets ``RLIMIT_AS`` (:data:`HEADROOM` above what the imports already map: torch alone maps ~3.6 GB
of address space), moves into the case's folder, points stdin at ``/dev/null`` and stdout /
stderr at files, and calls ``ghn_onnx.cli.main`` as the console script does; an uncaught
exception is printed as the interpreter would (a traceback, exit 1). A child still running at
its deadline is killed with its process group (a hang). Cases marked ``fresh`` run in a new
interpreter instead (``python -m ghn_onnx.cli``, limit set in ``preexec_fn``), so import-time
behaviour is covered too.

For each case the result records the exit code (or the signal), the time, stdout and stderr,
and fingerprints of every entry in the case folder before and after the run (sha256 of regular
files, the mode / device of anything else, never opening it), so the test can tell hangs,
crashes, tracebacks, multi-line errors, wrong exit codes, modified inputs and partial outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import stat
import subprocess
import sys
import time
import traceback
from pathlib import Path

HEADROOM = 4 << 30  # bytes of address space a case may add to what the imports map
MAX_HASHED = 64 << 20  # bigger files (sparse test files) are fingerprinted by size and mtime
MAX_OUTPUT = 20_000  # characters of stdout / stderr kept


def address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def fingerprint(path: Path) -> str:
    """What ``path`` is, without opening anything that is not a regular file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "absent"
    if stat.S_ISLNK(st.st_mode):
        return f"link:{os.readlink(path)}"
    if not stat.S_ISREG(st.st_mode):
        return f"mode:{stat.S_IFMT(st.st_mode):o}:rdev:{st.st_rdev}:ino:{st.st_ino}"
    if st.st_size > MAX_HASHED:
        return f"big:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (not following links) → :func:`fingerprint`."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if not p.is_dir() or p.is_symlink():
                out[str(p.relative_to(folder))] = fingerprint(p)
    return out


def _child(case: dict, folder: Path, limit: int, out_path: Path, err_path: Path) -> None:
    """In the forked child: never returns."""
    code = 1
    try:
        os.setpgid(0, 0)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        os.chdir(folder)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, out_path), (2, err_path)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        from ghn_onnx.cli import main

        sys.argv = ["ghn-onnx", *case["args"]]
        try:
            main(args=case["args"], prog_name="ghn-onnx")
            code = 0
        except SystemExit as exc:  # as the interpreter turns it into an exit status
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - an uncaught exception: what the interpreter prints
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def run_forked(case: dict, folder: Path, limit: int, log: Path) -> dict:
    out_path, err_path = log / f"{case['name']}.out", log / f"{case['name']}.err"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(case, folder, limit, out_path, err_path)
    deadline = time.monotonic() + case["timeout"]
    status, timed_out = None, False
    while status is None:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
        elif time.monotonic() > deadline:
            timed_out = True
            for target in (-pid, pid):
                try:
                    os.kill(target, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _, status = os.waitpid(pid, 0)
        else:
            time.sleep(0.01)
    return {"timed_out": timed_out,
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) and not timed_out else None,
            "stdout": _read(out_path), "stderr": _read(err_path)}


def run_fresh(case: dict, folder: Path, limit: int) -> dict:
    def limit_memory() -> None:
        os.setpgid(0, 0)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(Path(__file__).resolve().parents[2]),
                                                                   os.environ.get("PYTHONPATH", "")] if p)}
    proc = subprocess.Popen([sys.executable, "-m", "ghn_onnx.cli", *case["args"]], cwd=folder, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=limit_memory)
    try:
        out, err = proc.communicate(timeout=case["timeout"])
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    code = proc.returncode
    return {"timed_out": timed_out, "exit": code if code is not None and code >= 0 else None,
            "signal": -code if code is not None and code < 0 and not timed_out else None,
            "stdout": out.decode(errors="replace")[-MAX_OUTPUT:], "stderr": err.decode(errors="replace")[-MAX_OUTPUT:]}


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")[-MAX_OUTPUT:]
    except OSError:
        return ""


def main(cases_path: str, results_path: str, root: str) -> None:
    cases = json.loads(Path(cases_path).read_text())
    root_dir = Path(root)
    log = root_dir / ".log"
    log.mkdir(exist_ok=True)
    # What a command imports, imported once here: the children inherit it.
    import ghn_onnx.cli  # noqa: F401
    import ghn_onnx.ghn.checkpoint  # noqa: F401
    import ghn_onnx.pipeline  # noqa: F401
    import ghn_onnx.report.inspection  # noqa: F401
    import onnxruntime  # noqa: F401
    import tqdm  # noqa: F401

    limit = address_space() + HEADROOM
    results = []
    for case in cases:
        folder = root_dir / case["cwd"]
        before = snapshot(folder)
        t0 = time.monotonic()
        result = run_fresh(case, folder, limit) if case["fresh"] else run_forked(case, folder, limit, log)
        result.update(name=case["name"], seconds=round(time.monotonic() - t0, 3), before=before,
                      after=snapshot(folder), limit=limit)
        results.append(result)
        Path(results_path).write_text(json.dumps(results))  # as it goes: a killed runner still tells
    Path(results_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:4])
