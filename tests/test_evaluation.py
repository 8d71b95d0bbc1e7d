"""The evaluation suite (`ghn-onnx eval`): end to end on tiny subsets with the random-weight
reference GHN, the two BN modes, the random test subset, the 32x32 torchvision variants and the CLI.

Images are random noise (accuracies near chance): these tests check plumbing and bookkeeping,
not the GHN's quality.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from ghn_onnx.bn.calibration import batch_stats_model, calibrate_bn
from ghn_onnx.cli import main
from ghn_onnx.training.datasets import ImageSet, normalize
from ghn_onnx.ghn import checkpoint
from ghn_onnx.training.cifar_models import TORCHVISION_MODELS, cifar_model, export_model, parameters_from_onnx
from ghn_onnx.training.eval_plot import plot_curves
from ghn_onnx.training import eval_suite
from ghn_onnx.training.eval_suite import OOD_SPLITS, EvalConfig, EvalConfigError, evaluate
from ghn_onnx.training.evaluation import accuracy, onnx_accuracy, random_subset

# OOD: wide (4x width) and bnfree; deep and dense take the same path with 700-900-node graphs.
TINY = {"test_images": 64, "id_nets": 2, "ood_nets": 1, "ood_splits": ("wide", "bnfree"), "sgd_steps": (3,),
        "finetune_steps": 3, "finetune_archs": 2, "torchvision": ("resnet18",), "sgd_torchvision": ("resnet18",),
        "finetune_torchvision": ("resnet18",), "calibration_images": 64, "sgd_batch_size": 16, "threads": 1}


def _class_ordered(n: int, seed: int = 0) -> ImageSet:
    """Noise images listed class by class, like the image-folder archive."""
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.repeat(np.arange(10), n // 10))


@pytest.fixture(scope="module")
def ghn(parity_dir):
    return checkpoint.load_reference(parity_dir / "ghn2_random_cifar10.npz")


@pytest.fixture(scope="module")
def result(ghn):
    # train_val_split holds out 5,000 images: 5,200 leave 200 for SGD and calibration.
    splits = {"train": _class_ordered(5200, seed=1), "test": _class_ordered(1000, seed=2)}
    return evaluate(ghn, splits, EvalConfig(**TINY), source={"checkpoint": "random-reference"})


# -- the result ---------------------------------------------------------------------------------

def test_result_has_every_section_with_its_provenance(result):
    assert set(result) == {"meta", "generated", "torchvision", "training"}
    assert result["meta"]["config"]["seed"] == 0 and result["meta"]["test_images"] == 64
    assert list(result["generated"]) == ["test", "wide", "bnfree"]
    assert EvalConfig().ood_splits == OOD_SPLITS == ("wide", "deep", "dense", "bnfree")
    for split, r in result["generated"].items():
        assert r["nets"] == len(r["per_net"]) == (2 if split == "test" else 1)
        assert (r["images"], r["image_seed"], r["bn"], r["batch_size"]) == (64, 0, "batch_stats", 64)
        assert 0 <= r["mean"] <= 1 and r["sem"] >= 0
        assert all(set(n) == {"index", "key", "params", "acc"} for n in r["per_net"])
    assert result["generated"]["wide"]["width"]["C"] == 4 * result["generated"]["test"]["width"]["C"]
    json.dumps(result)  # JSON-able as it is


def test_torchvision_models_in_both_bn_modes_give_valid_accuracies(result):
    r = result["torchvision"]["resnet18"]
    assert r["predicted_params"] == r["params"] == 11_173_962
    assert (r["images"], r["calibration_images"]) == (64, 64)
    for init in ("ghn", "random_init"):
        assert set(r[init]) == {"batch_stats", "calibrated"}
        assert all(0.0 <= a <= 1.0 for a in r[init].values())


def test_training_curves_share_marks_and_start_from_the_untrained_accuracy(result):
    t = result["training"]
    assert [c["index"] for c in t["generated"]] == [0, 1]
    for c in t["generated"]:
        assert c["random_init"]["steps"] == c["ghn_init"]["steps"] == [0, 3]
        # step 0 of GHN init is the GHN's own accuracy on the same net and images
        assert c["ghn_init"]["acc"][0] == result["generated"]["test"]["per_net"][c["index"]]["acc"]
    assert t["generated_mean"]["ghn_init"]["nets"] == 2
    tv = t["torchvision"]["resnet18"]
    assert tv["random_init"]["steps"] == tv["ghn_init"]["steps"] == [0, 3]
    # PyTorch with the tensors read back from the predicted ONNX = onnxruntime (one argmax may flip)
    onnx_side = result["torchvision"]["resnet18"]
    assert abs(tv["ghn_init"]["acc"][0] - onnx_side["ghn"]["batch_stats"]) <= 1 / 64
    assert abs(tv["random_init"]["acc"][0] - onnx_side["random_init"]["batch_stats"]) <= 1 / 64


def test_plot_is_written(result, tmp_path):
    path = plot_curves(result, tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- test images --------------------------------------------------------------------------------

def test_test_subset_is_random_not_class_ordered():
    data = _class_ordered(10_000)
    sub = random_subset(data, 2000, seed=0)
    assert len(sub) == 2000 and len(set(map(bytes, sub.images[:50]))) == 50
    for start in range(0, 2000, 64):  # every evaluation batch mixes the classes
        assert len(np.unique(sub.labels[start:start + 64])) >= 6
    assert np.array_equal(random_subset(data, 2000, seed=0).labels, sub.labels)
    assert not np.array_equal(random_subset(data, 2000, seed=1).labels, sub.labels)
    everything = random_subset(data, 10_000, seed=0)  # all of it: shuffled too
    assert len(everything) == 10_000 and len(np.unique(everything.labels[:64])) >= 6


# -- BN modes -----------------------------------------------------------------------------------

def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 10))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 2.0)
        net[1].bias.uniform_(-1, 1)
    return net


def test_bn_modes_batch_statistics_match_torch_and_calibration_on_the_batch():
    data = _class_ordered(640)
    test = random_subset(data, 64, seed=0)
    net = _tiny_cnn()
    model = export_model(net)
    batch_stats = onnx_accuracy(batch_stats_model(model), test)
    assert batch_stats == accuracy(net, None, test)  # same mode in onnxruntime and torch
    x = normalize(test.images).numpy()
    other = normalize(random_subset(data, 64, seed=5).images).numpy() * 3.0
    on_batch, elsewhere = calibrate_bn(model, [x]), calibrate_bn(model, [other])
    reference = _logits(batch_stats_model(model), x)
    # calibrated on exactly the test batch = batch statistics of that batch; on other data, not
    np.testing.assert_allclose(_logits(on_batch, x), reference, atol=1e-4)
    assert not np.allclose(_logits(elsewhere, x), reference, atol=1e-2)
    assert 0.0 <= onnx_accuracy(elsewhere, test) <= 1.0


def _logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


# -- torchvision variants -----------------------------------------------------------------------

@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_cifar_models_take_32x32_and_output_10_classes(name):
    net = cifar_model(name, seed=0).eval()
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_cifar_models_have_the_reference_strides(name, parity_dir):
    """The parity fixtures are the reference's adjusted models: same conv strides, same names."""
    ref = onnx.load(str(parity_dir / f"{name}.onnx"))
    expected = {n.input[1]: list(next(a.ints for a in n.attribute if a.name == "strides"))
                for n in ref.graph.node if n.op_type == "Conv"}
    convs = {f"{k}.weight": list(m.stride) for k, m in cifar_model(name).named_modules() if isinstance(m, nn.Conv2d)}
    assert convs == expected


