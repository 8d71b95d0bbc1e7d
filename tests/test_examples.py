"""The demo's exporter writes a ResNet-18 that converts to exactly the reference graph."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from reference_graphs import compare, load_reference

from ghn_onnx.convert import convert
from ghn_onnx.onnx_io.loading import load_model
from ghn_onnx.examples.export_resnet18 import main
from ghn_onnx.report.inspection import build_report


@pytest.mark.slow
def test_export_resnet18_matches_the_reference_graph(tmp_path, parity_dir):
    path = tmp_path / "out" / "resnet18.onnx"
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 0, result.output
    assert [p.name for p in path.parent.iterdir()] == ["resnet18.onnx"]

    model = load_model(path)
    graph = convert(model, name=path.name)
    assert compare(graph, load_reference(parity_dir / "resnet18.graph.json")) == []
    report = build_report(model, graph)
    assert report.warnings == [] and report.shared == {}  # BN kept, no merged initializers
    assert report.statistics.tensors == 40
    assert [i.name for i in model.graph.input] == ["input"]

    logits = ort.InferenceSession(str(path)).run(None, {"input": np.zeros((2, 3, 32, 32), np.float32)})[0]
    assert logits.shape == (2, 10)


def _tiny_cifar_zip(path, per_split=(8, 4)):
    """train/<class>/*.png and test/<class>/*.png with CIFAR-10's class names, random 32x32 images."""
    import io
    import zipfile

    from PIL import Image

    from ghn_onnx.training.datasets import CLASSES

    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as zf:
        for split, n in zip(("train", "test"), per_split):
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
                zf.writestr(f"{split}/{CLASSES[i % 10]}/{i}.png", buf.getvalue())
    return path


@pytest.mark.slow
def test_torch_init_example_runs_at_tiny_size(tmp_path, monkeypatch):
    from ghn_onnx.examples import torch_init

    monkeypatch.setenv("GHN_ONNX_CACHE", str(tmp_path / "cache"))  # the decoded-CIFAR cache
    data = _tiny_cifar_zip(tmp_path / "tiny.zip")
    before = data.read_bytes()
    args = ["--data", str(data), "--model", "mobilenet_v3_small", "--calibration-images", "4", "--test-images", "4",
            "--steps", "1", "--batch-size", "4"]  # a small torchvision net: the default ResNet-18 costs 5x more
    result = CliRunner().invoke(torch_init.main, args)
    assert result.exit_code == 0, result.output
    assert "predicted 142 of 142 parameters; BN calibrated:4 (68 statistics buffers set)" in result.output
    rows = [line.split() for line in result.output.splitlines() if line.strip().startswith(("GHN init", "default init"))]
    assert [r[:2] for r in rows] == [["GHN", "init"], ["default", "init"]]
    assert all(float(v.rstrip("%")) in (0.0, 25.0, 50.0, 75.0, 100.0) for r in rows for v in r[2:])  # of 4 images
    assert "after 1 SGD steps" in result.output and data.read_bytes() == before


@pytest.mark.parametrize("args, message", [(["--model", "no_such_net"], "is not a torchvision classifier"),
                                           (["--data", "missing.zip"], "missing.zip: no such CIFAR-10")])
def test_torch_init_example_bad_input_is_one_line_exit_2(args, message, tmp_path, monkeypatch):
    from ghn_onnx.examples import torch_init

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(torch_init.main, ["--data", str(_tiny_cifar_zip(tmp_path / "tiny.zip")), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
