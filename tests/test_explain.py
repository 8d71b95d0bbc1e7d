"""``ghn-onnx explain``: per-layer diagnostics of predicted models, on every fixture export, a
torchvision ResNet-18 and a ViT; the statistics against independent computations."""

from __future__ import annotations

import json
import math
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import REPO

import ghn_onnx
from ghn_onnx.pipeline import prepare, resolve_checkpoint
from ghn_onnx.bn.batch_stats import batch_stats_model
from ghn_onnx.cli import main
from ghn_onnx.onnx_io.storage import set_tensor_values, stored_tensors
from ghn_onnx.report import explain as ex
from ghn_onnx.report.explain_data import labelled_images

FIXTURES = sorted((REPO / "tests" / "fixtures" / "frameworks").glob("*.onnx"))
PER_CLASS = 3  # test images per class in the small image folder


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def ghn():
    return ghn_onnx.load_ghn()


@pytest.fixture(scope="module")
def zip_path(shared_dir) -> Path:
    path = shared_dir / "data" / "cifar10-jpeg.zip"
    assert path.is_file(), f"{path}: CIFAR-10 images missing from the shared data"
    return path


@pytest.fixture(scope="module")
def image_folder(zip_path, tmp_path_factory) -> Path:
    """A small CIFAR-10 folder: ``PER_CLASS`` test images and one training image per class (the
    zip's 60,000 entries cost seconds to list at every call)."""
    root = tmp_path_factory.mktemp("cifar")
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".jpg"))  # <split>/<class>/<id>.jpg
        for split, k in (("test", PER_CLASS), ("train", 1)):
            taken: dict[str, int] = {}
            for n in names:
                s, cls, file = n.split("/")[-3:]
                if s == split and taken.get(cls, 0) < k:
                    taken[cls] = taken.get(cls, 0) + 1
                    (root / split / cls).mkdir(parents=True, exist_ok=True)
                    (root / split / cls / file).write_bytes(zf.read(n))
        assert len(taken) == 10
    return root


