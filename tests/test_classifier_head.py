"""A classifier whose out-features are not the GHN's class count (ghn_onnx/ghn/decode/rules.py
ClassifierHead): predicted from the GHN's class rows, sliced or tiled (the reference's rule), and
said so in predict's warnings, the output's metadata and `inspect` (text and --json)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

import ghn_onnx
from ghn_onnx.cli import main
from ghn_onnx.ghn import checkpoint
from ghn_onnx.ghn.config import GHNConfig
from ghn_onnx.ghn.decode.rules import ClassifierHead
from ghn_onnx.ghn.model import GHN
from tests.onnx_builders import conv_model, save

CNN = "tests/fixtures/frameworks/torch_cnn.onnx"  # classifier fc.weight (10, 8), fc.bias (10,)


def predicted(classes: int):
    torch.manual_seed(0)
    result = ghn_onnx.predict(CNN, GHN(GHNConfig(num_classes=classes)).eval())
    values = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    metadata = {p.key: p.value for p in result.model.metadata_props}
    return result, values, metadata


def test_more_outputs_than_classes_repeat_the_class_rows():
    result, values, metadata = predicted(3)
    w, b = values["fc.weight"], values["fc.bias"]
    for r in range(10):
        assert np.array_equal(w[r], w[r % 3]) and b[r] == b[r % 3]
    assert not np.array_equal(w[0], w[1])
    assert metadata["ghn_onnx.classifier"] == "fc.weight: 10 outputs from 3 GHN classes, tiled"
    [note] = result.warnings
    assert note.startswith("classifier fc.weight has 10 outputs and the GHN 3 classes: its rows are the GHN's 3 "
                           "class rows repeated (row r = class r mod 3)")


def test_fewer_outputs_than_classes_take_the_first_class_rows():
    result, values, metadata = predicted(16)
    w = values["fc.weight"]
    assert len({w[r].tobytes() for r in range(10)}) == 10  # ten distinct class rows, no repeats
    assert metadata["ghn_onnx.classifier"] == "fc.weight: 10 outputs from 16 GHN classes, sliced"
    assert result.warnings[0].startswith("classifier fc.weight has 10 outputs and the GHN 16 classes: its rows "
                                         "are the GHN's first 10 class rows")


def test_a_matching_head_is_quiet():
    result, _, metadata = predicted(10)
    assert result.warnings == [] and "ghn_onnx.classifier" not in metadata


def test_rule_names():
    assert ClassifierHead("w", None, 10, None).rule == "unknown"
    assert ClassifierHead("w", None, 10, 10).note() is None and ClassifierHead("w", None, 10, 10).metadata() == {}
    assert ClassifierHead("w", "b", 100, 1000).rule == "sliced"
    assert ClassifierHead("w", "b", 21843, 1000).rule == "tiled"


@pytest.mark.parametrize("args, outputs, classes, rule", [
    ([], 10, 10, "one row per class"),             # the shipped checkpoint
    (["--checkpoint", "ghn3-t"], 10, 1000, "sliced"),  # a name: its registry configuration, no download
])
def test_inspect_reports_the_head(args, outputs, classes, rule, monkeypatch, tmp_path):
    monkeypatch.setenv("GHN_ONNX_HOME", str(tmp_path))
    res = CliRunner().invoke(main, ["inspect", CNN, "--json", *args])
    assert res.exit_code == 0, res.output
    head = json.loads(res.output)["parameters"]["classifier"]
    assert head == {"weight": "fc.weight", "bias": "fc.bias", "outputs": outputs, "ghn_classes": classes, "rule": rule}
    text = CliRunner().invoke(main, ["inspect", CNN, *args]).output
    assert f"classifier fc.weight + fc.bias: {outputs} outputs, GHN classes {classes}: {rule}" in text
    assert not list(tmp_path.iterdir())  # nothing downloaded or cached


def test_inspect_with_a_checkpoint_file(tmp_path):
    path = tmp_path / "four.safetensors"
    checkpoint.save(GHN(GHNConfig(num_classes=4)), path)
    res = CliRunner().invoke(main, ["inspect", CNN, "--checkpoint", str(path)])
    assert res.exit_code == 0, res.output
    assert "classifier fc.weight + fc.bias: 10 outputs, GHN classes 4: tiled\n" in res.output
    assert "class rows repeated (row r = class r mod 4)" in res.output


def test_no_linear_head(tmp_path):
    report = ghn_onnx.inspect(save(conv_model(), tmp_path / "conv.onnx"))
    assert report.classifier is None and report.to_json()["parameters"]["classifier"] is None
    from ghn_onnx.report.inspection import format_report

    assert "classifier (none: the last weight is not a linear layer" in format_report(report)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter's notice
def test_unfolded_prediction_says_it_too(tmp_path):
    """The BN-unfolding path (--unfold-bn) warns and stamps the metadata the same way."""
    from test_unfold import SmallResNet  # its folded TorchScript export is recognised as folded

    torch.manual_seed(0)
    net = SmallResNet().eval()  # classifier fc: 10 outputs
    for m in net.modules():  # non-trivial statistics, so that the exporter really folds
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "folded.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, do_constant_folding=True,
                      training=torch.onnx.TrainingMode.EVAL, input_names=["input"])
    result = ghn_onnx.predict(path, GHN(GHNConfig(num_classes=3)).eval(), unfold_bn=True)
    assert result.bn_status == "unfolded:uncalibrated"
    assert any(w.startswith("classifier ") and "class r mod 3" in w for w in result.warnings)
    assert {p.key: p.value for p in result.model.metadata_props}["ghn_onnx.classifier"].endswith(
        "10 outputs from 3 GHN classes, tiled")
