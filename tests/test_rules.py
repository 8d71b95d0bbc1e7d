"""Converter rules on small hand-built ONNX models: each rule's positive and negative cases."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx_builders import conv_model, model, weights

from ghn_onnx.convert import convert
from ghn_onnx.errors import UnsupportedModelError
from ghn_onnx.graph.graph import Graph
from ghn_onnx.graph.primitives import Primitive


def types(graph: Graph) -> list[str]:
    return [n.primitive.label for n in graph.nodes]


def edges(graph: Graph) -> list[tuple[str, str]]:
    """Edges by node label (type, or parameter name where there is one)."""
    label = [n.name if n.params else n.primitive.label for n in graph.nodes]
    return sorted((label[s], label[d]) for s, d in graph.edges.tolist())


# -- linear layers ------------------------------------------------------------------------------

@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_weight_layout(trans_b):
    w = weights((5, 3) if trans_b else (3, 5))  # transB=1 stores (out, in); transB=0 stores (in, out)
    b = weights((5,), seed=1)
    gemm = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=trans_b)
    g = convert(model([gemm], {"x": [2, 3]}, ["y"], {"w": w, "b": b}))
    assert types(g) == ["input", "conv", "bias"]
    (wref,) = g.nodes[1].params
    canonical = wref.layout.to_canonical(w)
    np.testing.assert_array_equal(canonical, w if trans_b else w.T)
    assert g.nodes[1].shape == wref.canonical_shape == (5, 3)
    np.testing.assert_array_equal(wref.layout.to_stored(canonical), w)
    assert g.nodes[2].params[0].tensor == "b"


def test_matmul_then_add_is_a_linear_layer_then_its_bias():
    w, b = weights((3, 5)), weights((5,), seed=1)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    g = convert(model(nodes, {"x": [2, 3]}, ["y"], {"w": w, "b": b}))
    assert types(g) == ["input", "conv", "bias"]
    assert edges(g) == [("input", "w"), ("w", "b")]
    assert g.nodes[1].shape == (5, 3)
    np.testing.assert_array_equal(g.nodes[1].params[0].layout.to_canonical(w), w.T)


def test_add_after_a_layer_with_its_own_bias_is_not_another_bias():
    w, b, c = weights((5, 3)), weights((5,), seed=1), weights((5,), seed=2)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1), helper.make_node("Add", ["h", "c"], ["y"])]
    g = convert(model(nodes, {"x": [2, 3]}, ["y"], {"w": w, "b": b, "c": c}))
    assert types(g) == ["input", "conv", "bias"]
    assert g.unsupported == {"Add": ["c"]}


def test_dynamo_style_transpose_then_matmul_is_identity_overall():
    # The dynamo exporter stores a Linear weight as (out, in) and transposes it at run time.
    w = weights((5, 3))
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"])]
    g = convert(model(nodes, {"x": [2, 3]}, ["y"], {"w": w}))
    assert types(g) == ["input", "conv"]
    (ref,) = g.nodes[1].params
    assert ref.tensor == "w" and ref.stored_shape == (5, 3)
    assert ref.canonical_shape == g.nodes[1].shape == (5, 3)
    np.testing.assert_array_equal(ref.layout.to_canonical(w), w)
    np.testing.assert_array_equal(ref.layout.to_stored(w), w)


def test_matmul_of_two_activations_is_no_layer():
    w = weights((3, 3))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "x"], ["y"])]
    g = convert(model(nodes, {"x": [3, 3]}, ["y"], {"w": w}))
    assert types(g) == ["input", "conv"]


# -- convolutions -------------------------------------------------------------------------------

@pytest.mark.parametrize("attrs, primitive", [
    ({}, Primitive.CONV),
    ({"dilations": [2, 2]}, Primitive.CONV),                   # dilation alone: an ordinary conv
    ({"group": 8}, Primitive.SEP_CONV),                        # depthwise
    ({"group": 2}, Primitive.SEP_CONV),                        # grouped
    ({"group": 8, "dilations": [2, 2]}, Primitive.DIL_CONV),   # dilated depthwise
])
def test_conv_primitive(attrs, primitive):
    g = convert(conv_model(**attrs))
    node = g.nodes[1]
    assert node.primitive is primitive
    assert node.groups == attrs.get("group", 1)
    assert node.shape == (8, 8 // node.groups, 3, 3)


# -- parameter-free primitives ------------------------------------------------------------------

def test_add_of_one_merged_pool_with_itself_is_two_pools():
    # Two AvgPool modules on the same input, merged by the exporter: Add(p, p).
    w = weights((8, 3, 3, 3))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["c"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["p", "p"], ["y"])]
    g = convert(model(nodes, {"x": [1, 3, 8, 8]}, ["y"], {"w": w}))
    assert types(g).count("avg_pool") == 2
    assert types(g).count("sum") == 1
    assert edges(g) == [("avg_pool", "sum"), ("avg_pool", "sum"), ("input", "w"), ("w", "avg_pool"),
                        ("w", "avg_pool")]
    pools = [n for n in g.nodes if n.primitive is Primitive.AVG_POOL]
    assert all(p.shape == (1, 1, 3, 3) for p in pools)


def se_block(gate_input_is_squeezed: bool) -> list:
    """conv -> y, then y * sigmoid(...): an SE gate when the sigmoid reads a squeeze of y
    (mean -> 1x1 conv), SiLU when it reads y itself."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    if gate_input_is_squeezed:
        nodes += [helper.make_node("GlobalAveragePool", ["y"], ["m"]),
                  helper.make_node("Conv", ["m", "w_se"], ["e"]),
                  helper.make_node("Sigmoid", ["e"], ["s"])]
    else:
        nodes += [helper.make_node("Sigmoid", ["y"], ["s"])]
    nodes += [helper.make_node("Mul", ["y", "s"], ["z"]),
              helper.make_node("GlobalAveragePool", ["z"], ["out"])]
    return nodes


