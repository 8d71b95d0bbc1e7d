"""``ghn_onnx.keras.init_``: a Keras 3 model's weights predicted and assigned back in place.

Two halves. The mapping rules run without Keras, on committed fixtures (``tests/fixtures/keras/``):
the initializer names and shapes of three keras.applications exported on the torch backend against
their weight paths and shapes, and a real tf2onnx export with its weights for the by-value layouts.
The round trips need Keras on the torch backend (in the ``dev`` extra; they fail without it): for
each application, Keras's own forward after ``init_`` must equal onnxruntime on the predicted ONNX
(1e-4, BN calibrated on CIFAR-10 training images), every predicted tensor must land in its weight,
and the report must account for every weight.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import ghn_onnx
from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.keras import LAYOUTS, Match, match_names, match_weights, weight_path
from ghn_onnx.onnx_io.storage import stored_tensors
from ghn_onnx.pipeline import prepare
from ghn_onnx.writeback.write import resolve_shared

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "keras"
# (fixture name, keras.applications constructor, its keyword arguments, own preprocessing layers)
APPS = [("mobilenet_v2", "MobileNetV2", {"alpha": 0.35}, []),
        ("mobilenet_v3_small", "MobileNetV3Small", {"minimalistic": True}, ["rescaling"]),
        ("efficientnet_b0", "EfficientNetB0", {}, ["rescaling", "normalization"])]
# Set to regenerate the committed name-mapping fixtures from the installed Keras.
WRITE_FIXTURES = os.environ.get("GHN_ONNX_WRITE_KERAS_FIXTURES") == "1"
# Keras's numpy conversion of torch tensors warns about numpy 2's copy keyword, once per weight.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def keras_module():
    """Keras on the torch backend (pinned here: the backend is chosen when keras is imported)."""
    os.environ["KERAS_BACKEND"] = "torch"
    import keras

    assert keras.backend.backend() == "torch", "keras was imported on another backend before this test"
    return keras


@pytest.fixture(scope="module")
def ghn():
    return ghn_onnx.load_ghn()


def onnx_forward(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # calibrated copies leave the old statistics unused: not news
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def keras_forward(model, x: np.ndarray) -> np.ndarray:
    import keras

    return keras.ops.convert_to_numpy(model(x, training=False))


# -- the mapping, without Keras ------------------------------------------------------------------


def mapping_record(model, prediction) -> dict:
    """What the committed fixtures hold: the predicted tensors (graph order) with their stored
    shapes, the model's weights with their shapes, and the class of each layer with weights."""
    stored = stored_tensors(prediction.model)
    return {"model": model.name,
            "predicted": [[t, [int(d) for d in stored[t].dims]] for t in resolve_shared(prediction.graph)],
            "weights": [[v.path, [int(d) for d in v.shape], bool(v.trainable)] for v in model.weights],
            "layers": {layer.name: type(layer).__name__ for layer in model.layers if layer.weights}}


def dump_record(record: dict) -> str:
    """JSON with one tensor, weight or layer a line (fixtures that diff readably)."""
    lines = [f'{{"model": {json.dumps(record["model"])},']
    for key in ("predicted", "weights"):
        lines.append(f'"{key}": [')
        lines += [json.dumps(item) + ("," if i < len(record[key]) - 1 else "") for i, item in enumerate(record[key])]
        lines.append("],")
    layers = list(record["layers"].items())
    lines.append('"layers": {')
    lines += [f"{json.dumps(k)}: {json.dumps(v)}" + ("," if i < len(layers) - 1 else "") for i, (k, v) in enumerate(layers)]
    lines.append("}}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name", [a[0] for a in APPS])
