"""Bad input through the CLI: exit code 2, one clear line, no traceback, input untouched."""

from __future__ import annotations

import os
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


# -- graphs that break the spec: refused on load, before anything loops or allocates ----------------

def _conv_then(*nodes, extra_inits=()) -> onnx.ModelProto:
    m = model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), *nodes], {"x": [1, 3, 8, 8]}, ["y"],
              {"w": weights((4, 3, 3, 3))})
    m.graph.initializer.extend(extra_inits)
    return m


def _declared(name: str, dims: list[int]) -> onnx.TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT)
    t.dims.extend(dims)
    return t


@pytest.mark.parametrize("nodes, extra, expect", [
    ([helper.make_node("Add", ["c", "y"], ["y"], name="selfish")], (),
     "invalid ONNX model (Add node 'selfish' reads its own output 'y')"),
    ([helper.make_node("Add", ["c", "c"], ["a"], name="n0"), helper.make_node("Add", ["a", "r3"], ["r1"], name="n1"),
      helper.make_node("Relu", ["r1"], ["r2"], name="n2"), helper.make_node("Relu", ["r2"], ["r3"], name="n3"),
      helper.make_node("Relu", ["r1"], ["y"])], (), "the graph has a cycle of 3 nodes"),
    ([helper.make_node("Relu", ["c"], ["y"], name="a"), helper.make_node("Relu", ["c"], ["y"], name="b")], (),
     "tensor 'y' is produced by two nodes: Relu node 'a' and Relu node 'b'"),
    ([helper.make_node("Relu", ["c"], ["w"]), helper.make_node("Relu", ["c"], ["y"])], (),
     "writes 'w', which is already an initializer or graph input"),
    ([helper.make_node("ReduceMean", ["c"], []), helper.make_node("Relu", ["c"], ["y"])], (), "has no outputs"),
    ([helper.make_node("Flatten", ["c"], ["f"]), helper.make_node("Gemm", ["f", "big"], ["y"], transB=1)],
     (_declared("big", [2 ** 31, 2 ** 31]),), "declares shape (2147483648, 2147483648)"),
    ([helper.make_node("Conv", ["c", "w2"], ["y"])], (_declared("w2", [-4, 4, 1, 1]),), "has a negative dimension"),
])
def test_graphs_that_break_the_spec(tmp_path, nodes, extra, expect):
    run_bad(save(_conv_then(*nodes, extra_inits=extra), tmp_path / "bad.onnx"), expect=expect)


def test_constant_whose_shape_disagrees_with_its_data(tmp_path):
    const = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones(6, np.float32)))
    const.attribute[0].t.dims[:] = [2, 5]
    path = save(_conv_then(const, helper.make_node("Reshape", ["c", "k"], ["y"])), tmp_path / "bad.onnx")
    run_bad(path, expect="declares shape (2, 5) (10 values) but holds 24 bytes of raw data")


@pytest.mark.parametrize("name, expect", [("hidden", "graph.node[1].output[0] = b'\\xffidden' is not valid UTF-8"),
                                          ("Sigmoid", "op_type = b'\\xffigmoid' is not valid UTF-8")])
def test_strings_that_are_not_utf8(tmp_path, name, expect):
    m = _conv_then(helper.make_node("Sigmoid", ["c"], ["hidden"]), helper.make_node("Relu", ["hidden"], ["y"]))
    path = tmp_path / "bad.onnx"
    path.write_bytes(m.SerializeToString().replace(name.encode(), b"\xff" + name[1:].encode()))
    run_bad(path, expect=expect)


def test_a_nested_string_that_is_not_utf8_is_named_by_its_path(tmp_path):
    m = _conv_then(helper.make_node("Flatten", ["c"], ["f"], axis=1), helper.make_node("Relu", ["f"], ["y"]))
    path = tmp_path / "bad.onnx"
    path.write_bytes(m.SerializeToString().replace(b"axis", b"\xffxis"))
    run_bad(path, expect="graph.node[1].attribute[0].name = b'\\xffxis' is not valid UTF-8")


