"""GHN-3 into every framework: README's "GHN-3 in every framework" examples run as they are, with
``checkpoint="ghn3-t"`` resolved by name from a ``$GHN_ONNX_HOME`` cache that holds a GHN-3-T built
offline from the parity fixture's weights (``ghn3_random_T.npz``: the released file's keys and
shapes, random values, converted by ``ghn-onnx convert-checkpoint`` as the offline message says).
After each example: every predicted tensor was assigned to the framework's variable, and the
framework's forward equals onnxruntime on the predicted ONNX model."""

from __future__ import annotations

import doctest
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from ghn_onnx.cli import main
from ghn_onnx.ghn import registry
from ghn_onnx.onnx_io.storage import stored_tensors
from ghn_onnx.writeback.write import resolve_shared

README = Path(__file__).resolve().parents[1] / "README.md"
FRAMEWORKS = ["torch", "keras", "flax"]  # the order of the section's examples

# Keras's numpy conversion of torch tensors warns about numpy 2's copy keyword, once per weight.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def ghn3_cache(shared_dir, tmp_path_factory):
    """``$GHN_ONNX_HOME`` with ``ghn3-t`` cached, offline: a name that is not cached fails, nothing downloads."""
    home = tmp_path_factory.mktemp("ghn_onnx_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GHN_ONNX_HOME", str(home))
        mp.setenv("GHN_ONNX_OFFLINE", "1")
        target = registry.cached_path(registry.CHECKPOINTS["ghn3-t"])
        target.parent.mkdir(parents=True)
        weights = shared_dir / "reference" / "ghn3-parity" / "ghn3_random_T.npz"
        res = CliRunner().invoke(main, ["convert-checkpoint", str(weights), "-o", str(target)])
        assert res.exit_code == 0 and "GHN-3-T" in res.output, res.output
        assert registry.resolve("ghn3-t") == target
        yield home


def examples() -> list[str]:
    """The section's ``python`` blocks, one per framework."""
    text = README.read_text().split("\n### GHN-3 in every framework\n", 1)[1]
    text = text.split("\n## ", 1)[0].split("\n### ", 1)[0]
    blocks = [b.split("\n```", 1)[0] for b in text.split("```python\n")[1:]]
    assert len(blocks) == len(FRAMEWORKS), "expected one example per framework"
    return blocks


def run_example(framework: str) -> dict:
    """Run the README example of ``framework`` as a doctest; its variables afterwards."""
    test = doctest.DocTestParser().get_doctest(examples()[FRAMEWORKS.index(framework)], {},
                                               f"README.md: GHN-3 in every framework ({framework})", "README.md", 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test, clear_globs=False)
    result = runner.summarize(verbose=False)
    assert result.attempted >= 4 and result.failed == 0
    return test.globs


def onnx_forward(model, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # calibrated copies leave the old statistics unused: not news
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def assert_close(got, expected) -> None:
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=1e-4, atol=1e-4 * scale)


def check_assigned(report, values: dict[str, np.ndarray], to_stored) -> None:
    """Every tensor the GHN predicted is in the report, and the framework holds its value."""
    pred = report.prediction
    assert {m.tensor for m in report.predicted.values()} == set(resolve_shared(pred.graph))
    assert len(report.predicted) == pred.predicted_tensors > 0
    stored = stored_tensors(pred.model)
    for name, m in report.predicted.items():
        np.testing.assert_array_equal(np.ravel(to_stored(m, values[name])), numpy_helper.to_array(stored[m.tensor]).ravel())


def test_pytorch(ghn3_cache):
    import torch

    g = run_example("torch")
    resnet, report = g["resnet"], g["report"]
    params = {n: p.detach().numpy() for n, p in resnet.named_parameters()}
    check_assigned(report, params, lambda m, v: v.T if m.transposed else v)
    assert report.kept == {} and report.warnings == []  # a 1,000-class head: no classifier note
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = resnet.eval()(x).numpy()
    assert_close(onnx_forward(report.prediction.model, x.numpy()), expected)


def test_keras(ghn3_cache):
    os.environ["KERAS_BACKEND"] = "torch"
    import keras

    from ghn_onnx.keras import LAYOUTS

    assert keras.backend.backend() == "torch", "keras was imported on another backend before this test"
    g = run_example("keras")
    net, report = g["net"], g["report"]
    weights = {v.path: np.asarray(keras.ops.convert_to_numpy(v.value)) for v in net.weights}
    check_assigned(report, weights, lambda m, v: LAYOUTS[m.layout].to_onnx(v))
    # calibrated moving statistics are no longer Keras's 0 / 1 (their values: the forward check below)
    assert len(report.statistics) == 104
    assert not any(np.all(weights[n] == (0.0 if n.endswith("mean") else 1.0)) for n in report.statistics)
    assert any("has 10 outputs and the GHN 1000 classes" in w for w in report.warnings)
    x = np.random.default_rng(1).standard_normal((2, 224, 224, 3)).astype(np.float32)
    expected = keras.ops.convert_to_numpy(net(x, training=False))
    assert_close(onnx_forward(report.prediction.model, x), expected)


def test_flax(ghn3_cache):
    import jax

    from ghn_onnx.flax import _path

    g = run_example("flax")
    model, new, report = g["model"], g["new"], g["report"]
    leaves = {_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(new)[0]}
    check_assigned(report, leaves, lambda m, v: v.transpose(m.transpose) if isinstance(m.transpose, tuple) else v)
    assert set(report.predicted) | set(report.kept) | set(report.statistics) == set(leaves)
    x = np.random.default_rng(2).standard_normal((2, 224, 224, 3)).astype(np.float32)
    expected = np.asarray(model.apply(new, x, train=False))
    assert_close(onnx_forward(report.prediction.model, x), expected)
