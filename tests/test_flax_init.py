"""``ghn_onnx.flax.init``: a Flax model's variables predicted and returned as a new pytree.

The mapping from jax2onnx's anonymous initializers to leaves is checked twice: on the committed
marker exports of ``fixtures/flax`` (no JAX needed: ``match_leaves``, ``substitute``), and on
live linen and nnx models, where the Flax forward with the new variables must equal onnxruntime
on the predicted ONNX (1e-4), every predicted tensor must land in one leaf and the report must
account for every leaf."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import ghn_onnx
from ghn_onnx.convert import convert
from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.flax import Leaf, Match, markers, match_leaves, substitute, to_leaf
from ghn_onnx.onnx_io.storage import stored_tensors
from ghn_onnx.writeback.write import resolve_shared

FIXTURES = Path(__file__).parent / "fixtures" / "flax"
NAMES = ["linen_cnn", "linen_vit"]


def fixture(name: str) -> tuple[onnx.ModelProto, dict, list[Leaf]]:
    record = json.loads((FIXTURES / f"{name}.json").read_text())
    leaves = [Leaf(d["path"], tuple(d["shape"]), d["offset"]) for d in record["leaves"]]
    return onnx.load(FIXTURES / f"{name}.onnx"), record, leaves


def recorded(record: dict) -> list[Match]:
    return [Match(m["tensor"], m["leaf"], tuple(m["transpose"]) if isinstance(m["transpose"], list)
                  else m["transpose"]) for m in record["matches"]]


def load_module(path: Path):
    """A fixture's Python file as a module (registered: linen modules are dataclasses, which look
    their module up in ``sys.modules``)."""
    name = f"flax_fixture_{path.parent.name}_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


# -- the committed fixtures: the mapping without JAX ------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_fixture_mapping_by_markers(name):
    model, record, leaves = fixture(name)
    tensors = list(resolve_shared(convert(model, name=name)))
    matches = match_leaves(model, leaves, tensors)
    assert matches == recorded(record)
    assert {m.tensor for m in matches} == set(tensors)  # every predicted tensor has its leaf
    kinds = {m.transpose for m in matches}
    assert (3, 2, 0, 1) in kinds  # conv kernels: HWIO stored as OIHW
    # the real values go into each tensor in its layout, and come back out of it unchanged
    rng = np.random.default_rng(0)
    values = [rng.standard_normal(leaf.shape).astype(np.float32) for leaf in leaves]
    real = substitute(model, leaves, values)
    stored = stored_tensors(real)
    marked = {t: numpy_helper.to_array(p).view(np.uint32).astype(np.int64) - 0x0D800000
              for t, p in stored_tensors(model).items() if t in {m.tensor for m in matches}}
    by_path = {leaf.path: (leaf, v) for leaf, v in zip(leaves, values)}
    for m in matches:
        leaf, value = by_path[m.leaf]
        stored_value = numpy_helper.to_array(stored[m.tensor])
        if isinstance(m.transpose, tuple):
            np.testing.assert_array_equal(stored_value, value.transpose(m.transpose))
        np.testing.assert_array_equal(to_leaf(stored_value, marked[m.tensor], leaf), value)


def test_fixture_vit_attention_kernels_are_reshaped():
    _, record, _ = fixture("linen_vit")
    query = [m for m in recorded(record) if m.leaf.endswith("query/kernel")]
    assert len(query) == 2 and all(m.transpose == "reshaped" for m in query)  # (D, heads, D/heads) as (D, D)


def synthetic(leaves: list[Leaf], tensors: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A model storing ``tensors`` (marker indices) as initializers, read by one Add each."""
    flat = np.concatenate([m.ravel() for m in markers(leaves)])
    inits = [numpy_helper.from_array(flat[idx].astype(np.float32), name) for name, idx in tensors.items()]
    nodes = [helper.make_node("Add", ["x", name], [f"y{i}"]) for i, name in enumerate(tensors)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [6])],
                              [helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, [6])
                               for i in range(len(tensors))], inits)
    return helper.make_model(graph)