def test_silu_is_an_activation_not_cse():
    g = convert(model(se_block(False), {"x": [1, 3, 8, 8]}, ["out"], {"w": weights((8, 3, 3, 3))}))
    assert types(g) == ["input", "conv", "glob_avg"]


def test_squeeze_excitation_gate_is_cse():
    init = {"w": weights((8, 3, 3, 3)), "w_se": weights((8, 8, 1, 1), seed=1)}
    g = convert(model(se_block(True), {"x": [1, 3, 8, 8]}, ["out"], init))
    assert sorted(types(g)) == ["conv", "conv", "cse", "glob_avg", "input"]
    # The squeeze is part of the gate, not a glob_avg node: only the head's mean is.
    assert edges(g) == [("cse", "glob_avg"), ("input", "w"), ("w", "cse"), ("w", "w_se"), ("w_se", "cse")]


@pytest.mark.parametrize("axes, keepdims, expected", [
    ([2, 3], 1, ["input", "conv", "glob_avg"]),
    ([-2, -1], 0, ["input", "conv", "glob_avg"]),
    ([1], 1, ["input", "conv"]),                     # a mean over channels is no pooling
])
def test_reduce_mean_over_spatial_axes_is_glob_avg(axes, keepdims, expected):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("ReduceMean", ["c"], ["y"], axes=axes, keepdims=keepdims)]
    g = convert(model(nodes, {"x": [1, 3, 8, 8]}, ["y"], {"w": weights((8, 3, 3, 3))}))
    assert types(g) == expected


def test_reduce_mean_with_axes_as_input_opset_18():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("ReduceMean", ["c", "axes"], ["y"], keepdims=1)]
    init = {"w": weights((8, 3, 3, 3)), "axes": np.array([2, 3], dtype=np.int64)}
    g = convert(model(nodes, {"x": [1, 3, 8, 8]}, ["y"], init, opset=18))
    assert types(g) == ["input", "conv", "glob_avg"]


def test_softmax_at_the_head_is_dropped():
    nodes = [helper.make_node("Gemm", ["x", "w"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["p"], axis=-1)]
    g = convert(model(nodes, {"x": [2, 4]}, ["p"], {"w": weights((10, 4))}))
    assert types(g) == ["input", "conv"]


def test_attention_softmax_is_msa():
    # Single-head self-attention on (1, T, C): softmax(q k^T) v, then an output projection.
    c = 4
    init = {k: weights((c, c), seed=i) for i, k in enumerate(["wq", "wk", "wv", "wo"])}
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]),
             helper.make_node("MatMul", ["x", "wk"], ["k"]),
             helper.make_node("MatMul", ["x", "wv"], ["v"]),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node("Softmax", ["s"], ["a"], axis=-1),
             helper.make_node("MatMul", ["a", "v"], ["h"]),
             helper.make_node("MatMul", ["h", "wo"], ["y"])]
    g = convert(model(nodes, {"x": [1, 6, c]}, ["y"], init))
    assert sorted(types(g)) == ["conv"] * 4 + ["input", "msa"]
    assert ("msa", "wo") in edges(g)
    assert ("wq", "msa") in edges(g) and ("wk", "msa") in edges(g)