def test_committed_exports_map_every_predicted_tensor_by_name(name):
    record = json.loads((FIXTURES / f"{name}.json").read_text())
    tensors = {t: tuple(s) for t, s in record["predicted"]}
    weights = {p: tuple(s) for p, s, _ in record["weights"]}
    matches, unnamed, problems = match_names(tensors, weights)
    assert unnamed == [] and problems == []
    assert [m.tensor for m in matches] == list(tensors) and {m.layout for m in matches} == {"as stored"}
    predicted = {m.weight for m in matches}
    # every trainable weight is predicted; what is not is a BN moving statistic or preprocessing state
    assert predicted == {p for p, _, trainable in record["weights"] if trainable}
    assert all(p.endswith(("/moving_mean", "/moving_variance")) or p.startswith("normalization/")
               for p in set(weights) - predicted)
    kinds = {(p.rsplit("/", 1)[1], len(weights[p])) for p in predicted}
    assert {("kernel", 4), ("gamma", 1), ("beta", 1)} <= kinds  # HWIO convolutions, BN
    depthwise = [p for p in predicted if record["layers"][p.split("/")[0]] == "DepthwiseConv2D" and "kernel" in p]
    assert depthwise and all(weights[p][3] == 1 for p in depthwise)  # (h, w, in, multiplier)
    last = list(record["layers"])[-1]  # the 10-class head: Dense (in, out), or a 1x1 Conv2D (MobileNetV3)
    head = weights[f"{last}/kernel"]
    assert f"{last}/kernel" in predicted and head[-1] == 10
    assert len(head) == (2 if record["layers"][last] == "Dense" else 4)


