"""What each real exporter writes, and how the converter reads it (fixtures/frameworks).

One test per exporter habit: tf2onnx's NHWC transposes and BN as Mul + Add (or folded into a
bias-free conv), Keras LayerNorm/GroupNorm in fused arithmetic, MultiHeadAttention biases stored
per head; jax2onnx's anonymous names, kept BatchNorm, LayerNorm decomposed or native, Einsum
layers, means as ReduceSum / count; the dynamo exporter's BN folding (``*.weight_bias``),
external data, pre-transposed Linear weights and the ``Attention`` op; the TorchScript exporter's
GroupNorm as InstanceNormalization + Mul + Add and, with constant folding, anonymous folded convs.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from ghn_onnx.convert import convert
from ghn_onnx.onnx_io.loading import load_model
from ghn_onnx.graph.graph import Graph
from ghn_onnx.graph.primitives import Primitive

FIXTURES = Path(__file__).parent / "fixtures" / "frameworks"

# fixture -> (primitive counts, unsupported parameters, BN folded)
EXPECTED = {
    "flax_cnn": ({"bias": 5, "bn": 2, "conv": 5, "cse": 1, "glob_avg": 1, "input": 1, "sum": 1}, {}, False),
    "flax_vit": ({"bias": 14, "conv": 14, "glob_avg": 1, "input": 1, "ln": 5, "msa": 2, "pos_enc": 1, "sum": 5},
                 {}, False),
    "flax_zoo": ({"avg_pool": 1, "bias": 5, "bn": 1, "conv": 5, "glob_avg": 1, "input": 1, "ln": 2, "max_pool": 1,
                  "sep_conv": 1}, {}, False),
    "keras_cnn": ({"bias": 5, "bn": 2, "conv": 5, "cse": 1, "glob_avg": 1, "input": 1, "sum": 1}, {}, False),
    "keras_vit": ({"bias": 14, "conv": 14, "glob_avg": 1, "input": 1, "ln": 5, "msa": 2, "pos_enc": 1, "sum": 5},
                  {}, False),
    "keras_zoo": ({"avg_pool": 1, "bias": 6, "bn": 2, "concat": 1, "conv": 6, "glob_avg": 1, "input": 1, "ln": 2,
                   "max_pool": 1, "sep_conv": 2}, {}, True),
    "torch_cnn": ({"bias": 5, "bn": 2, "conv": 5, "cse": 1, "glob_avg": 1, "input": 1, "sum": 1}, {}, False),
    "torch_cnn_dynamo": ({"bias": 5, "conv": 5, "cse": 1, "glob_avg": 1, "input": 1, "sum": 1}, {}, True),
    "torch_cnn_legacy_folded": ({"bias": 5, "conv": 5, "cse": 1, "glob_avg": 1, "input": 1, "sum": 1}, {}, True),
    "torch_vit": ({"bias": 14, "conv": 14, "glob_avg": 1, "input": 1, "ln": 5, "msa": 2, "pos_enc": 1, "sum": 5},
                  {}, False),
    "torch_vit_sdpa_dynamo": ({"bias": 14, "conv": 14, "glob_avg": 1, "input": 1, "ln": 5, "msa": 2, "pos_enc": 1,
                               "sum": 5}, {}, False),
    # ConvNeXt-style layer scale (a per-channel Mul with no shift) has no primitive: listed, left as is.
    "torch_zoo": ({"avg_pool": 1, "bias": 5, "bn": 2, "concat": 1, "conv": 5, "cse": 1, "dil_conv": 1, "glob_avg": 1,
                   "input": 1, "ln": 2, "max_pool": 1, "sep_conv": 1, "sum": 1}, {"Mul": ["scale"]}, False),
    "torch_zoo_dynamo": ({"avg_pool": 1, "bias": 7, "concat": 1, "conv": 5, "cse": 1, "dil_conv": 1, "glob_avg": 1,
                          "input": 1, "ln": 2, "max_pool": 1, "sep_conv": 1, "sum": 1},
                         {"Mul": ["unsqueeze_1"]}, True),
}
TOTAL_KB_LIMIT = 500  # the committed fixtures, .onnx and .onnx.data together


def load(name: str) -> onnx.ModelProto:
    return load_model(FIXTURES / f"{name}.onnx")


def graph_of(name: str) -> Graph:
    return convert(load(name), name=name)


def ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def test_every_fixture_is_listed():
    assert sorted(p.stem for p in FIXTURES.glob("*.onnx")) == sorted(EXPECTED)


def test_fixtures_are_small():
    total = sum(p.stat().st_size for p in FIXTURES.iterdir() if p.name.endswith((".onnx", ".onnx.data")))
    assert total < TOTAL_KB_LIMIT * 1024


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_graph_of_each_export(name):
    counts, unsupported, folded = EXPECTED[name]
    g = graph_of(name)
    assert g.counts() == counts
    assert g.unsupported == unsupported
    assert g.info["bn_folded"] is folded
    assert any("BN appears folded" in w for w in g.warnings) is folded
    # GELU (Erf / Tanh / Pow / Mul / Add with scalar constants) adds neither nodes nor warnings.
    assert len(g.warnings) == bool(unsupported) + folded


# -- Keras 3 via tf2onnx ------------------------------------------------------------------------

def test_keras_export_transposes_nhwc_input_and_stores_conv_kernels_oihw():
    model = load("keras_cnn")
    first = model.graph.node[0]
    assert first.op_type == "Transpose" and list(first.attribute[0].ints) == [0, 3, 1, 2]
    conv = next(n for n in graph_of("keras_cnn").nodes if n.primitive is Primitive.CONV)
    assert conv.shape == (8, 3, 3, 3)


def test_keras_batchnorm_after_a_biased_conv_is_mul_add_read_as_bn():
    model = load("keras_cnn")
    assert "BatchNormalization" not in ops(model)
    g = graph_of("keras_cnn")
    bn = [n for n in g.nodes if n.primitive is Primitive.BN]
    assert [n.params[0].stored_shape for n in bn] == [(1, 8, 1, 1)] * 2
    assert all("batchnorm/mul" in n.params[0].tensor for n in bn)
    # The node before each bn is the conv's own bias: conv -> bias -> bn, as in PyTorch.
    preds = {int(d): int(s) for s, d in g.edges.tolist()}
    assert all(g.nodes[preds[g.nodes.index(n)]].primitive is Primitive.BIAS for n in bn)


def test_keras_bn_after_a_bias_free_conv_is_folded_and_reported():
    g = graph_of("keras_zoo")
    folded = [n for n in g.nodes if n.primitive is Primitive.BIAS and "batchnorm/" in n.name]
    assert len(folded) == 1
    assert "batchnorm/" in next(w for w in g.warnings if "BN appears folded" in w)


def test_keras_multi_head_attention_weights_and_per_head_biases():
    g = graph_of("keras_vit")
    q = next(n for n in g.nodes if n.primitive is Primitive.CONV and "query" in n.name)
    assert q.shape == (16, 16)  # (heads * head_dim, in)
    q_bias = next(n for n in g.nodes if n.primitive is Primitive.BIAS and "query" in n.name)
    (ref,) = q_bias.params
    assert ref.stored_shape == (2, 8) and ref.canonical_shape == (16,)  # (heads, head_dim) flattened
    out = next(n for n in g.nodes if n.primitive is Primitive.CONV and "attention_output" in n.name)
    preds = [int(s) for s, d in g.edges.tolist() if d == g.nodes.index(out)]
    assert [g.nodes[p].primitive for p in preds] == [Primitive.MSA]


def test_keras_layernorm_and_groupnorm_arithmetic_is_ln_with_flat_parameters():
    g = graph_of("keras_zoo")
    ln = [n for n in g.nodes if n.primitive is Primitive.LN]
    shapes = sorted((p.stored_shape, p.canonical_shape) for n in ln for p in n.params)
    # GroupNormalization stores (1, 1, 1, groups, C / groups); LayerNormalization (1, C).
    assert shapes == [((1, 1, 1, 4, 4), (16,))] * 2 + [((1, 16), (16,))] * 2
    assert not any(n.primitive is Primitive.SUM for n in g.nodes)  # no residual in this model


def test_keras_separable_conv_is_depthwise_then_pointwise():
    g = graph_of("keras_zoo")
    sep = [n for n in g.nodes if n.primitive is Primitive.SEP_CONV]
    assert [n.shape for n in sep] == [(8, 1, 3, 3)] * 2 and all(n.groups == 8 for n in sep)
    pointwise = next(n for n in g.nodes if n.primitive is Primitive.CONV and n.shape == (8, 8, 1, 1))
    assert "separable_conv2d" in pointwise.name


# -- Flax via jax2onnx --------------------------------------------------------------------------

def test_flax_export_has_anonymous_names_and_keeps_batchnorm():
    model = load("flax_cnn")
    assert "BatchNormalization" in ops(model)
    g = graph_of("flax_cnn")
    names = [p.tensor for p in g.predicted_tensors()]
    assert all(n.startswith(("const_", "kernel")) for n in names)


def test_flax_means_are_reduce_sum_then_divide():
    model = load("flax_vit")
    assert "ReduceSum" in ops(model) and "ReduceMean" in ops(model)  # pooling and LN statistics
    g = graph_of("flax_vit")
    (pool,) = [n for n in g.nodes if n.primitive is Primitive.GLOB_AVG]
    assert "ReduceSum" in pool.name


def test_flax_native_norms_and_einsum_layer():
    model = load("flax_zoo")
    assert {"GroupNormalization", "LayerNormalization", "Einsum", "Gemm"} <= ops(model)
    g = graph_of("flax_zoo")
    einsum = next(n for n in model.graph.node if n.op_type == "Einsum")
    node = next(n for n in g.nodes if n.name == einsum.input[1])
    assert node.primitive is Primitive.CONV and node.shape == (16, 8)
    assert node.params[0].layout.describe() == "transpose[1, 0]"


# -- PyTorch ------------------------------------------------------------------------------------

def test_dynamo_export_folds_bn_names_weight_bias_and_uses_external_data():
    assert (FIXTURES / "torch_zoo_dynamo.onnx.data").is_file()
    g = graph_of("torch_zoo_dynamo")
    assert {n.name for n in g.nodes if n.name.endswith("weight_bias")} == {"stem.weight_bias", "dw.weight_bias"}
    raw = onnx.load(str(FIXTURES / "torch_zoo_dynamo.onnx"), load_external_data=False)
    assert any("FuseBatchNormIntoConv" in p.value for n in raw.graph.node for p in n.metadata_props)


def test_dynamo_linear_on_tokens_is_matmul_with_an_anonymous_pre_transposed_weight():
    model = load("torch_vit_sdpa_dynamo")
    g = graph_of("torch_vit_sdpa_dynamo")
    matmul_weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    linear = [n for n in g.nodes if n.primitive is Primitive.CONV and n.name in matmul_weights]
    assert len(linear) == 12 and all(n.params[0].layout.describe() == "transpose[1, 0]" for n in linear)


def test_dynamo_sdpa_is_one_attention_op_read_as_msa_of_q_k_v():
    model = load("torch_vit_sdpa_dynamo")
    assert sum(n.op_type == "Attention" for n in model.graph.node) == 2
    assert "Softmax" not in ops(model)
    g = graph_of("torch_vit_sdpa_dynamo")
    for i, n in enumerate(g.nodes):
        if n.primitive is Primitive.MSA:
            preds = [g.nodes[int(s)].primitive for s, d in g.edges.tolist() if d == i]
            assert preds == [Primitive.BIAS] * 3  # q, k and v projections


def test_torchscript_groupnorm_is_instance_norm_then_mul_add_read_as_one_ln():
    model = load("torch_zoo")
    assert "InstanceNormalization" in ops(model) and "GroupNormalization" not in ops(model)
    g = graph_of("torch_zoo")
    gn = next(n for n in g.nodes if n.name == "gn.weight")
    assert gn.primitive is Primitive.LN
    assert [(p.tensor, p.stored_shape, p.canonical_shape) for p in gn.params] == [
        ("gn.weight", (16,), (16,)), ("gn.bias", (16,), (16,))]


def test_legacy_constant_folding_gives_anonymous_folded_convs():
    g = graph_of("torch_cnn_legacy_folded")
    convs = [n for n in g.nodes if n.primitive is Primitive.CONV and len(n.shape) == 4]
    assert all(n.name.startswith("onnx::Conv_") for n in convs)
    assert "every convolution has a bias" in next(w for w in g.warnings if "BN appears folded" in w)
    assert "'onnx::Conv_41'" in g.warnings[0] and "a guess" in g.warnings[0]  # says what it rests on


def _vgg_style(bn: bool):
    import torch.nn as nn

    norm = (lambda c: [nn.BatchNorm2d(c)]) if bn else (lambda c: [])
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *norm(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), *norm(16), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(16 * 8 * 8, 10))


@pytest.mark.slow
@pytest.mark.parametrize("arch, exporter", [("squeezenet1_1", "torchscript"), ("squeezenet1_1", "torchscript_folding"),
                                            ("vgg_style", "torchscript"), ("vgg_style", "torchscript_folding"),
                                            ("vgg_style", "dynamo")])  # dynamo keeps names; its fold is on record
def test_networks_that_never_had_bn_are_not_called_folded(arch, exporter, tmp_path):
    """Every conv biased and no norm is what a fold leaves, and also what SqueezeNet and VGG are:
    only exporter-made weight names (a fold writes new tensors) tip it to "folded"."""
    import io
    import warnings

    import torch
    import torchvision

    net = (torchvision.models.squeezenet1_1(num_classes=10) if arch == "squeezenet1_1" else _vgg_style(False)).eval()
    x = (torch.zeros(1, 3, 32, 32),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(net, x, str(tmp_path / "m.onnx"), dynamo=True, verbose=False)
            model = onnx.load(tmp_path / "m.onnx")
        else:
            f = io.BytesIO()
            torch.onnx.export(net, x, f, dynamo=False, do_constant_folding=exporter == "torchscript_folding",
                              opset_version=17)
            model = onnx.load_from_string(f.getvalue())
    g = convert(model, name=arch)
    assert g.info["bn_folded"] is False and not any("BN appears folded" in w for w in g.warnings)
    assert all(n.primitive is not Primitive.BN for n in g.nodes)


@pytest.mark.slow
def test_a_vgg_with_bn_folded_by_constant_folding_is_still_called_folded():
    import io
    import warnings

    import torch

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_vgg_style(True).eval(), (torch.zeros(1, 3, 32, 32),), f, dynamo=False,
                          do_constant_folding=True, opset_version=17)
    g = convert(onnx.load_from_string(f.getvalue()), name="vgg_bn_folded")
    assert g.info["bn_folded"] is True
    assert "2 of 2 conv weights are tensors the exporter made" in g.warnings[0]


def test_layer_scale_is_listed_as_unsupported_not_guessed():
    g = graph_of("torch_zoo")
    assert g.unsupported == {"Mul": ["scale"]}
    assert not any(p.tensor == "scale" for p in g.predicted_tensors())