def test_match_leaves_refusals():
    leaves = [Leaf("a", (2, 3), 0), Leaf("b", (6,), 6)]
    whole_a = np.arange(6).reshape(3, 2)  # not a transpose of (2, 3), another order
    model = synthetic(leaves, {"t_a": whole_a, "t_mix": np.arange(3, 9), "t_part": np.arange(6, 9),
                               "t_b": np.arange(6, 12), "t_b2": np.arange(11, 5, -1), "const": np.arange(6)})
    model.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.full(6, 1.0, np.float32), "const"))
    assert match_leaves(model, leaves, ["t_a"]) == [Match("t_a", "a", "reshaped")]
    assert match_leaves(model, leaves, ["t_b2"]) == [Match("t_b2", "b", "reordered")]
    with pytest.raises(GhnOnnxError, match=r"'t_mix' \(6,\) holds part of 'a', 'b', not one whole variable"):
        match_leaves(model, leaves, ["t_mix"])
    with pytest.raises(GhnOnnxError, match=r"'t_part' \(3,\) holds part of 'b'"):
        match_leaves(model, leaves, ["t_part"])
    with pytest.raises(GhnOnnxError, match=r"'t_b', 't_b2' are all predictions for 'b'"):
        match_leaves(model, leaves, ["t_b", "t_b2"])
    with pytest.raises(GhnOnnxError, match=r"3 predicted tensor\(s\).*'const' holds no variable's values"):
        match_leaves(model, leaves, ["const", "t_mix", "t_part"])


# -- live models: JAX, Flax and jax2onnx (the dev extra: imported, never skipped) -------------------

@pytest.fixture(scope="module")
def ghn():
    return ghn_onnx.load_ghn()


@pytest.fixture(scope="module")
def linen():
    return load_module(FIXTURES / "models_linen.py")


@pytest.fixture(scope="module")
def live(linen):
    """name → (module, variables, apply_kwargs), ``init`` compiled once per model."""
    import jax

    out = {}
    for name, factory in (("linen_cnn", linen.CNN), ("linen_vit", linen.ViT)):
        module, kwargs = factory(), fixture(name)[1]["apply_kwargs"]
        x = np.zeros((2, 32, 32, 3), np.float32)
        out[name] = module, jax.jit(lambda k, x: module.init(k, x, **kwargs))(jax.random.key(0), x), kwargs
    return out


