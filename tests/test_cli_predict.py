"""``ghn-onnx predict / calibrate / convert-checkpoint`` through the CLI, end to end."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from click.testing import CliRunner

from conftest import file_digest
from ghn_onnx.cli import main


@pytest.fixture(scope="module")
def ref_checkpoint(parity_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "ref.safetensors"
    res = CliRunner().invoke(main, ["convert-checkpoint", str(parity_dir / "ghn2_random_cifar10.npz"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    path = tmp_path_factory.mktemp("r18") / "resnet18.onnx"
    torch.onnx.export(net.eval(), (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                      training=torch.onnx.TrainingMode.EVAL, do_constant_folding=False,
                      input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    return net, path


def test_predicted_onnx_matches_pytorch_forward(resnet18, ref_checkpoint, tmp_path):
    net, src = resnet18
    before = file_digest(src)
    out = tmp_path / "pred.onnx"
    res = CliRunner().invoke(main, ["predict", str(src), "-o", str(out), "--checkpoint", str(ref_checkpoint)])
    assert res.exit_code == 0, res.output
    assert file_digest(src) == before
    model = onnx.load(out)
    onnx.checker.check_model(model)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    state = net.state_dict()
    assert all(k in values for k in state if not k.endswith("num_batches_tracked"))
    net.load_state_dict({k: torch.from_numpy(values[k].copy()) if k in values else v for k, v in state.items()})
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32), dtype=np.float32)
    y = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["ghn_onnx.bn"] == "uncalibrated" and len(meta["ghn_onnx.checkpoint_sha256"]) == 64


def test_predict_many_to_a_folder_with_json(parity_dir, ref_checkpoint, tmp_path):
    names = ["deepnets_17", "deepnets_6"]
    res = CliRunner().invoke(main, ["predict", *[str(parity_dir / f"{n}.onnx") for n in names],
                                    "-O", str(tmp_path / "out"), "--checkpoint", str(ref_checkpoint), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert [s["name"] for s in summary] == [f"{n}.onnx" for n in names]
    for n in names:
        onnx.checker.check_model(onnx.load(tmp_path / "out" / f"{n}.onnx"))


def test_predict_with_calibration_writes_statistics(resnet18, ref_checkpoint, shared_dir, tmp_path):
    _, src = resnet18
    out = tmp_path / "cal.onnx"
    res = CliRunner().invoke(main, ["predict", str(src), "-o", str(out), "--checkpoint", str(ref_checkpoint),
                                    "--calibrate", str(shared_dir / "data" / "cifar10-jpeg.zip"),
                                    "--calibration-images", "64"])
    assert res.exit_code == 0, res.output
    values = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    assert not np.allclose(values["bn1.running_mean"], 0)
    assert {p.key: p.value for p in onnx.load(out).metadata_props}["ghn_onnx.bn"] == "calibrated:64"


@pytest.mark.parametrize("args, message", [
    (["predict", "MODEL", "-o", "x.onnx"], "no trained checkpoint"),
    (["predict", "MODEL", "-o", "x.onnx", "--checkpoint", "missing.safetensors"], "no such checkpoint"),
    (["predict", "MODEL"], "exactly one of"),
])
def test_predict_usage_errors(resnet18, args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from ghn_onnx.ghn import checkpoint

    monkeypatch.setattr(checkpoint, "default_checkpoint", lambda: None)
    args = [str(resnet18[1]) if a == "MODEL" else a for a in args]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output


def test_predict_refuses_a_mismatched_checkpoint(resnet18, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    res = CliRunner().invoke(main, ["predict", str(resnet18[1]), "-o", str(tmp_path / "o.onnx"), "--checkpoint", str(bad)])
    assert res.exit_code == 2 and "not a readable safetensors" in res.output


def test_convert_checkpoint_rejects_wrong_config(parity_dir, tmp_path):
    res = CliRunner().invoke(main, ["convert-checkpoint", str(parity_dir / "ghn2_random_cifar10.npz"),
                                    "-o", str(tmp_path / "x.safetensors"), "--num-classes", "100"])
    assert res.exit_code == 2 and "shape" in res.output
