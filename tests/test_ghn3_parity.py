"""GHN-3-T, and GHN-2 in its ImageNet configuration, against the reference fixtures of
``<shared>/reference/ghn3-parity``: the graph (node types, parameter-to-node assignment, one-hop
and virtual edges, shape-vocabulary rows, degrees and input distances, classifier nodes) and every
predicted tensor (norm to a relative 1e-4, recorded values to an absolute 1e-4; the random
class-token positions of a ViT positional embedding excepted, as the fixtures' README says)."""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_graphs import _labels, compare, load_reference

from ghn_onnx.convert import convert_file
from ghn_onnx.convert.rules import RULE_SETS, PoolBeforeConvClassifier
from ghn_onnx.ghn import GHN, reference_formats
from ghn_onnx.ghn.config import CHOICES
from ghn_onnx.ghn.decode.rules import DECODE_RULES, DecodeSpec, classifier_nodes, decoded_taps
from ghn_onnx.ghn.hypernet.transformer import dense_plan
from ghn_onnx.ghn.model import HYPERNETS
from ghn_onnx.graph.batch import GraphBatch
from ghn_onnx.graph.graph import Graph, Node, ParamRef
from ghn_onnx.graph.primitives import Primitive

GHN3_MODELS = ("resnet18", "mobilenet_v3_small", "squeezenet1_1", "regnet_y_400mf", "efficientnet_b0", "vit_mini")
TOLERANCE = 1e-4


@pytest.fixture(scope="session")
def ghn3_dir(shared_dir: Path) -> Path:
    path = shared_dir / "reference" / "ghn3-parity"
    if not (path / "ghn3_random_T.npz").is_file():
        pytest.fail(f"GHN-3 parity fixtures not found at {path}: set GHN_ONNX_SHARED to the shared data folder",
                    pytrace=False)
    return path


@pytest.fixture(scope="module")
def ghn3(ghn3_dir):
    ghn, inferred = reference_formats.load(ghn3_dir / "ghn3_random_T.npz")
    assert inferred.describe() == "GHN-3-T"
    return ghn


@pytest.fixture(scope="module")
def ghn2_imagenet(ghn3_dir):
    ghn, inferred = reference_formats.load(ghn3_dir / "ghn2-imagenet" / "ghn2_random_imagenet.npz")
    assert inferred.describe() == "GHN-2-ImageNet"
    return ghn


@functools.lru_cache(maxsize=None)
def _graph(path: str, rules: str) -> Graph:
    return convert_file(path, rules=rules)


def graph_of(ghn3_dir: Path, name: str, rules: str = "ghn3") -> Graph:
    return _graph(str(ghn3_dir / f"{name}.onnx"), rules)


# -- comparisons -----------------------------------------------------------------------------------

def prediction_problems(pred: dict[str, torch.Tensor], expected, graph: Graph) -> tuple[list[str], float]:
    """Differences between predictions (canonical shapes, written back to the stored layout) and a
    reference ``.expected.npz``, and the largest absolute difference over the recorded values."""
    stored = {p.tensor: p for p in graph.predicted_tensors()}
    names = sorted({k.split("::")[0] for k in expected.files})
    problems, worst = [], 0.0
    if set(pred) != set(names):
        problems.append(f"tensors differ: extra {sorted(set(pred) - set(names))[:3]}, "
                        f"missing {sorted(set(names) - set(pred))[:3]}")
    for name in names:
        if name not in pred:
            continue
        v = stored[name].layout.to_stored(pred[name].detach().cpu().numpy())
        if tuple(v.shape) != tuple(expected[f"{name}::shape"]):
            problems.append(f"{name}: shape {v.shape} != {tuple(expected[f'{name}::shape'])}")
            continue
        flat = v.ravel().astype(np.float64)
        keep = np.ones(flat.size, dtype=bool)
        norm_key = f"{name}::norm"
        if f"{name}::random_index" in expected.files:
            keep[expected[f"{name}::random_index"]] = False
            norm_key = f"{name}::norm_nonrandom"
        norm, got = float(expected[norm_key]), float(np.linalg.norm(flat[keep]))
        if abs(got - norm) > TOLERANCE * max(norm, 1e-12):
            problems.append(f"{name}: norm {got} != {norm}")
        index = expected[f"{name}::index"] if f"{name}::index" in expected.files else np.arange(flat.size)
        diff = float(np.abs(flat[index] - expected[f"{name}::values"].ravel()).max())
        worst = max(worst, diff)
        if diff > TOLERANCE:
            problems.append(f"{name}: values differ by {diff}")
    return problems, worst


