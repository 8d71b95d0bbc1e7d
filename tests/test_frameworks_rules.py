"""The rules that read other frameworks' exports, on small hand-built ONNX models: for each,
the pattern it matches and the near misses it must leave alone.

Rules covered: BatchNorm as ``Mul`` + ``Add`` (bn), normalisations written as arithmetic or as
InstanceNormalization / GroupNormalization (ln), reductions that are normalisation statistics
(no glob_avg), ``ReduceSum`` / count (glob_avg), ``Einsum`` layers and per-head biases, msa at the
attention product and the ``Attention`` op, GELU arithmetic (nothing), HWIO and depthwise kernels
through Transpose / Reshape, the copy count of tensors squared by a dropped op, BN folding evidence.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from onnx_builders import model, weights

from ghn_onnx.convert import convert
from ghn_onnx.graph.graph import Graph
from ghn_onnx.graph.primitives import Primitive

C = 8
X = {"x": [1, 3, 8, 8]}


def types(graph: Graph) -> list[str]:
    return [n.primitive.label for n in graph.nodes]


def edges(graph: Graph) -> list[tuple[str, str]]:
    label = [n.name if n.params else n.primitive.label for n in graph.nodes]
    return sorted((label[s], label[d]) for s, d in graph.edges.tolist())


def node(graph: Graph, primitive: Primitive):
    (n,) = [n for n in graph.nodes if n.primitive is primitive]
    return n


def scalar(value: float) -> np.ndarray:
    return np.array(value, dtype=np.float32)


def conv(out: str = "c", src: str = "x", w: str = "w", b: str | None = None) -> helper.NodeProto:
    return helper.make_node("Conv", [src, w] + ([b] if b else []), [out], pads=[1, 1, 1, 1])


def conv_init(**more) -> dict:
    return {"w": weights((C, 3, 3, 3)), **more}


# -- BatchNorm written as Mul + Add -------------------------------------------------------------

def test_mul_add_of_channel_vectors_after_a_conv_is_bn():
    gamma, beta = weights((1, C, 1, 1), 1), weights((1, C, 1, 1), 2)
    nodes = [conv(b="cb"), helper.make_node("Mul", ["c", "gamma"], ["m"]),
             helper.make_node("Add", ["m", "beta"], ["y"])]
    g = convert(model(nodes, X, ["y"], conv_init(cb=weights((C,), 3), gamma=gamma, beta=beta)))
    assert types(g) == ["input", "conv", "bias", "bn"]
    bn = node(g, Primitive.BN)
    assert [(p.tensor, p.role, p.canonical_shape) for p in bn.params] == [
        ("gamma", "scale", (C,)), ("beta", "bias", (C,))]
    np.testing.assert_array_equal(bn.params[0].layout.to_canonical(gamma), gamma.reshape(-1))
    np.testing.assert_array_equal(bn.params[1].layout.to_stored(beta.reshape(-1)), beta)
    assert g.unsupported == {}


def test_mul_add_on_an_nhwc_activation_after_a_transpose_is_bn():
    nodes = [conv(), helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("Mul", ["gamma", "t"], ["m"]), helper.make_node("Add", ["beta", "m"], ["y"])]
    g = convert(model(nodes, X, ["y"], conv_init(gamma=weights((C,), 1), beta=weights((C,), 2))))
    assert types(g) == ["input", "conv", "bn"]


def test_a_scale_alone_is_layer_scale_not_bn():
    nodes = [conv(), helper.make_node("Mul", ["c", "gamma"], ["y"])]
    g = convert(model(nodes, X, ["y"], conv_init(gamma=weights((1, C, 1, 1), 1))))
    assert types(g) == ["input", "conv"]
    assert g.unsupported == {"Mul": ["gamma"]}


def test_mul_whose_result_is_also_used_elsewhere_is_no_bn():
    nodes = [conv(), helper.make_node("Mul", ["c", "gamma"], ["m"]), helper.make_node("Add", ["m", "beta"], ["a"]),
             helper.make_node("Add", ["a", "m"], ["y"])]
    g = convert(model(nodes, X, ["y"], conv_init(gamma=weights((1, C, 1, 1), 1), beta=weights((1, C, 1, 1), 2))))
    assert "bn" not in types(g)


@pytest.mark.parametrize("beta_shape", [
    (1, 1, 8, 1),   # as many elements, but along the rows: no per-channel affine
    (1, 4, 1, 1),   # another size
])
def test_mul_add_of_vectors_that_disagree_is_no_bn(beta_shape):
    nodes = [conv(), helper.make_node("Mul", ["c", "gamma"], ["m"]), helper.make_node("Add", ["m", "beta"], ["y"])]
    g = convert(model(nodes, X, ["y"], conv_init(gamma=weights((1, C, 1, 1), 1), beta=weights(beta_shape, 2))))
    assert "bn" not in types(g)


# -- normalisations written as arithmetic -------------------------------------------------------

def layernorm_decomposed(x: str, out: str) -> list:
    """jax2onnx / old-opset LayerNorm over the last axis: (x - mean) / sqrt(E[x^2] - mean^2 + eps)."""
    return [helper.make_node("ReduceMean", [x], ["mu"], axes=[-1]),
            helper.make_node("Sub", [x, "mu"], ["xc"]),
            helper.make_node("Mul", [x, x], ["sq"]),
            helper.make_node("ReduceMean", ["sq"], ["m2"], axes=[-1]),
            helper.make_node("Mul", ["mu", "mu"], ["mu2"]),
            helper.make_node("Sub", ["m2", "mu2"], ["var"]),
            helper.make_node("Add", ["var", "eps"], ["ve"]),
            helper.make_node("Sqrt", ["ve"], ["sd"]),
            helper.make_node("Div", ["xc", "sd"], ["xn"]),
            helper.make_node("Mul", ["xn", "gamma"], ["xs"]),
            helper.make_node("Add", ["xs", "beta"], [out])]


def tokens_init(**more) -> dict:
    return {"w1": weights((C, C)), "w2": weights((C, C), 5), "eps": scalar(1e-5), "gamma": weights((C,), 1),
            "beta": weights((C,), 2), **more}


def test_decomposed_layernorm_is_one_ln_without_pools_or_sums():
    # x (1, 6, C) -> linear -> residual source; LN(h) -> linear; residual add.
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"])] + layernorm_decomposed("h", "n") + [
        helper.make_node("MatMul", ["n", "w2"], ["y"])]
    g = convert(model(nodes, {"x": [1, 6, C]}, ["y"], tokens_init()))
    assert types(g) == ["input", "conv", "ln", "conv"]
    assert [p.tensor for p in node(g, Primitive.LN).params] == ["gamma", "beta"]
    assert g.unsupported == {}


def test_a_mean_that_is_not_put_back_against_the_activation_is_pooling():
    # Global pooling, then a per-channel affine on the pooled features: glob_avg then bn, not ln.
    nodes = [conv(), helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Mul", ["p", "gamma"], ["m"]), helper.make_node("Add", ["m", "beta"], ["y"])]
    g = convert(model(nodes, X, ["y"], conv_init(gamma=weights((1, C, 1, 1), 1), beta=weights((1, C, 1, 1), 2))))
    assert types(g) == ["input", "conv", "glob_avg", "bn"]


def test_layernorm_of_globally_pooled_features_is_ln_after_glob_avg():
    # JAX's ConvNeXt head: mean over H, W (ReduceSum / count), then LayerNorm over channels. The
    # pooling is no statistic of the LayerNorm: its output is the activation the LN normalises.
    init = conv_init(axes=np.array([2, 3], np.int64), n=scalar(64.0), w2=weights((C, C), 4), eps=scalar(1e-5),
                     gamma=weights((C,), 1), beta=weights((C,), 2))
    nodes = [conv(), helper.make_node("ReduceSum", ["c", "axes"], ["s"], keepdims=0),
             helper.make_node("Div", ["s", "n"], ["p"])] + layernorm_decomposed("p", "n2") + [
        helper.make_node("MatMul", ["n2", "w2"], ["y"])]
    g = convert(model(nodes, X, ["y"], init, opset=18))
    assert types(g) == ["input", "conv", "glob_avg", "ln", "conv"]


def keras_fused_norm(x: str, out: str, reduce: str = "GlobalAveragePool", shift_op: str = "Add") -> list:
    """Keras' LayerNorm / GroupNorm through tf2onnx: m = rsqrt(var + eps) * gamma;
    y = x * m + ((-mean) * m + beta)."""
    shift = (helper.make_node("Add", ["nm", "beta"], ["sh"]) if shift_op == "Add"
             else helper.make_node("Sub", ["mu_m", "beta"], ["sh"]))
    return [helper.make_node(reduce, [x], ["mu"]),
            helper.make_node("Neg", ["mu"], ["neg"]),
            helper.make_node("Sub", [x, "mu"], ["d"]),
            helper.make_node("Mul", ["d", "d"], ["d2"]),
            helper.make_node(reduce, ["d2"], ["var"]),
            helper.make_node("Add", ["var", "eps"], ["ve"]),
            helper.make_node("Sqrt", ["ve"], ["sd"]),
            helper.make_node("Reciprocal", ["sd"], ["rs"]),
            helper.make_node("Mul", ["rs", "gamma"], ["m"]),
            helper.make_node("Mul", [x, "m"], ["xm"]),
            helper.make_node("Mul", ["neg", "m"], ["nm"]) if shift_op == "Add" else
            helper.make_node("Mul", ["mu", "m"], ["mu_m"]),
            shift,
            helper.make_node("Add", ["xm", "sh"], [out])]


def test_keras_fused_layernorm_is_one_ln():
    init = conv_init(eps=scalar(1e-3), gamma=weights((1, C, 1, 1), 1), beta=weights((1, C, 1, 1), 2),
                     w2=weights((C, C, 3, 3), 4))
    nodes = [conv()] + keras_fused_norm("c", "n") + [conv("y", "n", "w2")]
    g = convert(model(nodes, X, ["y"], init))
    assert types(g) == ["input", "conv", "ln", "conv"]
    ln = node(g, Primitive.LN)
    assert [(p.tensor, p.canonical_shape) for p in ln.params] == [("gamma", (C,)), ("beta", (C,))]
    assert g.unsupported == {}


def test_keras_fused_layernorm_whose_zero_beta_was_dropped_is_ln_without_bias():
    # tf2onnx removes the Add of an all-zero beta: y = x * m + (-mean) * m.
    init = conv_init(eps=scalar(1e-3), gamma=weights((1, C, 1, 1), 1), beta=weights((1, C, 1, 1), 2))
    nodes = [n for n in keras_fused_norm("c", "y") if n.output[0] != "sh"]
    nodes[-1] = helper.make_node("Add", ["xm", "nm"], ["y"])
    g = convert(model([conv()] + nodes, X, ["y"], {k: v for k, v in init.items() if k != "beta"}))
    assert types(g) == ["input", "conv", "ln"]
    assert [p.role for p in node(g, Primitive.LN).params] == ["scale"]


def test_fused_form_with_beta_subtracted_the_wrong_way_is_not_ln():
    init = conv_init(eps=scalar(1e-3), gamma=weights((1, C, 1, 1), 1), beta=weights((1, C, 1, 1), 2))
    g = convert(model([conv()] + keras_fused_norm("c", "y", shift_op="Sub"), X, ["y"], init))
    assert "ln" not in types(g)


def test_instance_norm_then_mul_add_is_one_ln_from_the_affine():
    # torch's GroupNorm export: reshape to (N, groups, -1), InstanceNorm with unit scale, reshape
    # back, then the real per-channel affine as Mul + Add of (C, 1, 1) vectors.
    init = conv_init(s1=np.array([1, 2, -1], np.int64), s2=np.array([1, C, 8, 8], np.int64),
                     ones=np.ones(2, np.float32), zeros=np.zeros(2, np.float32),
                     gamma=weights((C, 1, 1), 1), beta=weights((C, 1, 1), 2))
    nodes = [conv(), helper.make_node("Reshape", ["c", "s1"], ["r"]),
             helper.make_node("InstanceNormalization", ["r", "ones", "zeros"], ["i"]),
             helper.make_node("Reshape", ["i", "s2"], ["u"]),
             helper.make_node("Mul", ["u", "gamma"], ["m"]), helper.make_node("Add", ["m", "beta"], ["y"])]
    g = convert(model(nodes, X, ["y"], init))
    assert types(g) == ["input", "conv", "ln"]
    assert [p.tensor for p in node(g, Primitive.LN).params] == ["gamma", "beta"]
    assert g.unsupported == {}  # the unit scale and zero shift are claimed, not reported


def test_instance_norm_with_its_own_affine_is_ln():
    nodes = [conv(), helper.make_node("InstanceNormalization", ["c", "s", "b"], ["y"])]
    g = convert(model(nodes, X, ["y"], conv_init(s=weights((C,), 1), b=weights((C,), 2))))
    assert types(g) == ["input", "conv", "ln"]
    assert [p.tensor for p in node(g, Primitive.LN).params] == ["s", "b"]


def test_group_normalization_op_is_ln():
    nodes = [conv(), helper.make_node("GroupNormalization", ["c", "s", "b"], ["y"], num_groups=4)]
    g = convert(model(nodes, X, ["y"], conv_init(s=weights((C,), 1), b=weights((C,), 2)), opset=21))
    assert types(g) == ["input", "conv", "ln"]


def test_rms_style_norm_with_a_scale_only_is_ln():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Mul", ["h", "h"], ["sq"]),
             helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1]),
             helper.make_node("Add", ["ms", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["rms"]),
             helper.make_node("Div", ["h", "rms"], ["xn"]),
             helper.make_node("Mul", ["xn", "gamma"], ["y"])]
    g = convert(model(nodes, {"x": [1, 6, C]}, ["y"], tokens_init()))
    assert types(g) == ["input", "conv", "ln"]
    assert [p.role for p in node(g, Primitive.LN).params] == ["scale"]


# -- means --------------------------------------------------------------------------------------

@pytest.mark.parametrize("consumer, expected", [
    ("Div", ["input", "conv", "glob_avg"]),   # JAX's mean: sum / count
    ("Relu", ["input", "conv"]),              # a sum that is no mean
])
def test_reduce_sum_divided_by_a_count_is_glob_avg(consumer, expected):
    init = conv_init(axes=np.array([2, 3], np.int64), n=scalar(64.0))
    tail = (helper.make_node("Div", ["s", "n"], ["y"]) if consumer == "Div" else helper.make_node("Relu", ["s"], ["y"]))
    nodes = [conv(), helper.make_node("ReduceSum", ["c", "axes"], ["s"], keepdims=0), tail]
    assert types(convert(model(nodes, X, ["y"], init, opset=18))) == expected


def test_mean_over_tokens_after_a_reshape_has_a_known_rank():
    # The rank of the Reshape's output comes from its stored target shape (kept for inference).
    init = conv_init(shape=np.array([1, C, 64], np.int64))
    nodes = [conv(), helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
             helper.make_node("ReduceMean", ["t"], ["y"], axes=[1], keepdims=0)]
    assert types(convert(model(nodes, X, ["y"], init))) == ["input", "conv", "glob_avg"]


# -- einsum layers and their biases -------------------------------------------------------------

def test_einsum_query_projection_is_a_linear_layer_heads_times_head_dim_by_in():
    w = weights((C, 2, 4))  # Keras EinsumDense / Flax LinearGeneral: (in, heads, head_dim)
    nodes = [helper.make_node("Einsum", ["x", "w"], ["q"], equation="abc,cde->abde"),
             helper.make_node("Add", ["q", "b"], ["y"])]
    g = convert(model(nodes, {"x": [1, 6, C]}, ["y"], {"w": w, "b": weights((2, 4), 1)}, opset=12))
    assert types(g) == ["input", "conv", "bias"]
    (ref,) = g.nodes[1].params
    assert ref.canonical_shape == (8, C)
    np.testing.assert_array_equal(ref.layout.to_canonical(w), w.reshape(C, 8).T)
    np.testing.assert_array_equal(ref.layout.to_stored(ref.layout.to_canonical(w)), w)
    assert g.nodes[2].params[0].canonical_shape == (8,)  # the (heads, head_dim) bias, flattened


def test_einsum_output_projection_contracts_heads_and_head_dim():
    w = weights((2, 4, C))  # (heads, head_dim, out)
    nodes = [helper.make_node("Einsum", ["x", "w"], ["y"], equation="abcd,cde->abe")]
    g = convert(model(nodes, {"x": [1, 6, 2, 4]}, ["y"], {"w": w}, opset=12))
    (ref,) = g.nodes[1].params
    assert ref.canonical_shape == (C, 8)
    np.testing.assert_array_equal(ref.layout.to_canonical(w), w.reshape(8, C).T)


def test_einsum_with_the_weight_first_and_an_ellipsis():
    w = weights((5, C))  # (out, in)
    nodes = [helper.make_node("Einsum", ["w", "x"], ["y"], equation="oc,...c->...o")]
    g = convert(model(nodes, {"x": [2, 6, C]}, ["y"], {"w": w}, opset=12))
    (ref,) = g.nodes[1].params
    assert ref.canonical_shape == (5, C) and ref.layout.describe() == "as stored"


def test_batched_einsum_weight_is_no_linear_layer():
    # The weight has a batch axis b shared with the activation and the output: no (out, in) form.
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]),
             helper.make_node("Einsum", ["h", "w"], ["y"], equation="bij,bjk->bik")]
    g = convert(model(nodes, {"x": [2, 6, C]}, ["y"], {"w0": weights((C, C)), "w": weights((2, C, 4), 1)}, opset=12))
    assert types(g) == ["input", "conv"]
    assert g.unsupported == {"Einsum": ["w"]}


def test_multi_dim_add_after_a_bias_free_layer_is_a_bias_only_if_sizes_match():
    # (1, 6, C) after a MatMul to C features: a positional encoding, not a bias.
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "pos"], ["y"])]
    g = convert(model(nodes, {"x": [1, 6, C]}, ["y"], {"w1": weights((C, C)), "pos": weights((1, 6, C), 1)}))
    assert sorted(types(g)) == ["conv", "input", "pos_enc", "sum"]


# -- attention ----------------------------------------------------------------------------------

def attention_nodes(extra: list | None = None) -> list:
    return [helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["x", "wk"], ["k"]),
            helper.make_node("MatMul", ["x", "wv"], ["v"]),
            helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
            helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Softmax", ["s"], ["a"], axis=-1),
            *(extra or [helper.make_node("Identity", ["a"], ["a2"])]),
            helper.make_node("MatMul", ["a2", "v"], ["h"]), helper.make_node("MatMul", ["h", "wo"], ["y"])]


def attention_init() -> dict:
    return {k: weights((C, C), i) for i, k in enumerate(["wq", "wk", "wv", "wo"])}


def test_msa_sits_at_the_attention_product_reading_q_k_and_v():
    g = convert(model(attention_nodes(), {"x": [1, 6, C]}, ["y"], attention_init()))
    assert sorted(types(g)) == ["conv"] * 4 + ["input", "msa"]
    assert [e for e in edges(g) if "msa" in e] == [("msa", "wo"), ("wk", "msa"), ("wq", "msa"), ("wv", "msa")]


def test_attention_weights_through_dropout_and_reshapes_still_meet_the_values():
    extra = [helper.make_node("Dropout", ["a"], ["ad"]), helper.make_node("Unsqueeze", ["ad", "ax"], ["au"]),
             helper.make_node("Squeeze", ["au", "ax"], ["a2"])]
    init = {**attention_init(), "ax": np.array([1], np.int64)}
    g = convert(model(attention_nodes(extra), {"x": [1, 6, C]}, ["y"], init))
    assert types(g).count("msa") == 1


def test_attention_op_is_msa_of_q_k_v():
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["x", "wk"], ["k"]),
             helper.make_node("MatMul", ["x", "wv"], ["v"]), helper.make_node("Attention", ["q", "k", "v"], ["h"]),
             helper.make_node("MatMul", ["h", "wo"], ["y"])]
    g = convert(model(nodes, {"x": [1, 6, C]}, ["y"], attention_init(), opset=23))
    assert [e for e in edges(g) if "msa" in e] == [("msa", "wo"), ("wk", "msa"), ("wq", "msa"), ("wv", "msa")]


def test_product_of_two_activations_without_softmax_is_dropped():
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["x", "wk"], ["k"]),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("MatMul", ["s", "wo"], ["y"])]
    g = convert(model(nodes, {"x": [1, C, C]}, ["y"], attention_init()))
    assert "msa" not in types(g)


# -- activations --------------------------------------------------------------------------------

@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_arithmetic_adds_no_nodes_and_no_warnings(approximate):
    if approximate:  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), constants as Keras stores them
        gelu = [helper.make_node("Pow", ["c", "three"], ["p"]), helper.make_node("Mul", ["k1", "p"], ["kp"]),
                helper.make_node("Add", ["c", "kp"], ["i"]), helper.make_node("Mul", ["k2", "i"], ["ki"]),
                helper.make_node("Tanh", ["ki"], ["t"]), helper.make_node("Add", ["one4d", "t"], ["o"])]
        init = {"three": scalar(3.0), "k1": scalar(0.044715), "k2": scalar(0.7978845),
                "one4d": np.ones((1, 1, 1, 1), np.float32)}
    else:  # 0.5 x (1 + erf(x / sqrt 2))
        gelu = [helper.make_node("Mul", ["c", "r2"], ["s"]), helper.make_node("Erf", ["s"], ["e"]),
                helper.make_node("Add", ["e", "one"], ["o"])]
        init = {"r2": scalar(0.70710677), "one": scalar(1.0)}
    nodes = [conv()] + gelu + [helper.make_node("Mul", ["c", "half"], ["h"]),
                               helper.make_node("Mul", ["h", "o"], ["y"])]
    g = convert(model(nodes, X, ["y"], conv_init(half=scalar(0.5), **init)))
    assert types(g) == ["input", "conv"]
    assert g.unsupported == {} and g.warnings == []


# -- kernels stored in another layout -----------------------------------------------------------

def test_hwio_kernel_through_a_transpose_is_read_as_oihw():
    hwio = weights((3, 3, 3, C))
    nodes = [helper.make_node("Transpose", ["k"], ["w"], perm=[3, 2, 0, 1]), conv("y")]
    g = convert(model(nodes, X, ["y"], {"k": hwio}))
    (ref,) = g.nodes[1].params
    assert ref.tensor == "k" and ref.canonical_shape == (C, 3, 3, 3)
    np.testing.assert_array_equal(ref.layout.to_canonical(hwio), hwio.transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(ref.layout.to_stored(hwio.transpose(3, 2, 0, 1)), hwio)


def test_depthwise_kernel_reshaped_then_transposed_is_sep_conv():
    # TF stores a depthwise kernel (kh, kw, C, multiplier); ONNX wants (C * multiplier, 1, kh, kw).
    k = weights((3, 3, C, 1))
    init = {"k": k, "shape": np.array([3, 3, 1, C], np.int64), "w0": weights((C, 3, 1, 1), 1)}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c"]), helper.make_node("Reshape", ["k", "shape"], ["kr"]),
             helper.make_node("Transpose", ["kr"], ["w"], perm=[3, 2, 0, 1]),
             helper.make_node("Conv", ["c", "w"], ["y"], group=C, pads=[1, 1, 1, 1])]
    g = convert(model(nodes, X, ["y"], init))
    sep = node(g, Primitive.SEP_CONV)
    (ref,) = sep.params
    assert ref.canonical_shape == (C, 1, 3, 3) and sep.groups == C
    expected = k.reshape(3, 3, 1, C).transpose(3, 2, 0, 1)
    np.testing.assert_array_equal(ref.layout.to_canonical(k), expected)
    np.testing.assert_array_equal(ref.layout.to_stored(expected), k)


# -- copies of merged duplicates ----------------------------------------------------------------

def test_a_tensor_squared_by_a_dropped_op_is_not_a_merged_duplicate():
    # A residual sum feeds a LayerNorm whose variance squares it (Mul(s, s)): still one sum.
    init = tokens_init(w3=weights((C, C), 6))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["x", "w3"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["s"])] + layernorm_decomposed("s", "n") + [
        helper.make_node("MatMul", ["n", "w2"], ["y"])]
    g = convert(model(nodes, {"x": [1, 6, C]}, ["y"], init))
    assert types(g).count("sum") == 1


# -- BN folding evidence ------------------------------------------------------------------------

@pytest.mark.parametrize("bias_name, folded", [
    ("stem.weight_bias", True),                                          # dynamo
    ("model/batch_normalization/batchnorm/sub:0", True),                # tf2onnx
    ("stem.bias", False),
])
def test_folded_bn_bias_names_count_even_when_other_bns_are_kept(bias_name, folded):
    bn = {"s": weights((C,), 1), "b": weights((C,), 2), "mean": weights((C,), 3), "var": np.ones(C, np.float32)}
    init = conv_init(**{bias_name: weights((C,), 4)}, w2=weights((C, C, 3, 3), 5), **bn)
    nodes = [conv(b=bias_name), conv("d", "c", "w2"),
             helper.make_node("BatchNormalization", ["d", "s", "b", "mean", "var"], ["y"])]
    g = convert(model(nodes, X, ["y"], init))
    assert g.info["bn_folded"] is folded


def test_names_of_an_unfolded_keras_bn_are_no_folding_evidence():
    init = conv_init(cb=weights((C,), 3), **{"bn/batchnorm/mul:0": weights((1, C, 1, 1), 1),
                                             "bn/batchnorm/sub:0": weights((1, C, 1, 1), 2)})
    nodes = [conv(b="cb"), helper.make_node("Mul", ["c", "bn/batchnorm/mul:0"], ["m"]),
             helper.make_node("Add", ["m", "bn/batchnorm/sub:0"], ["y"])]
    g = convert(model(nodes, X, ["y"], init))
    assert g.info["bn_folded"] is False and "bn" in types(g)


# -- squeeze-excitation gates written as arithmetic ---------------------------------------------

def hard_sigmoid(src: str, out: str) -> list:
    """Keras' hard sigmoid: relu6(x + 3) * (1 / 6), a Clip between constants."""
    return [helper.make_node("Add", [src, "three"], [out + "_a"]),
            helper.make_node("Clip", [out + "_a", "zero", "six"], [out + "_c"]),
            helper.make_node("Mul", [out + "_c", "sixth"], [out])]


def gate_init(**more) -> dict:
    return conv_init(three=scalar(3.0), zero=scalar(0.0), six=scalar(6.0), sixth=scalar(1 / 6), **more)


def test_keras_hard_sigmoid_se_gate_is_cse():
    nodes = [conv(), helper.make_node("GlobalAveragePool", ["c"], ["m"]), conv("e", "m", "w_se")] + \
        hard_sigmoid("e", "s") + [helper.make_node("Mul", ["c", "s"], ["z"]),
                                  helper.make_node("GlobalAveragePool", ["z"], ["y"])]
    g = convert(model(nodes, X, ["y"], gate_init(w_se=weights((C, C, 3, 3), 1))))
    assert sorted(types(g)) == ["conv", "conv", "cse", "glob_avg", "input"]


def test_hard_swish_written_out_is_an_activation_not_cse():
    nodes = [conv()] + hard_sigmoid("c", "s") + [helper.make_node("Mul", ["c", "s"], ["y"])]
    g = convert(model(nodes, X, ["y"], gate_init()))
    assert types(g) == ["input", "conv"]
