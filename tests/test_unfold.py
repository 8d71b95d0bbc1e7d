"""--unfold-bn: a BN-folded export is predicted exactly as its BN-kept original with calibrated
statistics, then folded."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from ghn_onnx.bn.calibration import calibrate_bn, calibration_batches, iter_batches
from ghn_onnx.cli import main
from ghn_onnx.onnx_io.loading import load_model
from ghn_onnx.ghn import GHN, GHNConfig, checkpoint
from ghn_onnx.pipeline import UNCALIBRATED_UNFOLD_WARNING, predict_models, predict_unfolded, prepare
from ghn_onnx.writeback.unfold import folded_convs, unfolded_graph
from reference_graphs import compare_structure


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.fc(self.down(x).mean((2, 3), keepdim=True).flatten(1))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    torch.manual_seed(0)
    net = SmallResNet()
    for m in net.modules():  # non-trivial statistics, so the exporters really fold
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    net.eval()
    d = tmp_path_factory.mktemp("unfold")
    x = (torch.zeros(1, 3, 32, 32),)
    torch.onnx.export(net, x, str(d / "dynamo.onnx"), dynamo=True, verbose=False)
    torch.onnx.export(net, x, str(d / "folded_ts.onnx"), dynamo=False, do_constant_folding=True,
                      training=torch.onnx.TrainingMode.EVAL, input_names=["input"])
    torch.onnx.export(net, x, str(d / "kept.onnx"), dynamo=False, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.EVAL, input_names=["input"])
    return d


@pytest.fixture(scope="module")
def ghn():
    torch.manual_seed(1)
    return GHN(GHNConfig()).eval()


def _images(n, seed):
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString())
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


@pytest.mark.parametrize("folded", ["dynamo.onnx", "folded_ts.onnx"])
def test_unfolded_graph_is_the_bn_kept_graph(exports, folded):
    fm, fg = prepare(load_model(exports / folded), folded)
    _, kg = prepare(load_model(exports / "kept.onnx"), "kept")
    assert fg.info["bn_folded"]
    folds = folded_convs(fm, fg)
    assert len(folds) == 4
    assert compare_structure(unfolded_graph(fg, folds), kg) == []


@pytest.mark.parametrize("folded", ["dynamo.onnx", "folded_ts.onnx"])
def test_unfold_equals_predicting_the_bn_kept_export_and_folding(exports, ghn, folded):
    calib = _images(128, 0)
    fm, fg = prepare(load_model(exports / folded), folded)
    pred = predict_unfolded(fm, fg, ghn, list(iter_batches(calib, 32)))
    assert pred.bn_status == "unfolded:calibrated" and UNCALIBRATED_UNFOLD_WARNING not in pred.warnings
    kept = predict_models([load_model(exports / "kept.onnx")], ghn, ["kept"])[0].model
    kept = calibrate_bn(kept, iter_batches(calib, 32))
    x = _images(8, 1)
    np.testing.assert_allclose(_run(pred.model, x), _run(kept, x), rtol=1e-4, atol=1e-4)


def test_unfold_option_calibrates_like_predict_unfolded(exports, ghn, tmp_path):
    """The ``unfold_bn`` option with calibration images is :func:`predict_unfolded` on their batches."""
    calib = _images(64, 0)
    np.save(tmp_path / "calib.npy", calib)
    fm, fg = prepare(load_model(exports / "dynamo.onnx"), "dynamo.onnx")
    expected = predict_unfolded(fm, fg, ghn, calibration_batches(fm, tmp_path / "calib.npy", 32, 16, seed=3))
    got = predict_models([load_model(exports / "dynamo.onnx")], ghn, ["dynamo.onnx"], unfold_bn=True,
                         calibrate=tmp_path / "calib.npy", calibration_images=32, batch_size=16, seed=3)[0]
    assert got.bn_status == "unfolded:calibrated" and got.name == "dynamo.onnx"
    assert got.model.SerializeToString() == expected.model.SerializeToString()


def test_cli_unfold_without_data_warns(exports, ghn, tmp_path):
    ckpt = tmp_path / "g.safetensors"
    checkpoint.save(ghn, ckpt)
    res = CliRunner().invoke(main, ["predict", str(exports / "dynamo.onnx"), "-o", str(tmp_path / "o.onnx"),
                                    "--checkpoint", str(ckpt), "--unfold-bn"])
    assert res.exit_code == 0, res.output
    assert f"warning: {UNCALIBRATED_UNFOLD_WARNING}" in res.output and "unfolded:uncalibrated" in res.output


def test_unfold_on_a_bn_kept_model_is_a_no_op_request(exports, ghn, tmp_path):
    ckpt = tmp_path / "g.safetensors"
    checkpoint.save(ghn, ckpt)
    res = CliRunner().invoke(main, ["predict", str(exports / "kept.onnx"), "-o", str(tmp_path / "o.onnx"),
                                    "--checkpoint", str(ckpt), "--unfold-bn"])
    assert res.exit_code == 0 and "BN uncalibrated" in res.output