def onnx_forward(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def leaves_of(tree) -> dict[str, np.ndarray]:
    import jax

    from ghn_onnx.flax import _path

    return {_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_report(before: dict, after: dict, report, calibrated: bool) -> None:
    """Every predicted tensor in one leaf, every leaf accounted for once, values as in the ONNX."""
    pred = report.prediction
    assert {m.tensor for m in report.predicted.values()} == set(resolve_shared(pred.graph))
    assert len(report.predicted) == pred.predicted_tensors
    groups = [set(report.predicted), set(report.kept), set(report.statistics)]
    assert set().union(*groups) == set(before) and sum(map(len, groups)) == len(before)
    stored = stored_tensors(pred.model)
    for path, m in report.predicted.items():
        value = numpy_helper.to_array(stored[m.tensor])
        if isinstance(m.transpose, tuple):
            np.testing.assert_array_equal(value, after[path].transpose(m.transpose))
        else:
            np.testing.assert_array_equal(value.ravel(), after[path].ravel())
        assert not np.array_equal(after[path], before[path])
    for path in report.kept:
        np.testing.assert_array_equal(after[path], before[path])
    for path in report.statistics:
        assert calibrated and not np.array_equal(after[path], before[path])
    assert {a.dtype for a in after.values()} == {b.dtype for b in before.values()}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_linen_forward_equals_the_predicted_onnx(name, ghn, live, shared_dir):
    import jax

    from ghn_onnx.flax import init

    module, variables, kwargs = live[name]
    record = fixture(name)[1]
    x = np.zeros((2, 32, 32, 3), np.float32)
    before = leaves_of(variables)
    calibrated = "batch_stats" in variables
    options = {"calibrate": shared_dir / "data" / "cifar10-jpeg.zip", "calibration_images": 16,
               "calibration_batch": 8} if calibrated else {}
    new, report = init(module, variables, x, checkpoint=ghn, apply_kwargs=kwargs, return_report=True, **options)
    assert leaves_of(variables).keys() == before.keys()
    assert all(np.array_equal(v, before[k]) for k, v in leaves_of(variables).items())  # input untouched
    after = leaves_of(new)
    check_report(before, after, report, calibrated)
    assert sorted(recorded(record), key=lambda m: m.leaf) == sorted(report.predicted.values(), key=lambda m: m.leaf)
    if calibrated:  # an NHWC model calibrated from the image zip
        assert report.bn_status == "calibrated:16" and report.kept == {}
        assert sorted(report.statistics) == sorted(p for p in before if p.startswith("batch_stats/"))
    else:
        assert report.bn_status == "none" and report.kept == {} and report.statistics == []
    xs = np.random.default_rng(1).standard_normal((3, 32, 32, 3)).astype(np.float32)
    flax_forward = jax.jit(lambda v, x: module.apply(v, x, **kwargs))
    np.testing.assert_allclose(np.asarray(flax_forward(new, xs)), onnx_forward(report.prediction.model, xs),
                               rtol=1e-4, atol=1e-4)
    assert report.format().startswith(f"predicted {len(report.predicted)} of {len(before)} leaves")


@pytest.mark.slow
def test_nnx_model_calibrated_on_an_array(ghn):
    """nnx: a new model comes back, the one given keeps its state; BN statistics from an array."""
    import jax
    from flax import nnx

    from ghn_onnx.flax import init

    models_flax = load_module(Path(__file__).parent / "fixtures" / "frameworks" / "models_flax.py")
    model = models_flax.CNN(rngs=nnx.Rngs(0))
    before = leaves_of(nnx.state(model))
    data = np.random.default_rng(2).standard_normal((8, 16, 16, 3)).astype(np.float32)
    new, report = init(model, None, data[:2], checkpoint=ghn, calibrate=data, calibration_batch=4, return_report=True)
    assert type(new) is type(model) and new is not model
    assert all(np.array_equal(v, before[k]) for k, v in leaves_of(nnx.state(model)).items())
    after = leaves_of(nnx.state(new))
    check_report(before, after, report, True)
    assert report.bn_status == "calibrated:8" and sorted(report.statistics) == ["bn1/mean", "bn1/var", "bn2/mean",
                                                                                "bn2/var"]
    xs = np.random.default_rng(3).standard_normal((3, 16, 16, 3)).astype(np.float32)
    graphdef, state = nnx.split(new)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))  # one compilation, not one per op
    np.testing.assert_allclose(np.asarray(forward(state, xs)), onnx_forward(report.prediction.model, xs),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(GhnOnnxError, match="an nnx model holds its own variables"):
        init(model, nnx.state(model), data[:2], checkpoint=ghn)


@pytest.mark.slow
def test_a_fresh_export_maps_as_the_fixture(live):
    """The committed fixtures still describe what jax2onnx writes (regenerate them otherwise)."""
    maker = load_module(FIXTURES / "make_fixtures.py")
    for name in NAMES:
        _, record = maker.mapping(name, live[name][1])
        assert record == fixture(name)[1], f"{name}: run tests/fixtures/flax/make_fixtures.py"


@pytest.mark.slow
def test_unmatched_predictions_are_errors(ghn, linen):
    import jax

    from ghn_onnx.flax import init

    module = linen.NormWithoutParameters()
    x = np.zeros((2, 8, 8, 3), np.float32)
    variables = jax.jit(module.init)(jax.random.key(0), x)
    # the BN scale and shift are constants of the export: the GHN predicts them, no leaf holds them
    with pytest.raises(GhnOnnxError, match=r"2 predicted tensor\(s\) cannot be copied into the variables: "
                                           r".*holds no variable's values"):
        init(module, variables, x, checkpoint=ghn)


@pytest.mark.slow
def test_bad_calls_are_refused(ghn, live):
    from ghn_onnx.flax import init

    module, variables, _ = live["linen_cnn"]
    x = np.zeros((1, 32, 32, 3), np.float32)
    with pytest.raises(TypeError, match="unfold_bn"):
        init(module, variables, x, unfold_bn=True)
    with pytest.raises(TypeError, match="unknown option"):
        init(module, variables, x, calibration_imgs=3)
    with pytest.raises(GhnOnnxError, match="Expected the variables of CNN"):
        init(module, None, x)
    with pytest.raises(GhnOnnxError, match="Expected example_input as an array"):
        init(module, variables, "x.png", checkpoint=ghn)
    # train=True: jax2onnx exports BatchNorm in inference form all the same, but the Flax forward
    # updates batch_stats, which apply refuses without mutable=
    with pytest.raises(GhnOnnxError, match="CNN: the Flax forward failed: .*batch_stats"):
        init(module, variables, x, checkpoint=ghn, apply_kwargs={"train": True})


@pytest.mark.slow
def test_readme_example_runs(shared_dir):
    import doctest

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## Back into your framework\n", 1)[1].split("\n## ", 1)[0]
    text = section.split("\n### Flax / JAX\n", 1)[1].split("\n### ", 1)[0]
    text = text.replace('"../shared/', f'"{shared_dir}/')  # README paths are from a checkout's root
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(parser.get_doctest(text, {"__name__": "readme_flax"}, "README.md: Back into your framework: Flax / JAX",
                                  "README.md", 0))
    result = runner.summarize(verbose=False)
    assert result.attempted >= 6 and result.failed == 0


@pytest.fixture
def tiny_cifar(tmp_path, monkeypatch):
    """A CIFAR-10-shaped zip: 16 training and 8 test images (32x32 PNG) over the 10 classes."""
    import io
    import zipfile

    from PIL import Image

    from ghn_onnx.training.datasets import CLASSES

    monkeypatch.setenv("GHN_ONNX_CACHE", str(tmp_path / "cache"))  # load_cifar10 caches decoded sets
    path, rng = tmp_path / "cifar.zip", np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as zf:
        for split, n in (("train", 16), ("test", 8)):
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
                zf.writestr(f"{split}/{CLASSES[i % 10]}/{i}.png", buf.getvalue())
    return path


@pytest.mark.slow
def test_example_runs_at_tiny_size(tiny_cifar, tmp_path):
    from click.testing import CliRunner

    from ghn_onnx.examples.flax_init import main

    args = ["--data", str(tiny_cifar), "--width", "4", "--calibration-images", "8", "--test-images", "8",
            "--steps", "2", "--batch-size", "4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "Flax CNN (width 4)" in result.output and "BN calibrated:8" in result.output
    rows = [line.split() for line in result.output.splitlines() if line.strip().startswith(("GHN", "default"))]
    assert [r[:2] for r in rows] == [["GHN", "init"], ["default", "init"]] and all(r[-1].endswith("%") for r in rows)
    missing = CliRunner().invoke(main, ["--data", str(tmp_path / "none.zip")])
    assert missing.exit_code == 2 and "no such CIFAR-10 folder" in missing.output


@pytest.mark.slow
def test_calibrate_alone_sets_only_the_statistics(live):
    """``calibrate``: the BN statistics are the batch moments of the data (one BN input is the
    image conv: its mean and population variance), the parameters stay."""
    import jax

    from ghn_onnx.flax import calibrate

    module, variables, kwargs = live["linen_cnn"]
    data = np.random.default_rng(4).standard_normal((6, 32, 32, 3)).astype(np.float32)
    new = calibrate(module, variables, data[:2], data, apply_kwargs=kwargs, calibration_batch=3)
    before, after = leaves_of(variables), leaves_of(new)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed == {p for p in before if p.startswith("batch_stats/")}
    y = jax.lax.conv_general_dilated(data, before["params/Conv_0/kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + before["params/Conv_0/bias"]
    y = np.asarray(y, np.float64)
    np.testing.assert_allclose(after["batch_stats/BatchNorm_0/mean"], y.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(after["batch_stats/BatchNorm_0/var"], y.var((0, 1, 2)), rtol=1e-4, atol=1e-5)


def test_the_package_exposes_the_submodule():
    import ghn_onnx.flax as flax_module

    assert ghn_onnx.flax is flax_module and Match.__module__ == "ghn_onnx.flax"