def node_fields(graph: Graph, ghn: GHN, structure: bool) -> Counter:
    """Per node (identified as in :func:`reference_graphs.compare`): the shape-vocabulary rows,
    the tensors it predicts, and with ``structure`` the transformer's in/out degree and input
    distance, as the reference's ``graph.json`` records them."""
    labels = _labels([n.primitive.label for n in graph.nodes], [n.name for n in graph.nodes],
                     [tuple(e) for e in graph.edges.tolist()])
    plan = dense_plan(GraphBatch.build([graph]), "cpu")
    out = Counter()
    for i, n in enumerate(graph.nodes):
        fields = (repr(labels[i]), tuple(ghn.shape_enc.indices(n.shape4d)), tuple(sorted(p.tensor for p in n.params)))
        if structure:
            fields += (int(plan.in_degree[0, i]), int(plan.out_degree[0, i]), int(plan.input_dist[0, i]))
        out[fields] += 1
    return out


def reference_fields(ref: dict, structure: bool) -> Counter:
    labels = _labels([n["type"] for n in ref["nodes"]], [n["param"] for n in ref["nodes"]],
                     [tuple(e) for e in ref["edges"]])
    out = Counter()
    for i, n in enumerate(ref["nodes"]):
        fields = (repr(labels[i]), tuple(n["shape_ind"]), tuple(sorted(n["predicts"])))
        if structure:
            fields += (n["in_degree"], n["out_degree"], n["input_dist"])
        out[fields] += 1
    return out


def classifier_names(graph: Graph) -> list[str]:
    return [graph.nodes[i].name for i in classifier_nodes(graph) if i is not None]


def reference_classifier(ref: dict) -> list[str]:
    """The reference's classifier nodes: group keys ``(o, i)`` (weight) and ``(o, -1)`` (bias)."""
    return [n["param"] for n in ref["nodes"] if n["key"] is not None and len(n["key"]) == 2 and n["key"][1] != 0]


# -- the fixture list and the configurations -----------------------------------------------------

def test_the_parametrized_list_is_the_fixture_list(ghn3_dir):
    config = json.loads((ghn3_dir / "config.json").read_text())
    assert sorted(config["models"]) == sorted(GHN3_MODELS)


def test_rule_set_names_agree_everywhere():
    assert tuple(HYPERNETS) == CHOICES["hypernet"]
    assert tuple(RULE_SETS) == tuple(DECODE_RULES) == CHOICES["rules"]


@pytest.mark.parametrize("weights, config_file", [("ghn3_random_T.npz", "config.json"),
                                                  ("ghn2-imagenet/ghn2_random_imagenet.npz", "ghn2-imagenet/config.json")])
def test_inferred_configuration_is_the_fixtures(ghn3_dir, weights, config_file):
    ref = json.loads((ghn3_dir / config_file).read_text())["ghn_config"]
    inferred = reference_formats.load(ghn3_dir / weights)[1].config
    assert list(inferred.max_shape) == ref["max_shape"]
    for key in ("num_classes", "hid", "weight_norm", "ve", "layernorm", "layers", "heads"):
        if key in ref:
            assert getattr(inferred, key) == ref[key], key
    assert (inferred.hypernet, inferred.rules) == (("gatedgnn", "ghn2") if "hypernet" in ref else ("transformer", "ghn3"))


def test_shape_vocabularies_are_the_fixtures(ghn3_dir, ghn3, ghn2_imagenet):
    vocab = json.loads((ghn3_dir / "config.json").read_text())["shape_vocabulary"]
    for ghn in (ghn3, ghn2_imagenet):
        channels, spatial = ghn.shape_enc.vocabulary_key()
        assert list(channels) == vocab["channels"] and list(spatial) == vocab["spatial"]
        assert ghn.shape_enc.embed_spatial.num_embeddings == vocab["spatial_rows"] == 11


