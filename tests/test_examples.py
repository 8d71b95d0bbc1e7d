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
