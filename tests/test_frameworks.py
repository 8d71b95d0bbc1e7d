"""One architecture, three frameworks, one graph; and write-back that computes the same function.

The fixtures in ``fixtures/frameworks`` are real exports (PyTorch's two exporters, Keras 3 through
tf2onnx, Flax through jax2onnx) of the same small CNN and ViT (``models_*.py`` there, regenerated
by ``make_*.py``). These tests only read the committed ONNX files: neither TensorFlow nor JAX is
needed to run them.

Write-back equivalence: a fixed random GHN predicts every graph on its own; the predictions are
written into each export and the exports run in onnxruntime. Because the graphs are the same up to
node order, the GHN predicts the same values for the same layer in every framework, and the
exports must then compute the same logits. BatchNorm statistics are set to the identity
(mean 0, var 1 - eps) where they are stored, so that a BN computes ``scale * x + bias`` exactly
like the ``Mul`` + ``Add`` that Keras exports in its place: writing a predicted (scale, bias) into
that pair *is* a BN with those statistics (see docs/coverage.md).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from reference_graphs import compare_structure, graph_structural_labels

from ghn_onnx.convert import convert
from ghn_onnx.onnx_io.loading import load_model
from ghn_onnx.ghn.config import GHNConfig
from ghn_onnx.ghn.model import GHN
from ghn_onnx.graph.graph import Graph
from ghn_onnx.graph.primitives import Primitive
from ghn_onnx.writeback.write import write_predictions

FIXTURES = Path(__file__).parent / "fixtures" / "frameworks"
# The same network, exported by different frameworks / exporters; the first is the reference.
SAME_NETWORK = {
    "cnn": ["torch_cnn", "keras_cnn", "flax_cnn"],
    "vit": ["torch_vit", "keras_vit", "flax_vit", "torch_vit_sdpa_dynamo"],
}
PAIRS = [(arch, other) for arch, names in SAME_NETWORK.items() for other in names[1:]]
ALL_FIXTURES = sorted(p.stem for p in FIXTURES.glob("*.onnx"))
# What each architecture's graph holds (any framework).
EXPECTED_COUNTS = {
    "cnn": {"input": 1, "conv": 5, "bias": 5, "bn": 2, "sum": 1, "cse": 1, "glob_avg": 1},
    "vit": {"input": 1, "conv": 14, "bias": 14, "pos_enc": 1, "sum": 5, "ln": 5, "msa": 2, "glob_avg": 1},
}


def graph_of(name: str) -> Graph:
    return convert(load_model(FIXTURES / f"{name}.onnx"), name=name)


@pytest.fixture(scope="module")
def ghn() -> GHN:
    torch.manual_seed(0)
    return GHN(GHNConfig()).eval()


def predict(ghn: GHN, graph: Graph) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {k: v.numpy() for k, v in ghn([graph])[0].items()}


# -- one graph ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(SAME_NETWORK))
def test_every_export_has_the_expected_primitives(arch):
    for name in SAME_NETWORK[arch]:
        g = graph_of(name)
        assert g.counts() == EXPECTED_COUNTS[arch], name
        assert g.unsupported == {} and g.warnings == [], name


@pytest.mark.parametrize("arch, other", PAIRS)
def test_same_network_same_graph(arch, other):
    reference = graph_of(SAME_NETWORK[arch][0])
    assert compare_structure(reference, graph_of(other)) == []


def test_structure_comparison_sees_a_different_network():
    assert compare_structure(graph_of("torch_cnn"), graph_of("torch_cnn_dynamo"))  # BN folded away
    assert compare_structure(graph_of("torch_cnn"), graph_of("torch_vit"))


@pytest.mark.parametrize("arch, other", PAIRS)
def test_same_graph_same_predictions(ghn, arch, other):
    """Node for node, the GHN predicts the same tensors for every framework's export."""
    a, b = graph_of(SAME_NETWORK[arch][0]), graph_of(other)
    pa, pb = predict(ghn, a), predict(ghn, b)
    by_label = _params_by_label(a, pa)
    for label, node in zip(graph_structural_labels(b), b.nodes):
        for ref in node.params:
            expected = by_label[label][ref.role]
            np.testing.assert_allclose(pb[ref.tensor], expected, rtol=1e-5, atol=1e-6,
                                       err_msg=f"{other}: {ref.tensor} ({label}, {ref.role})")