# -- GHN-2, ImageNet configuration -----------------------------------------------------------------

def test_ghn2_imagenet_graph_matches_reference(ghn3_dir, ghn2_imagenet):
    graph = graph_of(ghn3_dir, "resnet18", "ghn2")
    ref = load_reference(ghn3_dir / "ghn2-imagenet" / "resnet18.graph.json")
    assert compare(graph, ref) == []
    assert len(graph) == len(ref["nodes"])
    assert node_fields(graph, ghn2_imagenet, structure=False) == reference_fields(ref, structure=False)
    assert classifier_names(graph) == reference_classifier(ref)


@pytest.mark.parametrize("sequential", [False, True], ids=["fast", "reference"])
def test_ghn2_imagenet_prediction_matches_reference(ghn3_dir, ghn2_imagenet, sequential):
    graph = graph_of(ghn3_dir, "resnet18", "ghn2")
    with torch.no_grad():
        pred = ghn2_imagenet([graph], sequential=sequential)[0]
    problems, worst = prediction_problems(pred, np.load(ghn3_dir / "ghn2-imagenet" / "resnet18.expected.npz"), graph)
    assert problems == [] and worst < TOLERANCE


# -- GHN-3-T: graphs -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", GHN3_MODELS)
def test_ghn3_graph_matches_reference(ghn3_dir, ghn3, name):
    graph = graph_of(ghn3_dir, name)
    ref = load_reference(ghn3_dir / f"{name}.graph.json")
    assert compare(graph, ref) == []
    assert len(graph) == len(ref["nodes"]) and graph.nodes[0].primitive is Primitive.INPUT
    assert node_fields(graph, ghn3, structure=True) == reference_fields(ref, structure=True)
    assert classifier_names(graph) == reference_classifier(ref)
    dist = graph.distances()
    assert int(dist.sum()) == ref["sum_dist_with_virtual"] and int(dist.max()) == ref["max_dist"]


def test_squeezenet_reads_differently_under_the_two_rule_sets(ghn3_dir):
    """GHN-3 moves the final pooling before the 1×1-conv classifier and decodes it as the
    classifier; GHN-2's reading keeps the pooling last and the conv 4-D."""
    g2, g3 = graph_of(ghn3_dir, "squeezenet1_1", "ghn2"), graph_of(ghn3_dir, "squeezenet1_1", "ghn3")
    assert [n.primitive.label for n in g2.nodes[-3:]] == ["conv", "bias", "glob_avg"]
    assert [n.primitive.label for n in g3.nodes[-3:]] == ["glob_avg", "conv", "bias"]
    assert classifier_nodes(g2) == (None, None)
    head = g3.nodes[-2]
    assert head.shape == (1000, 512) and head.params[0].stored_shape == (1000, 512, 1, 1)
    assert head.params[0].layout.to_stored(np.zeros((1000, 512), np.float32)).shape == (1000, 512, 1, 1)
    assert len(g2) == len(g3)


def _conv_head_chain(kernel: int, pooled_last: bool = True, bias: bool = True) -> Graph:
    """input → conv 3×3 → conv (10, 8, k, k) [→ bias] → glob_avg (or glob_avg first)."""
    def conv(name, shape):
        return Node(Primitive.CONV, name, shape, (ParamRef(name, "weight", shape, 1),))

    nodes = [Node(Primitive.INPUT, "input"), conv("c0.weight", (8, 3, 3, 3))]
    tail = [conv("head.weight", (10, 8, kernel, kernel))]
    if bias:
        tail.append(Node(Primitive.BIAS, "head.bias", (10,), (ParamRef("head.bias", "bias", (10,), 1),)))
    pool = Node(Primitive.GLOB_AVG, "gap")
    nodes += tail + [pool] if pooled_last else [pool] + tail
    return Graph(nodes, [(i, i + 1) for i in range(len(nodes) - 1)], name="head")