def test_weight_paths_and_name_problems():
    assert weight_path("_torch_params.block_1_expand/kernel") == "block_1_expand/kernel"
    assert weight_path("_functional._torch_params.tiny/conv/kernel") == "tiny/conv/kernel"  # a Sequential
    assert weight_path("inner._torch_params.a/_torch_params.b/kernel") == "b/kernel"  # innermost
    assert weight_path("onnx::Conv_12") is None and weight_path("_torch_params.") is None
    matches, unnamed, problems = match_names(
        {"_torch_params.conv/kernel": (3, 3, 3, 8), "_torch_params.gone/bias": (8,),
         "_torch_params.fc/kernel": (10, 12), "const_fold_opt__3": (8,)},
        {"conv/kernel": (3, 3, 3, 8), "fc/kernel": (12, 10)})
    assert matches == [Match("_torch_params.conv/kernel", "conv/kernel")] and unnamed == ["const_fold_opt__3"]
    assert problems == ["'_torch_params.gone/bias' is named after weight 'gone/bias', which the model does not have",
                        "'_torch_params.fc/kernel' is stored with shape (10, 12), weight 'fc/kernel' has (12, 10)"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_invert(layout):
    rng = np.random.default_rng(0)
    for shape in [(3, 3, 4, 2), (1, 1, 6, 5), (7, 3), (5,)]:
        k = rng.standard_normal(shape).astype(np.float32)
        if LAYOUTS[layout].applies(shape):
            np.testing.assert_array_equal(LAYOUTS[layout].to_keras(LAYOUTS[layout].to_onnx(k), shape), k)
    dw = rng.standard_normal((3, 3, 4, 2)).astype(np.float32)
    oihw = LAYOUTS["depthwise HWCM -> (C*M)1HW"].to_onnx(dw)
    assert oihw.shape == (8, 1, 3, 3)  # ONNX group conv: output channel c*m + j filters input channel c
    np.testing.assert_array_equal(oihw[2 * 2 + 1, 0], dw[:, :, 2, 1])


def test_tf2onnx_export_is_matched_by_value_in_each_layout():
    """Keras's own ONNX route on TensorFlow (tf2onnx) renames every weight and stores kernels
    as ONNX wants them; each is found by value. Its BN is folded (gamma / sqrt(var + eps)):
    no weight holds that, and saying so is the right answer."""
    model, graph = prepare(onnx.load(FIXTURES / "tf2onnx_tiny.onnx"), "tf2onnx_tiny")
    with np.load(FIXTURES / "tf2onnx_tiny_weights.npz", allow_pickle=False) as z:
        weights = {k: z[k] for k in z.files}
    tensors = list(resolve_shared(graph))
    with pytest.raises(GhnOnnxError, match=r"^2 predicted tensor\(s\) cannot be assigned.*batchnorm/mul.*none by value"):
        match_weights(model, weights, tensors)
    stored = stored_tensors(model)
    folded_bn = {t for t in tensors if tuple(stored[t].dims) == (1, 16, 1, 1)}  # a Mul and an Add after dw
    assert len(folded_bn) == 2
    matches = match_weights(model, weights, [t for t in tensors if t not in folded_bn])
    assert {m.weight: m.layout for m in matches} == {
        "conv/kernel": "HWIO -> OIHW", "conv/bias": "as stored",
        "dw/kernel": "depthwise HWCM -> (C*M)1HW", "dw/bias": "as stored",
        "sep/depthwise_kernel": "depthwise HWCM -> (C*M)1HW", "sep/pointwise_kernel": "HWIO -> OIHW",
        "sep/bias": "as stored", "fc/kernel": "as stored", "fc/bias": "as stored"}
    for m in matches:  # and back: the stored value in Keras's layout is the weight
        value = numpy_helper.to_array(stored[m.tensor])
        np.testing.assert_array_equal(m.keras_value(value, weights[m.weight].shape), weights[m.weight])


def test_by_value_refusals():
    model, _ = prepare(onnx.load(FIXTURES / "tf2onnx_tiny.onnx"), "tf2onnx_tiny")
    with np.load(FIXTURES / "tf2onnx_tiny_weights.npz", allow_pickle=False) as z:
        weights = {k: z[k] for k in z.files}
    fc = "tiny_tf_1/fc_1/Cast/ReadVariableOp:0"
    with pytest.raises(GhnOnnxError, match=r"fc/kernel, twin/kernel by value \(ambiguous\)"):
        match_weights(model, {**weights, "twin/kernel": weights["fc/kernel"].copy()}, [fc])
    with pytest.raises(GhnOnnxError, match="none by value"):
        match_weights(model, {**weights, "fc/kernel": weights["fc/kernel"] + 1}, [fc])
    with pytest.raises(GhnOnnxError, match="'missing' is not an initializer"):
        match_weights(model, weights, ["missing"])


# -- round trips, with Keras on the torch backend ------------------------------------------------


def check_report(model, report) -> None:
    """Every predicted tensor assigned, every weight accounted for once, values as in the ONNX."""
    import keras

    pred = report.prediction
    assert [m.tensor for m in report.predicted.values()] == list(resolve_shared(pred.graph))
    assert len(report.predicted) == pred.predicted_tensors
    paths = [v.path for v in model.weights]
    groups = [set(report.predicted), set(report.statistics), set(report.kept)]
    assert sum(map(len, groups)) == len(paths) and set().union(*groups) == set(paths)
    stored = stored_tensors(pred.model)
    values = {v.path: keras.ops.convert_to_numpy(v.value) for v in model.weights}
    for path, m in report.predicted.items():
        np.testing.assert_array_equal(values[path], numpy_helper.to_array(stored[m.tensor]))


@pytest.mark.slow
@pytest.mark.parametrize("name, constructor, kwargs, own", APPS, ids=[a[0] for a in APPS])
def test_application_forward_equals_the_predicted_onnx(name, constructor, kwargs, own, ghn, shared_dir):
    keras = keras_module()
    keras.backend.clear_session()  # default layer names count per session: the fixtures need them fixed
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, constructor)(weights=None, input_shape=(32, 32, 3), classes=10, **kwargs)
    before = {v.path: keras.ops.convert_to_numpy(v.value).copy() for v in model.weights}
    report = ghn_onnx.keras.init_(model, checkpoint=ghn, calibrate=shared_dir / "data" / "cifar10-jpeg.zip",
                                  calibration_images=16, calibration_batch=8)
    check_report(model, report)
    assert report.bn_status == "calibrated:16"
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert sorted(report.statistics) == sorted(f"{b.name}/{s}" for b in bns for s in ("moving_mean", "moving_variance"))
    assert set(report.kept) == {v.path for v in model.weights if v.path.startswith("normalization/")}
    assert all("not in the ONNX export" in why for why in report.kept.values())
    for path in list(report.predicted) + report.statistics:
        assert not np.array_equal(before[path], model_value(model, path)) or before[path].std() == 0
    own_note = [w for w in report.warnings if "normalises its input itself" in w]
    assert ghn_onnx.keras.own_preprocessing(model) == own and len(own_note) == (1 if own else 0)
    x = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3)).astype(np.float32)
    if not own:
        x = (x / 255 - 0.45) / 0.25  # roughly what the calibration fed: CIFAR-10 normalisation
    np.testing.assert_allclose(keras_forward(model, x), onnx_forward(report.prediction.model, x), rtol=1e-4, atol=1e-4)
    record = mapping_record(model, report.prediction)
    path = FIXTURES / f"{name}.json"
    if WRITE_FIXTURES:
        path.write_text(dump_record(record))
    assert record == json.loads(path.read_text()), (
        f"{path.name} no longer matches this Keras's export: rerun with GHN_ONNX_WRITE_KERAS_FIXTURES=1")


