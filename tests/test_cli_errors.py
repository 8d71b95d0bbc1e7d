"""Bad input through the CLI: exit code 2, one clear line, no traceback, input untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import file_digest
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import conv_model, model, save, weights

from ghn_onnx.cli import main


def run_bad(path: Path, *extra: str, expect: str) -> str:
    """Run ``inspect`` on a bad input and check how it fails; returns the error line."""
    before = file_digest(path)
    result = CliRunner().invoke(main, ["inspect", str(path), *extra])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # a handled error, not a crash
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    assert expect in lines[0], lines[0]
    assert file_digest(path) == before
    return lines[0]


def test_missing_file(tmp_path):
    run_bad(tmp_path / "nope.onnx", expect="no such file")
    assert not (tmp_path / "nope.onnx").exists()


def test_directory(tmp_path):
    run_bad(tmp_path, expect="is a directory")


def test_text_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("These are my notes, not a model.\n")
    run_bad(path, expect="not a readable ONNX model")


@pytest.mark.parametrize("suffix", [".json", ".textproto", ".onnxtxt"])
def test_text_file_with_a_suffix_onnx_parses_differently(tmp_path, suffix):
    # onnx.load picks its parser by suffix, and each parser has its own error types.
    path = tmp_path / f"notes{suffix}"
    path.write_text("hello world\n")
    run_bad(path, expect="not a readable ONNX model")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    run_bad(path, expect="not an ONNX model")


def test_truncated_protobuf(tmp_path, parity_dir):
    data = (parity_dir / "deepnets_17.onnx").read_bytes()
    path = tmp_path / "half.onnx"
    path.write_bytes(data[: len(data) // 2])
    run_bad(path, expect="not a readable ONNX model")


def test_node_missing_a_required_input(tmp_path):
    # Parses as protobuf but breaks the spec: a Conv without its weight.
    m = model([helper.make_node("Conv", ["x"], ["y"], name="stem")], {"x": [1, 3, 8, 8]}, ["y"])
    path = save(m, tmp_path / "broken.onnx")
    run_bad(path, expect="invalid ONNX model (Conv node 'stem' has 1 input(s), the spec requires at least 2)")


def external_data_model(tmp_path: Path) -> tuple[Path, Path]:
    path = tmp_path / "ext.onnx"
    onnx.save(conv_model(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    return path, tmp_path / "ext.onnx.data"


def test_external_data_loads_when_present(tmp_path):
    path, _ = external_data_model(tmp_path)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output


def test_missing_external_data(tmp_path):
    path, data = external_data_model(tmp_path)
    data.unlink()
    run_bad(path, expect="external data file 'ext.onnx.data'")


def test_truncated_external_data(tmp_path):
    path, data = external_data_model(tmp_path)
    data.write_bytes(data.read_bytes()[:100])
    run_bad(path, expect="external data")


def test_no_parametrised_layers(tmp_path):
    path = save(model([helper.make_node("Relu", ["x"], ["y"])], {"x": [1, 3, 8, 8]}, ["y"]), tmp_path / "relu.onnx")
    run_bad(path, expect="no parametrised layers")


def test_quantized_qlinearconv(tmp_path):
    scalar = lambda v, t: helper.make_tensor(v[0], t, [], [v[1]])  # noqa: E731
    inits = [scalar(("xs", 0.1), TensorProto.FLOAT), scalar(("xz", 0), TensorProto.UINT8),
             scalar(("ws", 0.1), TensorProto.FLOAT), scalar(("wz", 0), TensorProto.INT8),
             scalar(("ys", 0.1), TensorProto.FLOAT), scalar(("yz", 0), TensorProto.UINT8),
             numpy_helper.from_array(np.ones((8, 3, 3, 3), np.int8), "w")]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "q.onnx")
    run_bad(path, expect="quantized model (QLinearConv)")


def test_quantized_dequantize_linear_weights(tmp_path):
    init = {"ws": np.array(0.1, np.float32)}
    wq = numpy_helper.from_array(np.ones((8, 3, 3, 3), np.int8), "wq")
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"]), helper.make_node("Conv", ["x", "w"], ["y"])]
    m = model(nodes, {"x": [1, 3, 8, 8]}, ["y"], init)
    m.graph.initializer.append(wq)
    path = save(m, tmp_path / "dq.onnx")
    run_bad(path, expect="quantized model (DequantizeLinear)")


def test_control_flow_if(tmp_path):
    branch = lambda name, v: helper.make_graph(  # noqa: E731
        [helper.make_node("Constant", [], [f"{name}_out"], value=numpy_helper.from_array(np.float32(v)))],
        name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [])])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("ReduceMax", ["c"], ["m"], keepdims=0),
             helper.make_node("Greater", ["m", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["k"], then_branch=branch("then", 1.0), else_branch=branch("else", 2.0)),
             helper.make_node("Mul", ["c", "k"], ["y"])]
    init = {"w": weights((8, 3, 3, 3)), "zero": np.array(0, np.float32)}
    path = save(model(nodes, {"x": [1, 3, 8, 8]}, ["y"], init), tmp_path / "if.onnx")
    run_bad(path, expect="control flow (If)")


def test_control_flow_loop(tmp_path):
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Relu", ["v_in"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Loop", ["n", "", "c"], ["y"], body=body)]
    init = {"w": weights((8, 3, 3, 3)), "n": np.array(3, np.int64)}
    path = save(model(nodes, {"x": [1, 3, 8, 8]}, ["y"], init), tmp_path / "loop.onnx")
    run_bad(path, expect="control flow (Loop)")


@pytest.mark.parametrize("option", ["--png", "--svg"])
def test_refuses_to_draw_over_the_input(tmp_path, option):
    path = save(conv_model(), tmp_path / "m.onnx")
    run_bad(path, option, str(path), expect="refusing to draw over the input model")