@pytest.mark.parametrize("bias", [True, False])
def test_pool_before_conv_classifier_positive(bias):
    rewrite = PoolBeforeConvClassifier()
    graph = _conv_head_chain(1, bias=bias)
    found = rewrite.match(graph)
    assert found is not None
    out = RULE_SETS["ghn3"].apply(graph)
    assert [n.name for n in out.nodes] == ["input", "c0.weight", "gap", "head.weight"] + (["head.bias"] if bias else [])
    assert out.edges.tolist() == [[i, i + 1] for i in range(len(out.nodes) - 1)]
    assert out.nodes[3].shape == (10, 8) and out.nodes[3].params[0].canonical_shape == (10, 8)
    assert RULE_SETS["ghn2"].apply(graph) is graph


@pytest.mark.parametrize("graph", [_conv_head_chain(3), _conv_head_chain(1, pooled_last=False)],
                         ids=["3x3-head", "already-pooled"])
def test_pool_before_conv_classifier_negative(graph):
    assert PoolBeforeConvClassifier().match(graph) is None
    assert RULE_SETS["ghn3"].apply(graph) is graph


def test_centre_taps_of_the_ghn3_rules():
    spec = DecodeSpec((64, 64, 16, 16), 1000, True, "ghn3")
    assert spec.rule_set.centre_taps and not DecodeSpec((64, 64, 16, 16), 1000, True).rule_set.centre_taps

    def taps(k):
        return decoded_taps(Node(Primitive.CONV, "w", (8, 8, k, k)), 16, centre=True)

    # rows [8 - k//2, 8 + ceil(k/2)): 1x1 tap 8; 3x3 [7, 10); 4x4 [6, 10); 7x7 [5, 12); 16x16 all
    assert [taps(k)[2] for k in (1, 3, 4, 7, 14, 16)] == [8, 7, 6, 5, 1, 0]
    assert taps(20) == (16, 16, 0, 0)
    assert decoded_taps(Node(Primitive.CONV, "w", (8, 8, 7, 7)), 16) == (7, 7, 0, 0)


# -- GHN-3-T: predictions ------------------------------------------------------------------------

@pytest.mark.parametrize("name", GHN3_MODELS)
def test_ghn3_prediction_matches_reference(ghn3_dir, ghn3, name):
    graph = graph_of(ghn3_dir, name)
    with torch.no_grad():
        pred = ghn3([graph])[0]  # the flat path: numba store
    problems, worst = prediction_problems(pred, np.load(ghn3_dir / f"{name}.expected.npz"), graph)
    assert problems == [] and worst < TOLERANCE