def _params_by_label(graph: Graph, predictions) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    for label, node in zip(graph_structural_labels(graph), graph.nodes):
        for ref in node.params:
            out[label][ref.role] = predictions[ref.tensor]
    return out


# -- write-back ---------------------------------------------------------------------------------

def predicted_model(ghn: GHN, name: str) -> tuple[onnx.ModelProto, Graph, dict[str, np.ndarray]]:
    model = load_model(FIXTURES / f"{name}.onnx")
    graph = convert(model, name=name)
    predictions = predict(ghn, graph)
    return write_predictions(model, graph, predictions), graph, predictions


def identity_bn_statistics(model: onnx.ModelProto) -> onnx.ModelProto:
    """Running mean 0 and variance 1 - eps in every BatchNormalization: BN(x) = scale * x + bias."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        for name, value in ((node.input[3], 0.0), (node.input[4], 1.0 - eps)):
            t = inits[name]
            t.CopyFrom(numpy_helper.from_array(np.full(tuple(t.dims), value, np.float32), name))
    return model


def run(model: onnx.ModelProto, x_nchw: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    nhwc = inp.shape[-1] == 3
    return session.run(None, {inp.name: x_nchw.transpose(0, 2, 3, 1) if nhwc else x_nchw})[0]


@pytest.mark.parametrize("arch, other", PAIRS)
def test_written_exports_compute_the_same_function(ghn, arch, other):
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    ref = run(identity_bn_statistics(predicted_model(ghn, SAME_NETWORK[arch][0])[0]), x)
    out = run(identity_bn_statistics(predicted_model(ghn, other)[0]), x)
    assert np.ptp(ref, axis=0).max() > 1e-3  # the logits depend on the input: a meaningful check
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_exports_differ_before_write_back():
    """The check above is not vacuous: the exported random weights disagree."""
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    a = run(load_model(FIXTURES / "torch_cnn.onnx"), x)
    b = run(load_model(FIXTURES / "keras_cnn.onnx"), x)
    assert not np.allclose(a, b, atol=1e-2)


def test_keras_bn_write_back_fills_the_mul_and_add(ghn):
    """A Keras BN is read from its Mul + Add: the predicted scale lands in the Mul's (1, C, 1, 1)
    constant and the predicted bias in the Add's, so it computes scale * x + bias."""
    written, graph, predictions = predicted_model(ghn, "keras_cnn")
    inits = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    bns = [n for n in graph.nodes if n.primitive is Primitive.BN]
    assert len(bns) == 2
    for node in bns:
        scale, bias = node.params
        assert (scale.role, bias.role) == ("scale", "bias")
        assert inits[scale.tensor].shape == scale.stored_shape == (1, 8, 1, 1)
        np.testing.assert_array_equal(inits[scale.tensor].reshape(-1), predictions[scale.tensor])
        np.testing.assert_array_equal(inits[bias.tensor].reshape(-1), predictions[bias.tensor])


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_write_back_round_trips_in_every_layout(ghn, name):
    """Written tensors read back (through each tensor's layout) to exactly the predictions."""
    written, graph, predictions = predicted_model(ghn, name)
    stored = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert predictions
    for node in graph.nodes:
        for ref in node.params:
            np.testing.assert_array_equal(ref.layout.to_canonical(stored[ref.tensor]), predictions[ref.tensor],
                                          err_msg=f"{name}: {ref.tensor} ({ref.layout.describe()})")
    assert compare_structure(graph, convert(written)) == []
