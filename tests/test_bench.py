"""``ghn-onnx bench`` end to end with tiny settings, and the pieces a GPU run relies on.

The end-to-end run takes a small committed model for the latency section (``--model``), one
generated network (seed 10 draws a 4-cell network first) and meta-batch 1, so it runs in seconds;
the figures themselves mean nothing here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ghn_onnx.benchmarks.report import Row, format_table, rows, to_markdown
from ghn_onnx.benchmarks.suite import sequential_message_passing
from ghn_onnx.benchmarks.timing import compare
from ghn_onnx.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "frameworks"


def test_bench_cli_smoke(tmp_path):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    args = ["bench", "--repeats", "1", "--sizes", "1", "--distinct", "1", "--seed", "10", "--meta-batch", "1",
            "--train-batch-size", "4", "--threads", "1", "--model", str(FIXTURES / "keras_cnn.onnx"),
            "--json", str(out_json), "--markdown", str(out_md)]
    threads = torch.get_num_threads()
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    results = json.loads(out_json.read_text())
    assert results["errors"] == {} and results["machine"]["torch_threads"] == 1
    assert torch.get_num_threads() == threads  # restored
    assert {"machine", "versions", "date", "command"} <= set(results)
    assert results["kernels"] == {"skipped": "Triton kernels need a CUDA device and Triton"}  # CPU
    lat = results["latency"]
    assert lat["ghn_forward"]["fast_s"] > 0 and lat["ghn_forward"]["reference_s"] > 0
    assert lat["file_to_file"]["reference_runs"] == 1 and lat["bound_s"] > 0
    size1 = results["throughput"]["sizes"]["1"]
    assert size1["networks"] == 1 and size1["params"] > 0 and size1["reference_s"] > 0
    train = results["train"]
    assert train["train_step"]["reference_s"] > 0 and train["ghn_forward_backward"]["fast_s"] > 0
    last = res.stdout.strip().splitlines()
    assert last[0].split()[:5] == ["case", "unit", "fast", "reference", "speedup"]  # the table comes last
    assert any(line.startswith("throughput 1 nets") for line in last)
    md = out_md.read_text()
    assert "ghn-onnx bench --device cpu --repeats 1" in md and "| keras_cnn GHN forward | ms |" in md


@pytest.mark.parametrize("args, message", [
    (["--sizes", "1,x"], "--sizes"),
    (["--sizes", "0"], "--sizes"),
    (["--sections", "latency,gpu"], "--sections"),
    (["--threads", "0"], "--threads"),
    (["--sections", "latency", "--model", "no_such_model.onnx"], "no_such_model.onnx"),
])
def test_bench_cli_rejects_bad_options(args, message):
    res = CliRunner().invoke(main, ["bench", *args])
    assert res.exit_code == 2 and message in res.output


def test_reference_cap_skips_by_estimate_and_keeps_one_slow_run():
    calls = {"fast": 0, "reference": 0}

    def fast():
        calls["fast"] += 1

    def slow():
        calls["reference"] += 1
        time.sleep(0.02)

    def sync():
        pass

    r = compare(fast, slow, rounds=3, sync=sync, cap_s=1.0, estimate_s=5.0)
    assert r["reference_s"] is None and "not run" in r["note"] and calls["reference"] == 0
    r = compare(fast, slow, rounds=3, sync=sync, cap_s=0.01)  # the warm-up call is over the cap
    assert r["reference_runs"] == 1 and r["reference_s"] >= 0.02 and calls["reference"] == 1
    r = compare(fast, slow, rounds=3, sync=sync, variants={"other": fast})
    assert r["reference_runs"] == 3 and calls["reference"] == 1 + 1 + 3
    assert calls["fast"] == 3 * (1 + 3) + (1 + 3) and r["other_s"] >= 0


def test_sequential_switch_is_the_same_maths_and_is_undone():
    from ghn_onnx.convert import convert_file
    from ghn_onnx.ghn import GHN, GHNConfig

    torch.manual_seed(0)
    ghn = GHN(GHNConfig())
    batch = ghn.batch([convert_file(FIXTURES / "keras_cnn.onnx"), convert_file(FIXTURES / "flax_cnn.onnx")])
    level = ghn.node_states(batch)  # autograd on: the level sweep
    with sequential_message_passing(ghn):
        seq = ghn.node_states(batch)
        seq.sum().backward()  # differentiable
    assert "forward" not in vars(ghn.gnn)
    torch.testing.assert_close(seq, level, rtol=1e-5, atol=1e-5)
    assert ghn.gnn.gru.weight_hh.grad is not None


def test_cuda_tables_render_from_kernel_results():
    """The rows a CUDA run adds (no GPU needed): kernel figures as bench_kernels returns them."""
    run = {"fast_s": 0.001, "reference_s": 0.1, "rounds": 3, "reference_runs": 3, "note": ""}
    forward = {**run, "flat_decode_s": 0.0005}
    results = {
        "device": "cuda:0", "date": "2026-01-01 00:00 UTC", "command": "ghn-onnx bench --device cuda",
        "machine": {"cpu": "x", "cpu_count": 16, "cpus_usable": 16, "torch_threads": 16, "gpu": "H100", "cuda": "13.0",
                    "load_average_at_start": 0.1},
        "versions": {"python": "3.11", "torch": "2.x"},
        "config": {"repeats": 15, "reference_cap_s": 60.0, "seed": 0}, "rounds": {"latency": 15},
        "errors": {"train": "RuntimeError: boom"},
        "latency": {"model": "resnet50", "nodes": 161, "params": 23_500_000, "bound_s": 0.0001,
                    "copy_bandwidth_GBps": 3000.0, "ghn_forward": forward,
                    "file_to_file": run},
        "kernels": {"graphs_from": "deepnets fixtures", "graphs": ["a"] * 8,
                    "message_passing": {"sequential_s": 2.0, "levels_s": 0.3, "numba_s": None, "triton_s": 0.002,
                                        "triton_per_level_s": 0.004},
                    "decode": {"torch_s": 0.05, "triton_s": 0.001, "triton_fp16_s": 0.0008, "params": 3_500_000,
                               "bytes_written_fp32": 14_000_000, "copy_bandwidth_GBps": 3000.0,
                               "bound_fp32_s": 0.0000047}},
    }
    table = rows(results)
    cases = [r.case for r in table]
    assert "resnet50 GHN forward, flat decode" in cases and "kernel message passing" in cases
    assert Row("train", "", None, note="FAILED: RuntimeError: boom") in table
    assert "1000.0x" in format_table(results)  # 2 s / 2 ms
    assert "200.0x" in format_table(results)  # flat decode: 100 ms / 0.5 ms
    assert "H100 (CUDA 13.0)" in to_markdown(results)