def model_value(model, path: str) -> np.ndarray:
    import keras

    return keras.ops.convert_to_numpy(next(v for v in model.weights if v.path == path).value)


def tiny_model(keras, bn_scale: bool = True):
    """Every kernel kind in one small NHWC model: Conv2D, DepthwiseConv2D (multiplier 2),
    SeparableConv2D, BN on 4-D and on 2-D (after Dense) inputs."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn", scale=bn_scale)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, use_bias=False, name="dw")(x)
    x = keras.layers.BatchNormalization(name="dw_bn")(x)
    x = keras.layers.SeparableConv2D(12, 3, strides=2, padding="same", name="sep")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(16, name="fc1")(x)
    x = keras.layers.BatchNormalization(name="fc_bn")(x)
    x = keras.layers.Dense(10, name="fc2")(keras.layers.ReLU()(x))
    return keras.Model(inp, x, name="tiny")


@pytest.mark.slow
def test_calibration_on_an_array_is_what_keras_measures(ghn):
    """calibrate= an array of NHWC inputs: each BN's moving statistics are the mean and
    population variance of its input in the initialised Keras model, over all of them (one
    batch: with several, upstream BNs are measured on batch statistics, see ghn_onnx.bn)."""
    keras = keras_module()
    model = tiny_model(keras)
    data = np.random.default_rng(2).standard_normal((10, 12, 12, 3)).astype(np.float32)
    report = ghn_onnx.keras.init_(model, checkpoint=ghn, calibrate=data, calibration_batch=10)
    check_report(model, report)
    assert report.bn_status == "calibrated:10" and report.kept == {}
    assert {m.layout for m in report.predicted.values()} == {"as stored"}
    assert {"dw/kernel", "sep/depthwise_kernel", "sep/pointwise_kernel", "fc1/kernel", "fc_bn/gamma"} <= set(report.predicted)
    for name in ("bn", "dw_bn", "fc_bn"):
        layer = model.get_layer(name)
        x = keras.ops.convert_to_numpy(keras.Model(model.input, layer.input)(data, training=False))
        axes = tuple(range(x.ndim - 1))
        np.testing.assert_allclose(model_value(model, f"{name}/moving_mean"), x.mean(axes), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(model_value(model, f"{name}/moving_variance"), x.var(axes), rtol=1e-4, atol=1e-5)
    x = np.random.default_rng(3).standard_normal((3, 12, 12, 3)).astype(np.float32)
    np.testing.assert_allclose(keras_forward(model, x), onnx_forward(report.prediction.model, x), rtol=1e-4, atol=1e-4)
    text = report.format()
    assert text.startswith("predicted 15 of 15 parameters; BN calibrated:10 (6 statistics buffers set)")


@pytest.mark.slow
def test_uncalibrated_statistics_are_kept_and_said_so(ghn):
    keras = keras_module()
    model = tiny_model(keras)
    before = {p: model_value(model, p).copy() for p in ("bn/moving_mean", "fc_bn/moving_variance")}
    report = ghn_onnx.keras.init_(model, checkpoint=ghn)
    check_report(model, report)
    assert report.bn_status == "uncalibrated" and report.statistics == []
    assert sorted(report.kept) == sorted(f"{b}/{s}" for b in ("bn", "dw_bn", "fc_bn") for s in ("moving_mean", "moving_variance"))
    assert set(report.kept.values()) == {"BN moving statistic: never predicted (calibrate= measures it)"}
    for p, value in before.items():
        np.testing.assert_array_equal(model_value(model, p), value)


@pytest.mark.slow
def test_unmatched_predictions_are_errors_and_nothing_is_assigned(ghn):
    """A BN without gamma: the export's BN scale is a constant; the GHN predicts it, no weight can take it."""
    keras = keras_module()
    model = tiny_model(keras, bn_scale=False)
    before = {v.path: model_value(model, v.path).copy() for v in model.weights}
    with pytest.raises(GhnOnnxError, match=r"^1 predicted tensor\(s\) cannot be assigned to the Keras model: .*constant"):
        ghn_onnx.keras.init_(model, checkpoint=ghn)
    for path, value in before.items():
        np.testing.assert_array_equal(model_value(model, path), value)