@pytest.fixture(scope="module")
def predicted_fixtures(ghn, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("predicted")
    outputs = [out / f.name for f in FIXTURES]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ghn_onnx.predict_files(FIXTURES, outputs, ghn)
    return {f.name: o for f, o in zip(FIXTURES, outputs)}


@pytest.fixture(scope="module")
def torch_exports(tmp_path_factory) -> dict[str, Path]:
    """The CIFAR ResNet-18 of ``make demo`` and a 2-layer ViT at 32x32, fresh PyTorch init."""
    import torch
    import torchvision

    from ghn_onnx.examples.export_resnet18 import export_resnet18

    out = tmp_path_factory.mktemp("torch")
    export_resnet18(out / "resnet18.onnx")
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(vit, (torch.zeros(1, 3, 32, 32),), str(out / "vit.onnx"), dynamo=False,
                          do_constant_folding=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return {"resnet18": out / "resnet18.onnx", "vit": out / "vit.onnx"}


@pytest.fixture(scope="module")
def predicted_torch(ghn, torch_exports, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("predicted_torch")
    names = list(torch_exports)
    outputs = [out / f"{n}_ghn.onnx" for n in names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ghn_onnx.predict_files([torch_exports[n] for n in names], outputs, ghn)
    return dict(zip(names, outputs))


# -- the statistics on their own -------------------------------------------------------------------

def test_repeated_share_counts_exact_copies_of_earlier_rows():
    block = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert ex.repeated_share(np.tile(block, (4, 1))) == 0.75  # 64-row blocks tiled to 256: 75%
    assert ex.repeated_share(block) == 0.0
    nudged = np.tile(block, (2, 1))
    nudged[5, 2] = np.nextafter(nudged[5, 2], np.inf)  # one ulp apart is not a repeat
    assert ex.repeated_share(nudged) == 3 / 8


def test_effective_rank_is_roy_vetterli():
    assert ex.effective_rank(np.eye(7)) == pytest.approx(7.0)
    assert ex.effective_rank(np.outer(np.arange(1, 6), np.arange(1, 4))) == pytest.approx(1.0)
    assert ex.effective_rank(np.zeros((3, 4))) is None
    m = np.random.default_rng(0).normal(size=(6, 40))
    s = np.linalg.svd(m, compute_uv=False)
    p = s / s.sum()
    assert ex.effective_rank(m) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert ex.effective_rank(m.T) == pytest.approx(ex.effective_rank(m), rel=1e-9)


def _as_prediction(path: Path) -> onnx.ModelProto:
    """A freshly initialised export labelled as if every GHN parameter had been predicted."""
    model, graph = prepare(onnx.load(str(path)), path.name)
    names = list(dict.fromkeys(p.tensor for p in graph.predicted_tensors()))
    model.metadata_props.add(key=ex.PREDICTED_KEY, value=json.dumps({"count": len(names), "names": names}))
    return model


def test_norm_ratio_of_pytorch_default_init_is_one(tmp_path):
    """Layers as PyTorch initialises them by default (torchvision's ResNet re-initialises its
    convs with kaiming_normal(fan_out), which reads sqrt(6) here)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                        nn.Conv2d(64, 128, 3, padding=1, groups=2), nn.BatchNorm2d(128), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)).eval()
    path = tmp_path / "default_init.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, do_constant_folding=False,
                          opset_version=17, training=torch.onnx.TrainingMode.EVAL, keep_initializers_as_inputs=False)
    result = ghn_onnx.explain(_as_prediction(path), name="default_init")
    by_op: dict[str, list] = {}
    for r in result.layers:
        by_op.setdefault("weight" if len(r.shape) > 1 else r.op, []).append(r)
    assert [r.shape for r in by_op["weight"]] == [(64, 3, 3, 3), (128, 32, 3, 3), (10, 128)]
    for r in by_op["weight"]:  # kaiming_uniform(a=sqrt(5)): E||W|| = sqrt(numel / (3 fan_in))
        assert r.init == "kaiming_uniform(a=sqrt(5))"
        assert r.norm_ratio == pytest.approx(1.0, abs=0.03), r.name
        assert r.repeated_rows == 0.0 and r.repeated_channels == 0.0
    for r in by_op["bn"]:  # ones
        assert r.init == "ones" and r.norm_ratio == 1.0 and r.effective_rank is None
    assert len(by_op["bias"]) == 3  # U(±1/sqrt(fan_in)) of their layer: 10 to 128 draws
    for r in by_op["bias"]:
        assert r.init == "uniform(±1/sqrt(fan_in))" and r.norm_ratio == pytest.approx(1.0, abs=0.35), r.name
    big = by_op["weight"][1]  # a random 128 x 288 matrix is nearly full rank
    assert big.max_rank == 128 and big.effective_rank > 0.8 * 128


def test_tiling_shows_as_repeated_rows_and_channels(ghn, predicted_torch):
    block_out, block_in = ghn.config.max_shape[:2]
    result = ghn_onnx.explain(predicted_torch["resnet18"])
    convs = [r for r in result.layers if r.op == "conv" and len(r.shape) == 4]
    assert convs
    for r in convs:
        out, cin = r.shape[:2]
        assert r.repeated_rows == pytest.approx(1 - min(out, block_out) / out), r.name
        assert r.repeated_channels == pytest.approx(1 - min(cin, block_in) / cin), r.name
    assert max(r.repeated_rows for r in convs) == pytest.approx(1 - 64 / 512)


# -- every fixture, and the torchvision exports ----------------------------------------------------

@pytest.mark.parametrize("name", [f.name for f in FIXTURES])
def test_explain_every_fixture(name, predicted_fixtures, image_folder):
    path = predicted_fixtures[name]
    model = onnx.load(str(path))
    predicted = set(ex.predicted_names(model))
    result = ghn_onnx.explain(path, image_folder, images=20, batch_size=10, layers=1, seed=3)
    assert {t for r in result.layers for t in r.tensors} == predicted
    assert result.data == {"source": str(image_folder), "split": "test", "images": 20, "batch_size": 10, "seed": 3}
    assert result.accuracy is not None and 0.0 <= result.accuracy <= 1.0
    swept = [r for r in result.layers if r.reinit_accuracy is not None]
    assert len(swept) == 1 and swept[0].elements == max(r.elements for r in result.layers)
    assert result.layers[0] is swept[0]  # swept layers first
    for r in result.layers:
        assert r.norm > 0 and 0.0 <= r.repeated_rows < 1.0
        assert r.activation is not None and np.isfinite(r.activation.std), r.name
    doc = json.loads(json.dumps(result.to_json()))
    assert doc["schema"] == ex.SCHEMA and len(doc["layers"]) == len(result.layers)
    assert "ghn_onnx.version" in doc["metadata"]


def test_sweep_and_activations_match_an_independent_run(predicted_torch, zip_path):
    """The re-initialisation fed as an input equals the same tensor written into the file; the
    activation statistics equal those of the layer output computed apart."""
    import onnxruntime as ort

    path = predicted_torch["vit"]
    result = ghn_onnx.explain(path, zip_path, images=24, batch_size=12, layers=2, seed=5)
    model, graph = prepare(onnx.load(str(path)), path.name)
    imgs = labelled_images(model, zip_path, 24, 12, 5)
    assert imgs.split == "test" and imgs.classes == 10

    def top1(m: onnx.ModelProto) -> float:
        sess = ort.InferenceSession(batch_stats_model(m).SerializeToString(), providers=["CPUExecutionProvider"])
        hits = sum(int((sess.run(None, {"input": x})[0].argmax(1) == y).sum()) for x, y in imgs.batches())
        return hits / imgs.images

    assert result.accuracy == top1(model)
    for r in [r for r in result.layers if r.reinit_accuracy is not None]:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        stored = stored_tensors(m)
        for t, value in ex.reinitialised(graph, r, stored, 5).items():  # baked into the file this time
            set_tensor_values(stored[t], value)
        assert r.reinit_accuracy == top1(m), r.name

    layer = next(r for r in result.layers if r.onnx_op == "Conv")
    probe = batch_stats_model(model)
    probe.graph.output.append(onnx.ValueInfoProto(name=layer.activation.output))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    x0 = next(imgs.batches())[0]
    y = sess.run([layer.activation.output], {"input": x0})[0].astype(np.float64)  # (N, C, H, W)
    assert layer.activation.mean == pytest.approx(y.mean(), rel=1e-6, abs=1e-9)
    assert layer.activation.std == pytest.approx(y.std(), rel=1e-6)
    assert layer.activation.dead == np.mean(~(y > 0).any(axis=(0, 2, 3)))


@pytest.mark.slow
def test_cli_resnet18_and_vit(predicted_torch, image_folder, tmp_path):
    for name, path in predicted_torch.items():
        png = tmp_path / f"{name}.png"
        args = ("explain", path, "--data", image_folder, "--images", 8, "--batch-size", 8, "--layers", 2, "--quiet")
        result = invoke(*args, "--json", "--png", png)
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        assert doc["schema"] == ex.SCHEMA and doc["bn"] == "batch" and doc["accuracy"] is not None
        drops = [r["accuracy_drop"] for r in doc["layers"] if r["accuracy_drop"] is not None]
        assert len(drops) == 2 and drops == sorted(drops, reverse=True)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if name == "vit":
            assert invoke(*args, "--json").stdout == result.stdout  # deterministic
            text = invoke(*args)
            assert text.exit_code == 0 and f"{len(doc['layers'])} predicted layers" in text.stdout
            assert doc["layers"][0]["name"][-30:] in text.stdout.splitlines()[5]  # most harmful first


def test_static_only_and_checkpoint(tmp_path):
    raw = REPO / "tests" / "fixtures" / "frameworks" / "torch_cnn.onnx"
    before = raw.read_bytes()
    result = invoke("explain", raw, "--checkpoint", resolve_checkpoint(None), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["data"] is None and doc["accuracy"] is None and len(doc["layers"]) == 12
    assert all(r["activation"] is None and r["accuracy_drop"] is None for r in doc["layers"])
    assert [r["index"] for r in doc["layers"]] == sorted(r["index"] for r in doc["layers"])  # graph order
    assert raw.read_bytes() == before


def test_cli_errors(predicted_fixtures, tmp_path):
    raw = REPO / "tests" / "fixtures" / "frameworks" / "torch_cnn.onnx"
    result = invoke("explain", raw)
    assert result.exit_code == 2 and "not a ghn-onnx prediction" in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    path = predicted_fixtures["torch_cnn.onnx"]
    for args, message in (((path, "--data", tmp_path / "nope"), "no such image data"),
                          ((path, "--png", path), "refusing to draw over the input"),
                          ((path, "--png", tmp_path), "is a directory"),
                          ((path, "--bn", "running"), "Invalid value for '--bn'"),
                          ((tmp_path / "missing.onnx",), "missing.onnx")):
        result = invoke("explain", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and result.output.count("\n") == 1, result.output
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros((4, 32, 32, 3), np.uint8))
    result = invoke("explain", path, "--data", npy, "--images", 4, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["accuracy"] is None and "no class labels" in doc["notes"][0]
    assert all(r["activation"] is not None for r in doc["layers"])


def test_npz_labels_and_head_mismatch(predicted_fixtures, tmp_path):
    path = predicted_fixtures["torch_cnn.onnx"]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "ten.npz", x=x, y=np.arange(8) % 10)
    np.savez(tmp_path / "eleven.npz", x=x, y=np.arange(8) % 8 + 3)
    ten = ghn_onnx.explain(path, tmp_path / "ten.npz", images=8, batch_size=8, layers=0)
    assert ten.accuracy is not None and all(r.reinit_accuracy is None for r in ten.layers)
    eleven = ghn_onnx.explain(path, tmp_path / "eleven.npz", images=8, batch_size=8)
    assert eleven.accuracy is None and "10 outputs and the data labels up to 10" in eleven.notes[0]