def test_positional_encoding_is_a_pos_enc_leaf_feeding_a_sum():
    init = {"pos": weights((1, 6, 4)), "w": weights((4, 4), seed=1)}
    nodes = [helper.make_node("Add", ["x", "pos"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])]
    g = convert(model(nodes, {"x": [1, 6, 4]}, ["y"], init))
    assert sorted(types(g)) == ["conv", "input", "pos_enc", "sum"]
    assert edges(g) == [("input", "sum"), ("pos", "sum"), ("sum", "w")]
    pos = next(n for n in g.nodes if n.primitive is Primitive.POS_ENC)
    assert pos.shape4d == (1, 4, 2, 2)


def test_batchnorm_statistics_are_claimed_not_predicted():
    init = {"w": weights((8, 3, 3, 3)), "s": weights((8,), 1), "b": weights((8,), 2),
            "mean": weights((8,), 3), "var": np.ones(8, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "mean", "var"], ["y"])]
    g = convert(model(nodes, {"x": [1, 3, 8, 8]}, ["y"], init))
    assert types(g) == ["input", "conv", "bn"]
    assert [(p.tensor, p.role) for p in g.nodes[2].params] == [("s", "scale"), ("b", "bias")]
    assert g.unsupported == {}


def test_parameters_of_an_op_without_primitive_are_reported():
    init = {"w": weights((8, 3, 3, 3)), "slope": weights((8, 1, 1), 1)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("PRelu", ["c", "slope"], ["y"])]
    g = convert(model(nodes, {"x": [1, 3, 8, 8]}, ["y"], init))
    assert g.unsupported == {"PRelu": ["slope"]}
    assert any("PRelu (1)" in w for w in g.warnings)


# -- weights re-viewed by a computed target shape ------------------------------------------------

def _depthwise_through_computed_reshape(dims: list) -> onnx.ModelProto:
    """A Keras-style depthwise kernel (h, w, in, 1) reshaped to (h, w, 1, in) and transposed to
    OIHW, the Reshape target built from ``dims`` (Constants, or tensors) by Unsqueeze + Concat, as
    TorchScript exports without constant folding do (Keras on the torch backend)."""
    nodes, parts = [], []
    for i, d in enumerate(dims):
        if isinstance(d, int):
            nodes.append(helper.make_node("Constant", [], [f"d{i}"], value=helper.make_tensor(
                f"d{i}", onnx.TensorProto.INT64, [], [d])))
            d = f"d{i}"
        nodes.append(helper.make_node("Unsqueeze", [d, "axes0"], [f"u{i}"]))
        parts.append(f"u{i}")
    nodes += [helper.make_node("Constant", [], ["axes0"], value=helper.make_tensor("axes0", onnx.TensorProto.INT64, [1], [0])),
              helper.make_node("Concat", parts, ["target"], axis=0),
              helper.make_node("Reshape", ["w", "target"], ["w_r"]),
              helper.make_node("Transpose", ["w_r"], ["w_t"], perm=[3, 2, 0, 1]),
              helper.make_node("Conv", ["x", "w_t"], ["y"], group=8, pads=[1, 1, 1, 1])]
    nodes.sort(key=lambda n: n.op_type != "Constant")  # constants first: topological order
    return model(nodes, {"x": [1, 8, 16, 16]}, ["y"], {"w": weights((3, 3, 8, 1))})


def test_a_reshape_target_computed_from_constants_is_folded():
    g = convert(_depthwise_through_computed_reshape([3, 3, 1, 8]))
    assert "sep_conv" in types(g)
    (ref,) = [p for n in g.nodes for p in n.params]
    w = weights((3, 3, 8, 1))
    assert ref.tensor == "w" and ref.canonical_shape == (8, 1, 3, 3)
    np.testing.assert_array_equal(ref.layout.to_canonical(w), w.reshape(3, 3, 1, 8).transpose(3, 2, 0, 1))


def test_a_reshape_target_that_depends_on_data_is_not_folded():
    m = _depthwise_through_computed_reshape([3, 3, 1, "n"])
    m.graph.node.insert(0, helper.make_node("Shape", ["x"], ["sx"], start=1, end=2))
    m.graph.node.insert(1, helper.make_node("Squeeze", ["sx"], ["n"]))
    with pytest.raises(UnsupportedModelError, match="no parametrised layers"):  # the layout cannot be read
        convert(m)
