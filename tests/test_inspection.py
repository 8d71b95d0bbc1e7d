"""The inspection report's accounting of stored tensors, on hand-built models."""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper
from onnx_builders import model, save, weights

from ghn_onnx.convert import convert
from ghn_onnx.report.inspection import TensorCount, build_report, format_report, inspect_model
from ghn_onnx.graph.primitives import Primitive


def report_of(m):
    return build_report(m, convert(m, name="m.onnx"))


def conv_bn(extra_nodes=(), extra_init=None, output="y"):
    init = {"w": weights((8, 3, 3, 3)), "s": weights((8,), 1), "b": weights((8,), 2),
            "mean": weights((8,), 3), "var": np.ones(8, np.float32), **(extra_init or {})}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "mean", "var"], ["y"]), *extra_nodes]
    return model(nodes, {"x": [1, 3, 8, 8]}, [output], init)


def test_groups_partition_the_stored_floats():
    m = conv_bn([helper.make_node("PRelu", ["y", "slope"], ["z"]),
                 helper.make_node("Clip", ["z", "lo", "hi"], ["out"])],
                {"slope": weights((8, 1, 1), 4), "lo": np.array(0, np.float32), "hi": np.array(6, np.float32)},
                output="out")
    r = report_of(m)
    assert r.predicted == TensorCount(3, 216 + 8 + 8)
    assert r.statistics == TensorCount(2, 16)
    assert r.unsupported_params == TensorCount(1, 8)
    assert r.other == TensorCount(2, 2)
    assert r.stored_float == TensorCount(8, 216 + 16 + 16 + 8 + 2)
    assert r.excluding_statistics == TensorCount(6, 216 + 16 + 8 + 2)
    assert r.coverage_excluding_statistics == 232 / 242
    assert r.coverage_of_stored == 232 / 258
    assert [t.name for t in r.unsupported["PRelu"]] == ["slope"]
    assert r.primitives == {p.label: {"input": 1, "conv": 1, "bn": 1}.get(p.label, 0) for p in Primitive}


def test_constant_node_weights_are_counted_and_predicted():
    w = weights((8, 3, 3, 3))
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
             helper.make_node("Conv", ["x", "w"], ["y"])]
    r = report_of(model(nodes, {"x": [1, 3, 8, 8]}, ["y"]))
    assert r.predicted == r.stored_float == TensorCount(1, w.size)
    assert r.coverage_of_stored == 1.0


def test_non_float_tensors_are_not_counted():
    m = conv_bn([helper.make_node("Reshape", ["y", "shape"], ["out"])], {"shape": np.array([1, -1], np.int64)},
                output="out")
    assert report_of(m).stored_float.tensors == 5


def merged_bn_model():
    """What the TorchScript exporter makes of a fresh BN: equal initializers merged into one,
    the other names re-created as Identity aliases."""
    init = {"w": weights((8, 3, 3, 3)), "ones": np.ones(8, np.float32), "zeros": np.zeros(8, np.float32)}
    alias = [("ones", "bn.weight"), ("ones", "bn.running_var"), ("zeros", "bn.bias"), ("zeros", "bn.running_mean")]
    nodes = [helper.make_node("Identity", [a], [b]) for a, b in alias]
    nodes += [helper.make_node("Conv", ["x", "w"], ["c"]),
              helper.make_node("BatchNormalization", ["c", "bn.weight", "bn.bias", "bn.running_mean",
                                                      "bn.running_var"], ["y"])]
    return model(nodes, {"x": [1, 3, 8, 8]}, ["y"], init)


def test_a_tensor_read_as_several_parameters_is_warned_about():
    r = report_of(merged_bn_model())
    assert r.shared == {"ones": 2, "zeros": 2}
    assert any("2 stored tensor(s) are read as more than one parameter" in w for w in r.warnings)


def test_inspect_model_unties_exporter_aliases_as_prediction_does(tmp_path):
    path = save(merged_bn_model(), tmp_path / "m.onnx")
    r, graph = inspect_model(path)
    assert r.shared == {}
    assert [p.tensor for p in graph.nodes[2].params] == ["bn.weight", "bn.bias"]
    assert r.statistics == TensorCount(2, 16)
    assert r.warnings[0].startswith("4 parameter(s) were Identity aliases")


def test_json_keys_are_in_a_fixed_order():
    r = report_of(conv_bn())
    assert list(r.to_json()) == ["model", "graph", "primitives", "parameters", "unsupported", "shared",
                                 "warnings", "bn_folded"]
    assert list(r.to_json()["parameters"])[:4] == ["predicted", "statistics", "unsupported", "other"]


def test_text_report_rounds_coverage_down():
    m = conv_bn([helper.make_node("Clip", ["y", "lo", "hi"], ["out"])],
                {"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)}, output="out")
    r = report_of(m)
    assert r.coverage_excluding_statistics < 1
    text = format_report(r)
    assert "100.00%" not in text
    assert " 99.14% of stored float elements, statistics excluded (232 / 234)" in text