def test_declared_sizes_over_the_element_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("GHN_ONNX_MAX_ELEMENTS", "100")
    line = run_bad(save(conv_model(), tmp_path / "m.onnx"), expect="declares 576 parameter elements")
    assert "more than the budget of 100" in line and "GHN_ONNX_MAX_ELEMENTS" in line


def test_a_cycle_built_in_memory_is_refused_by_the_api():
    import ghn_onnx

    m = _conv_then(helper.make_node("Add", ["c", "r2"], ["r1"]), helper.make_node("Relu", ["r1"], ["r2"]),
                   helper.make_node("Relu", ["r1"], ["y"]))
    with pytest.raises(ghn_onnx.ModelLoadError, match="cycle of 2 nodes"):
        ghn_onnx.inspect(m)


# -- files that are not regular: refused before they are opened ------------------------------------

def test_fifo_model_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "m.onnx")
    run_bad(tmp_path / "m.onnx", expect="is a FIFO, not a regular file")


def test_link_to_dev_zero_is_not_read(tmp_path):
    (tmp_path / "m.onnx").symlink_to("/dev/zero")
    run_bad(tmp_path / "m.onnx", expect="is a character device, not a regular file")


def test_file_over_the_size_limit_is_not_read(tmp_path):
    with open(tmp_path / "m.onnx", "wb") as f:
        f.truncate(3 << 30)  # sparse (and not hashed here: reading it is what the limit avoids)
    assert "3,221,225,472 bytes, more than" in one_line_error(["inspect", str(tmp_path / "m.onnx")])


@pytest.mark.parametrize("location, expect", [("../out.data", "points outside the model's folder"),
                                              ("/dev/zero", "is an absolute path")])
def test_external_data_outside_the_model_folder(tmp_path, location, expect):
    m = conv_model()
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    (tmp_path / "sub").mkdir()
    run_bad(save(m, tmp_path / "sub" / "m.onnx"), expect=expect)


# -- usage errors and outputs --------------------------------------------------------------------