@pytest.mark.slow
def test_refusals(ghn, monkeypatch):
    keras = keras_module()
    model = tiny_model(keras)
    with pytest.raises(TypeError, match="unfold_bn"):
        ghn_onnx.keras.init_(model, checkpoint=ghn, unfold_bn=True)
    with pytest.raises(TypeError, match="unknown option"):
        ghn_onnx.keras.init_(model, checkpoint=ghn, calibration_imgs=3)
    inp = keras.Input((None, None, 3))
    sized_later = keras.Model(inp, keras.layers.Conv2D(4, 3)(inp), name="sized_later")
    with pytest.raises(GhnOnnxError, match=r"sized_later: the input shape \(None, None, None, 3\) is not fully known"):
        ghn_onnx.keras.init_(sized_later, checkpoint=ghn)
    monkeypatch.setattr(keras.backend, "backend", lambda: "tensorflow")
    with pytest.raises(GhnOnnxError, match="needs Keras on the torch backend .got 'tensorflow'.: set KERAS_BACKEND=torch"):
        ghn_onnx.keras.init_(model, checkpoint=ghn)


def test_the_package_exposes_the_submodule():
    assert ghn_onnx.keras.init_ is __import__("ghn_onnx.keras", fromlist=["init_"]).init_
    assert Match.__module__ == "ghn_onnx.keras"


@pytest.mark.slow
def test_readme_example_and_docstring_run(shared_dir):
    import doctest

    keras_module()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## Back into your framework\n", 1)[1].split("\n## ", 1)[0]
    text = section.split("\n### Keras\n", 1)[1].split("\n### ", 1)[0]
    text = text.replace("../shared", str(shared_dir))  # README paths are from a checkout's root
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(parser.get_doctest(text, {}, "README.md: Back into your framework: Keras", "README.md", 0))
    runner.run(parser.get_doctest(ghn_onnx.keras.__doc__, {}, "ghn_onnx.keras", "ghn_onnx/keras.py", 0))
    result = runner.summarize(verbose=False)
    assert result.attempted >= 10 and result.failed == 0


@pytest.mark.slow
def test_example_runs_at_tiny_size(tmp_path, monkeypatch):
    """The Keras example end to end on a tiny CIFAR-like zip (4 training images a class)."""
    from click.testing import CliRunner
    from PIL import Image

    from ghn_onnx.examples.keras_init import main
    from ghn_onnx.training.datasets import CLASSES

    keras_module()
    monkeypatch.setenv("GHN_ONNX_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "cifar.zip"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(data, "w") as zf:
        for split, n in (("train", 4), ("test", 1)):
            for c in CLASSES:
                for i in range(n):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
                    zf.writestr(f"{split}/{c}/{i}.png", buf.getvalue())
    result = CliRunner().invoke(main, ["--model", "MobileNetV3Small", "--data", str(data), "--calibration-images", "8",
                                       "--test-images", "10", "--steps", "2", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "MobileNetV3Small: " in result.output and "BN calibrated:8" in result.output
    assert "normalises its input itself" in result.output  # its Rescaling layer: fed pixel values
    lines = result.output.splitlines()
    assert lines[-2].split()[:2] == ["GHN", "init"] and lines[-1].split()[:2] == ["default", "init"]
    bad = CliRunner().invoke(main, ["--model", "NoSuchNet", "--data", str(data)])
    assert bad.exit_code == 2 and "'NoSuchNet' is not a keras.applications model" in bad.output
