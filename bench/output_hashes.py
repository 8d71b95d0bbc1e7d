"""Hash what the tool produces on every fixture, to prove a refactoring changed no behaviour.

For each ONNX fixture (tests/fixtures/frameworks, the GHN-2 and GHN-3 parity folders of the shared
data) it runs the installed CLI in-process: ``ghn-onnx predict`` with the shipped checkpoint (the
output file's bytes), ``--unfold-bn`` on the folded exports, ``inspect --json`` (the report), and
records a SHA-256 of each. It also hashes the GHN's raw predictions on the parity graphs with the
reference GHN-2 weights, and the key structure (not the timings) of a one-round ``ghn-onnx bench``.
Run it before and after a change and diff the two JSON files:

    python bench/output_hashes.py --out /tmp/before.json
    ... change ...
    python bench/output_hashes.py --out /tmp/after.json && diff /tmp/before.json /tmp/after.json
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import click
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def fixtures(shared: Path) -> list[Path]:
    found = sorted((ROOT / "tests" / "fixtures" / "frameworks").glob("*.onnx"))
    for sub in ("ghn2-parity", "ghn3-parity"):
        found += sorted((shared / "reference" / sub).glob("*.onnx"))
    return found


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shape_of(obj):
    """Keys and types of a JSON value, values dropped (bench timings vary run to run)."""
    if isinstance(obj, dict):
        return {k: shape_of(v) for k, v in sorted(obj.items())}
    if isinstance(obj, list):
        return [shape_of(obj[0])] if obj else []
    return type(obj).__name__


def cli(args: list[str]) -> tuple[int, str]:
    from ghn_onnx.cli import main

    res = CliRunner().invoke(main, args, catch_exceptions=True)
    return res.exit_code, res.output


def raw_predictions(shared: Path) -> dict[str, str]:
    import numpy as np
    import torch

    from ghn_onnx.convert import convert_file
    from ghn_onnx.ghn import checkpoint

    ghn = checkpoint.load_reference(shared / "reference" / "ghn2-parity" / "ghn2_random_cifar10.npz")
    out = {}
    for path in sorted((shared / "reference" / "ghn2-parity").glob("*.onnx")):
        graph = convert_file(path)
        with torch.no_grad():
            for seq in (False, True):
                pred = ghn([graph], sequential=seq)[0]
                blob = b"".join(k.encode() + np.ascontiguousarray(v.numpy()).tobytes() for k, v in sorted(pred.items()))
                out[f"{path.stem}:{'sequential' if seq else 'fast'}"] = sha(blob)
    return out


@click.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--bench/--no-bench", default=True, help="Also record the key structure of a one-round bench.")
def run(out: Path, bench: bool) -> None:
    shared = Path(os.environ.get("GHN_ONNX_SHARED", ROOT.parent / "shared"))
    record: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in fixtures(shared):
            name = f"{path.parent.name}/{path.name}"
            code, text = cli(["inspect", str(path), "--json"])
            record[f"{name}:inspect"] = [code, sha(text.encode())]
            dst = Path(tmp) / path.name
            code, text = cli(["predict", str(path), "-o", str(dst), "--json"])
            summary = json.loads(text) if code == 0 else text
            for s in summary if code == 0 else []:
                s.pop("seconds", None)
                s.pop("output", None)
            record[f"{name}:predict"] = [code, sha(dst.read_bytes()) if dst.exists() else None,
                                         sha(json.dumps(summary, sort_keys=True).encode())]
            for extra in Path(tmp).iterdir():
                extra.unlink()
            if "folded" in path.name or "dynamo" in path.name:
                code, text = cli(["predict", str(path), "-o", str(dst), "--unfold-bn", "--json"])
                record[f"{name}:unfold"] = [code, sha(dst.read_bytes()) if dst.exists() else None]
                for extra in Path(tmp).iterdir():
                    extra.unlink()
            print(name, record[f"{name}:predict"][:2], file=sys.stderr)
        record["raw"] = raw_predictions(shared)
        if bench:
            js = Path(tmp) / "bench.json"
            code, _ = cli(["bench", "--repeats", "1", "--sizes", "1", "--distinct", "2", "--sections",
                           "latency,throughput", "--json", str(js)])
            record["bench"] = [code, shape_of(json.loads(js.read_text())) if js.exists() else None]
    out.write_text(json.dumps(record, indent=1, sort_keys=True))


if __name__ == "__main__":
    run()