@pytest.mark.parametrize("name", ["vit_mini", "squeezenet1_1"])
def test_ghn3_reference_and_training_paths_match_too(ghn3_dir, ghn3, name):
    """``decode_tensors`` in both forms: GHN-3's own decoding of whole blocks (``sequential``)
    and the differentiable path, whose gradients reach the transformer's first layer."""
    graph = graph_of(ghn3_dir, name)
    expected = np.load(ghn3_dir / f"{name}.expected.npz")
    with torch.no_grad():
        ref = ghn3([graph], sequential=True)[0]
    assert prediction_problems(ref, expected, graph)[0] == []
    pred = ghn3([graph])[0]
    assert prediction_problems({k: v.detach() for k, v in pred.items()}, expected, graph)[0] == []
    sum(v.square().sum() for v in pred.values()).backward()
    grad = ghn3.gnn[0].attn.proj_e[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    ghn3.zero_grad()


def test_dense_batch_equals_single_graphs(ghn3_dir, ghn3):
    """Graphs of different sizes, smaller first, in one padded batch get what they get alone
    (GHN-3's unpadded-offset bug, GHN2_FACTS §7, would break the second and third)."""
    graphs = [graph_of(ghn3_dir, n) for n in ("vit_mini", "resnet18", "squeezenet1_1")]
    with torch.no_grad():
        torch.manual_seed(0)
        together = ghn3(graphs)
        torch.manual_seed(0)
        alone = [ghn3([g])[0] for g in graphs]
    for a, b in zip(together, alone):
        assert a.keys() == b.keys()
        for k in a:
            if k == "encoder.pos_embedding":  # the class token is drawn anew
                a[k], b[k] = a[k][:, 1:], b[k][:, 1:]
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_class_token_row_is_random_and_the_rest_is_not(ghn3_dir, ghn3):
    graph = graph_of(ghn3_dir, "vit_mini")
    expected = np.load(ghn3_dir / "vit_mini.expected.npz")
    with torch.no_grad():
        first, second = (ghn3([graph])[0]["encoder.pos_embedding"].numpy().ravel() for _ in range(2))
    differ = np.flatnonzero(first != second)
    assert differ.tolist() == expected["encoder.pos_embedding::random_index"].tolist() == list(range(64))
    assert 0.005 < first[:64].std() < 0.05  # N(0, 0.02)


def test_fused_attention_divergence(ghn3_dir, ghn3):
    """docs/divergences.md: under PyTorch 2.14 the unmodified reference loses ViT's msa nodes
    (its fused attention has no softmax node); we keep them, as it intended. So our graph is
    the softmax fixture's and differs from the fused one by exactly the two msa nodes, and so do
    the predictions (they are the softmax fixture's, checked above)."""
    graph = graph_of(ghn3_dir, "vit_mini")
    fused = load_reference(ghn3_dir / "ghn3-t-fused-attention" / "vit_mini.graph.json")
    assert len(graph) == len(fused["nodes"]) + 2
    extra_nodes = [p for p in compare(graph, fused) if p.startswith("extra node")]
    assert len(extra_nodes) == 2 and all("('msa'" in p for p in extra_nodes)
    assert not any(p.startswith("missing node") for p in compare(graph, fused))
    with torch.no_grad():
        pred = ghn3([graph])[0]
    problems, worst = prediction_problems(pred, np.load(ghn3_dir / "ghn3-t-fused-attention" / "vit_mini.expected.npz"),
                                          graph)
    assert problems and worst > 10 * TOLERANCE


def test_prediction_through_the_pipeline_reads_with_the_checkpoints_rules(ghn3_dir, ghn3):
    """``ghn_onnx.predict`` converts with the GHN's rule set (GHN-3's SqueezeNet classifier) and
    writes every tensor back in its stored layout."""
    import ghn_onnx
    from onnx import numpy_helper

    result = ghn_onnx.predict(ghn3_dir / "squeezenet1_1.onnx", ghn3)
    written = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    expected = np.load(ghn3_dir / "squeezenet1_1.expected.npz")
    names = sorted({k.split("::")[0] for k in expected.files})
    assert result.predicted_tensors == len(names)
    for name in names:
        v = written[name]
        assert v.shape == tuple(expected[f"{name}::shape"])
        index = expected[f"{name}::index"] if f"{name}::index" in expected.files else slice(None)
        assert np.abs(v.ravel()[index] - expected[f"{name}::values"].ravel()).max() < TOLERANCE, name


@pytest.mark.parametrize("ve", [True, False])
def test_flat_and_tensor_paths_agree_under_the_ghn3_rules(ve):
    """What no fixture has: kernels larger than s (16×16 with s = 11: resized bilinearly), a
    (1, T, C) token embedding with C > 64, odd channel counts, a smaller and a larger classifier;
    a small transformer with and without virtual edges. The flat path (numba store), the tensor
    path and GHN-3's whole-block decoding give the same values."""
    from ghn_graphs import assert_same_predictions, fresh_ghn, odd_shapes_graph, small_head_graph

    ghn = fresh_ghn("cpu", hid=32, layers=2, heads=4, hypernet="transformer", rules="ghn3", ve=ve)
    graphs = [odd_shapes_graph(), small_head_graph()]
    runs = []
    for grad, sequential in ((False, False), (True, False), (False, True)):
        torch.manual_seed(1)
        with torch.set_grad_enabled(grad):
            runs.append([{k: v.detach() for k, v in p.items()} for p in ghn(graphs, sequential=sequential)])
    for other in runs[1:]:
        assert_same_predictions(other, runs[0], rtol=1e-5, atol=1e-6)
    patch = runs[0][0]["patch.weight"]
    assert patch.shape == (130, 100, 16, 16) and not torch.equal(patch[..., :11, :11].repeat(1, 1, 2, 2)[..., :16, :16],
                                                                 patch)  # resized, not tiled