def one_line_error(args: list[str], code: int = 2) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.mark.parametrize("make_args, expect", [
    (lambda d, m: ["predict", m, "-o", str(d)], "Invalid value for '-o' / '--output': File"),
    (lambda d, m: ["predict", m, "-O", m], "Invalid value for '-O' / '--output-dir': Directory"),
    (lambda d, m: ["predict", m, "-o", str(d / "o.onnx"), "--checkpoint", str(d)], "Invalid value for '--checkpoint'"),
    (lambda d, m: ["predict", m, "--no-such-option"], "No such option"),
    (lambda d, m: ["predict"], "Missing argument"),
    (lambda d, m: ["no-such-command"], "No such command"),
])
def test_usage_errors_are_one_line(tmp_path, make_args, expect):
    path = save(conv_model(), tmp_path / "m.onnx")
    line = one_line_error(make_args(tmp_path, str(path)))
    assert expect in line and "--help" in line


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/null", "hard link to the input"])
def test_outputs_that_are_not_ours_exit_2(tmp_path, kind):
    path = save(conv_model(), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    {"fifo": lambda: os.mkfifo(out), "link to /dev/null": lambda: out.symlink_to("/dev/null"),
     "hard link to the input": lambda: os.link(path, out)}[kind]()
    before = file_digest(path), os.lstat(out).st_ino
    line = one_line_error(["predict", str(path), "-o", str(out)])
    assert ("not a regular file" in line) or ("refusing to overwrite" in line)
    assert (file_digest(path), os.lstat(out).st_ino) == before


@pytest.mark.parametrize("args", [["predict", "{m}", "-o", "/sys/ghn_onnx_test.onnx"],
                                  ["predict", "{m}", "-O", "/proc/ghn_onnx_test"]])
def test_outputs_the_system_refuses_exit_1(tmp_path, args):
    path = save(conv_model(), tmp_path / "m.onnx")
    line = one_line_error([a.format(m=path) for a in args], code=1)
    assert "cannot" in line


def test_batch_goes_on_past_a_bad_input(tmp_path):
    good = save(conv_model(), tmp_path / "good.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    result = CliRunner().invoke(main, ["predict", str(good), str(tmp_path / "bad.onnx"), "-O", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and "bad.onnx: not a readable ONNX model" in errors[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.onnx"]
    assert len(onnx.load(str(tmp_path / "out" / "good.onnx")).graph.node) == 1


def test_warnings_on_the_error_path_are_not_printed(tmp_path, monkeypatch):
    import warnings

    from ghn_onnx.errors import ModelLoadError
    from ghn_onnx.report import inspection

    def warns_then_fails(path):
        warnings.warn("a note from deep inside a library", UserWarning)
        raise ModelLoadError(f"{path}: broken")

    monkeypatch.setattr(inspection, "inspect_model", warns_then_fails)
    assert one_line_error(["inspect", str(tmp_path / "m.onnx")]).endswith("m.onnx: broken")


# -- hostile checkpoints -------------------------------------------------------------------------

def test_convert_checkpoint_refuses_a_pickle_without_running_it(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "r.pt").write_bytes(pickle.dumps({"state_dict": Evil(), "config": {"hid": 32}}))
    line = one_line_error(["convert-checkpoint", str(tmp_path / "r.pt"), "-o", str(tmp_path / "g.safetensors")])
    assert "r.pt: " in line and ("refused" in line or "not a loadable PyTorch checkpoint" in line)
    assert not marker.exists() and not (tmp_path / "g.safetensors").exists()


def test_convert_checkpoint_refuses_an_npz_of_strings(tmp_path):
    np.savez(tmp_path / "r.npz", **{"embed.weight": np.array(["a", "b"])})
    line = one_line_error(["convert-checkpoint", str(tmp_path / "r.npz"), "-o", str(tmp_path / "g.safetensors")])
    assert "r.npz: " in line and not (tmp_path / "g.safetensors").exists()


@pytest.mark.parametrize("option, expect", [(["--hid", "10000000"], "GHN config hid: expected an integer in [4, 1024]"),
                                            (["--spatial", "-3"], "GHN config max_shape: expected s in [1, 64]")])
def test_convert_checkpoint_refuses_configs_out_of_range(parity_dir, tmp_path, option, expect):
    line = one_line_error(["convert-checkpoint", str(parity_dir / "ghn2_random_cifar10.npz"), "-o",
                           str(tmp_path / "g.safetensors"), *option])
    assert expect in line and not (tmp_path / "g.safetensors").exists()


@pytest.mark.parametrize("config, expect", [
    ('{"hid": 10000000}', "GHN config hid: expected an integer in [4, 1024] (got 10000000)"),
    ('{"hid": {}}', "GHN config hid"), ('{"max_shape": [64, 64, "s", "s"]}', "GHN config max_shape"),
    ('{"ve_cutoff": {"a": 1}}', "GHN config ve_cutoff"), ("[1]", "expected a JSON object"),
    ('{"hid": 1024}', "keys do not match"),
])
def test_predict_refuses_hostile_checkpoint_headers(tmp_path, config, expect):
    import torch
    from safetensors.torch import save_file

    save_file({"embed.weight": torch.zeros(15, 32)}, str(tmp_path / "g.safetensors"),
              metadata={"format": "ghn-onnx/ghn2-v1", "config": config})
    path = save(conv_model(), tmp_path / "m.onnx")
    line = one_line_error(["predict", str(path), "-o", str(tmp_path / "o.onnx"), "--checkpoint",
                           str(tmp_path / "g.safetensors")])
    assert expect in line and not (tmp_path / "o.onnx").exists()