def test_parameters_from_onnx_round_trip():
    net = _tiny_cnn()
    params = parameters_from_onnx(export_model(net), net)
    assert set(params) == {k for k, _ in net.named_parameters()}
    assert all(torch.equal(params[k], v) for k, v in net.named_parameters())


# -- config and CLI -----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [{"id_nets": 201}, {"ood_nets": 51}, {"torchvision": ("vgg11",)},
                                 {"sgd_steps": (0,)}, {"ood_splits": ("wider",)}, {"threads": -1}])
def test_config_rejects_what_is_not_held_out_or_known(bad):
    with pytest.raises(EvalConfigError):
        EvalConfig(**bad)


def _write_batches(folder, n_train: int = 5100, n_test: int = 100) -> None:
    """A CIFAR-10 folder in the official pickle format (noise images)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = [n_train // 5] * 5 + [n_test]
    for name, n in zip([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], sizes):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch))


def test_cli_eval_writes_json_and_plot(tmp_path, monkeypatch, parity_dir, ghn):
    monkeypatch.setenv("GHN_ONNX_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "cifar-10-batches-py"
    _write_batches(data)
    ckpt = tmp_path / "ghn.safetensors"
    checkpoint.save(ghn, ckpt, extra={"trained_steps": "0"})
    args = ["eval", "--checkpoint", str(ckpt), "--data", str(data), "--test-images", "64", "--id-nets", "1",
            "--ood-nets", "1", "--ood-splits", "bnfree", "--sgd-steps", "2", "--finetune-steps", "2",
            "--finetune-archs", "1",
            "--sgd-batch-size", "16",
            "--torchvision", "none", "--sgd-torchvision", "none", "--calibration-images", "32", "--threads", "1",
            "--quiet"]
    partial = []
    real_write = eval_suite.write_json
    monkeypatch.setattr(eval_suite, "write_json", lambda r, p: (partial.append(json.loads(json.dumps(r))),
                                                                real_write(r, p)))
    res = CliRunner().invoke(main, [*args, "--json", "--out", str(tmp_path / "r.json"),
                                    "--plot", str(tmp_path / "c.png")])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    assert printed == json.loads((tmp_path / "r.json").read_text()) and printed["meta"]["complete"]
    assert printed["meta"]["trained_steps"] == "0" and len(printed["meta"]["checkpoint_sha256"]) == 64
    assert printed["generated"]["test"]["nets"] == 1 and printed["torchvision"] == {}
    assert list(printed["generated"]) == ["test", "bnfree"]  # --ood-splits
    # --out is rewritten after each split, so an interrupted run keeps what it measured
    assert [(list(r["generated"]), r["meta"]["complete"]) for r in partial] == [
        (["test"], False), (["test", "bnfree"], False), (["test", "bnfree"], True)]
    assert not list(tmp_path.glob(".r.json*"))  # written through a temporary file, renamed
    assert (tmp_path / "c.png").stat().st_size > 0


def test_cli_eval_refuses_more_nets_than_held_out(tmp_path):
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(tmp_path / "missing.safetensors"), "--id-nets", "201"])
    assert res.exit_code == 2
    assert "id_nets" in res.output and "Traceback" not in res.output
