"""Predict never fails with anything but the project's own error, never writes partial files,
and gives bitwise-identical outputs for identical inputs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghn_onnx.writeback import write as writeback
from ghn_onnx.onnx_io.loading import load_model
from ghn_onnx.errors import CheckpointError, GhnOnnxError
from ghn_onnx.ghn import GHN, GHNConfig, checkpoint
from ghn_onnx.pipeline import predict, predict_files

SMALL = ("deepnets_17", "deepnets_6", "resnet18")


@pytest.fixture(scope="module")
def ghn() -> GHN:
    torch.manual_seed(0)
    return GHN(GHNConfig()).eval()


@pytest.fixture(scope="module")
def small_models(parity_dir) -> dict[str, onnx.ModelProto]:
    return {n: load_model(parity_dir / f"{n}.onnx") for n in SMALL}


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_same_input_gives_bitwise_identical_output(parity_dir, ghn, tmp_path):
    src = parity_dir / "deepnets_17.onnx"
    before = _digest(src)
    predict_files([src], [tmp_path / "a.onnx"], ghn)
    predict_files([src], [tmp_path / "b.onnx"], ghn)
    assert _digest(tmp_path / "a.onnx") == _digest(tmp_path / "b.onnx")
    assert _digest(src) == before


def test_batched_files_equal_single_files(parity_dir, ghn, tmp_path):
    """Batching changes only float rounding (matrix products over more rows), not values."""
    srcs = [parity_dir / f"{n}.onnx" for n in ("deepnets_17", "deepnets_6")]
    predict_files(srcs, [tmp_path / "x0.onnx", tmp_path / "x1.onnx"], ghn)
    for i, s in enumerate(srcs):
        predict_files([s], [tmp_path / f"y{i}.onnx"], ghn)
        a = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / f"x{i}.onnx").graph.initializer}
        b = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / f"y{i}.onnx").graph.initializer}
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_interrupted_write_leaves_no_partial_output(parity_dir, ghn, tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous result")

    def boom(path, data):  # interrupted half way through the write (data: bytes, or pieces of them)
        data = data if isinstance(data, bytes) else b"".join(data)
        Path(path).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(writeback, "_write_bytes", boom)
    with pytest.raises(KeyboardInterrupt):
        predict_files([parity_dir / "deepnets_17.onnx"], [out], ghn)
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, ghn):
    path = tmp_path / "ghn.safetensors"
    checkpoint.save(ghn, path)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        checkpoint.load(tmp_path / "trunc.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path / "garbage.safetensors")
    with pytest.raises(CheckpointError, match="no such"):
        checkpoint.load(tmp_path / "missing.safetensors")


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    small = GHN(GHNConfig(num_classes=100))
    checkpoint.save(small, tmp_path / "c100.safetensors")
    loaded = checkpoint.load(tmp_path / "c100.safetensors")  # its own config travels with it
    assert loaded.config.num_classes == 100
    state = {k: v for k, v in small.state_dict().items()}
    with pytest.raises(CheckpointError, match="shape"):
        checkpoint.from_state_dict(state, GHNConfig())
    del state["ln.weight"]
    with pytest.raises(CheckpointError, match="missing ln.weight"):
        checkpoint.from_state_dict(state, GHNConfig(num_classes=100))


def test_checkpoint_round_trip_is_exact(tmp_path, ghn, parity_dir):
    checkpoint.save(ghn, tmp_path / "g.safetensors")
    again = checkpoint.load(tmp_path / "g.safetensors")
    for (k, a), (_, b) in zip(ghn.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


# -- mutations ---------------------------------------------------------------------------------

def _mutate(model: onnx.ModelProto, data) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    kind = data.draw(st.sampled_from(["drop_node", "dup_node", "reshape_init", "drop_init", "shuffle"]))
    if kind == "drop_node" and len(g.node) > 1:
        del g.node[data.draw(st.integers(0, len(g.node) - 1))]
    elif kind == "dup_node":
        i = data.draw(st.integers(0, len(g.node) - 1))
        g.node.insert(i, g.node[i])
    elif kind == "reshape_init" and len(g.initializer):
        t = g.initializer[data.draw(st.integers(0, len(g.initializer) - 1))]
        n = int(np.prod(t.dims))
        dims = data.draw(st.sampled_from([[n], [1, n], [n, 1, 1, 1], [max(n // 2, 1), 2] if n % 2 == 0 else [n, 1]]))
        del t.dims[:]
        t.dims.extend(dims)
    elif kind == "drop_init" and len(g.initializer):
        del g.initializer[data.draw(st.integers(0, len(g.initializer) - 1))]
    elif kind == "shuffle":
        nodes = list(g.node)
        order = data.draw(st.permutations(range(len(nodes))))
        del g.node[:]
        g.node.extend(nodes[i] for i in order)
    return m


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_models_raise_only_project_errors(small_models, ghn, data):
    name = data.draw(st.sampled_from(SMALL))
    model = small_models[name]
    for _ in range(data.draw(st.integers(1, 3))):
        model = _mutate(model, data)
    try:
        out = predict(model, ghn, name=name)
    except GhnOnnxError:
        return
    assert isinstance(out.model, onnx.ModelProto) and out.name == name


def test_empty_initializer_is_left_alone(ghn):
    """A zero-element weight has nothing to predict: it is skipped, the rest predicted."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w1"),
             numpy_helper.from_array(np.ones((0, 4, 1, 1), np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    out = {t.name: t for t in predict(model, ghn).model.graph.initializer}
    assert list(out["w2"].dims) == [0, 4, 1, 1] and not np.array_equal(numpy_helper.to_array(out["w1"]), np.ones((4, 3, 3, 3)))


# -- hostile configurations and checkpoints ----------------------------------------------------

@pytest.mark.parametrize("fields, expect", [
    ({"hid": -32}, r"hid: expected an integer in \[4, 1024\] \(got -32\)"),
    ({"hid": 10 ** 7}, r"hid: expected an integer in \[4, 1024\]"),
    ({"hid": {}}, "hid: expected an integer"),
    ({"hid": True}, "hid: expected an integer"),
    ({"hid": 30}, "hid: expected a multiple of 4"),
    ({"max_shape": [64, 64, "eleven", 11]}, "max_shape: expected 4 integers"),
    ({"max_shape": 7}, "max_shape: expected 4 integers"),
    ({"max_shape": [64, 64, 11, 12]}, "max_shape: expected 4 integers"),
    ({"max_shape": [0, 64, 11, 11]}, r"max_shape: expected out in \[1, 1024\]"),
    ({"ve_cutoff": {"a": 1}}, "ve_cutoff: expected an integer"),
    ({"num_classes": 0}, "num_classes: expected an integer"),
    ({"weight_norm": "yes"}, "weight_norm: expected true or false"),
    ([1, 2], "expected a JSON object"),
])
def test_config_fields_are_checked_by_type_and_range(fields, expect):
    with pytest.raises(CheckpointError, match=expect):
        GHNConfig.from_dict(fields)


def test_hostile_header_builds_no_ghn(tmp_path, monkeypatch):
    """A config that asks for a big GHN, over tensors that do not hold it: refused from the
    shapes of a GHN built on the meta device, before a real one is built."""
    from safetensors.torch import save_file

    path = tmp_path / "g.safetensors"
    save_file({"embed.weight": torch.zeros(15, 1024)}, str(path),
              metadata={"format": checkpoint.FORMAT, "config": '{"hid": 1024, "max_shape": [1024, 1024, 64, 64]}'})
    built = []
    real_init = GHN.__init__

    def recording_init(self, *args, **kwargs):
        built.append(torch.get_default_device().type)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(GHN, "__init__", recording_init)
    with pytest.raises(CheckpointError, match="keys do not match"):
        checkpoint.load(path)
    assert built == ["meta"]


def test_predict_files_reports_each_bad_input_and_goes_on(parity_dir, ghn, tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    errors = []
    preds = predict_files([tmp_path / "bad.onnx", parity_dir / "deepnets_17.onnx"],
                          [tmp_path / "out" / "bad.onnx", tmp_path / "good.onnx"], ghn,
                          on_error=lambda src, exc: errors.append((Path(src).name, str(exc))))
    assert [p.output for p in preds] == [str(tmp_path / "good.onnx")]
    assert len(errors) == 1 and errors[0][0] == "bad.onnx" and "not a readable ONNX model" in errors[0][1]
    with pytest.raises(GhnOnnxError, match="not a readable ONNX model"):  # without on_error: the first error
        predict_files([tmp_path / "bad.onnx"], [tmp_path / "x.onnx"], ghn)
