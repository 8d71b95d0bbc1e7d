"""Write-back of predicted parameters into ONNX files, and saving them safely."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import stat
from collections import Counter
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

import ghn_onnx
from ghn_onnx.convert import convert
from ghn_onnx.onnx_io.loading import load_model
from ghn_onnx.errors import GhnOnnxError, OutputError
from ghn_onnx.onnx_io.storage import stored_tensors, untie_aliases
from ghn_onnx.writeback import write as writeback
from ghn_onnx.writeback.write import resolve_shared, save_model, write_predictions
from writeback_models import (TinyResNet, bf16_conv_model, export, matmul_model, randomise_bn, run,
                                    transpose_matmul_model)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def random_predictions(graph, seed: int = 0, scale: float = 0.3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(ref.canonical_shape) * scale).astype(np.float32)
            for name, ref in resolve_shared(graph).items()}


def stored_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(stored_tensors(model)[name])


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    module = randomise_bn(TinyResNet())
    model = export(module, torch.randn(2, 3, 16, 16))
    return module, model, convert(model)


def load_into(module: torch.nn.Module, predictions: dict[str, np.ndarray]) -> torch.nn.Module:
    """PyTorch's layouts are the canonical ones and export keeps state-dict names."""
    state = module.state_dict()
    state.update({k: torch.from_numpy(v) for k, v in predictions.items()})
    module.load_state_dict(state)
    return module.eval()


# -- values land where they were read from -----------------------------------------------------

def test_resnet_predictions_match_torch(resnet):
    module, model, graph = resnet
    assert any(n.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in n.attribute)
               for n in model.graph.node)
    preds = random_predictions(graph)
    assert {"conv0.weight", "bn0.weight", "bn0.bias", "fc.weight", "fc.bias"} <= set(preds)
    out = write_predictions(model, graph, preds)
    x = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = load_into(copy.deepcopy(module), preds)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(out, x), expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(stored_array(out, "fc.weight"), preds["fc.weight"])  # Gemm transB=1: as is


def test_matmul_weight_stored_in_out(rng=np.random.default_rng(2)):
    model = matmul_model(rng)
    graph = convert(model)
    preds = random_predictions(graph)
    assert preds["W1"].shape == (5, 6) and preds["W2"].shape == (3, 5)  # canonical (out, in)
    out = write_predictions(model, graph, preds)
    np.testing.assert_array_equal(stored_array(out, "W1"), preds["W1"].T)
    x = rng.standard_normal((7, 6)).astype(np.float32)
    t = torch.from_numpy
    expected = F.linear(torch.relu(F.linear(t(x), t(preds["W1"]), t(preds["b1"]))), t(preds["W2"]))
    np.testing.assert_allclose(run(out, x), expected.numpy(), atol=1e-4, rtol=1e-4)


def test_transpose_then_matmul(rng=np.random.default_rng(3)):
    model = transpose_matmul_model(rng)
    graph = convert(model)
    preds = random_predictions(graph)
    out = write_predictions(model, graph, preds)
    np.testing.assert_array_equal(stored_array(out, "W"), preds["W"])  # stored (out, in) already
    x = rng.standard_normal((7, 6)).astype(np.float32)
    expected = F.linear(torch.from_numpy(x), torch.from_numpy(preds["W"])).numpy()
    np.testing.assert_allclose(run(out, x), expected, atol=1e-4, rtol=1e-4)


def test_broadcast_bias_keeps_its_stored_shape(rng=np.random.default_rng(8)):
    """Conv without bias, then ``Add`` of a ``(1, C, 1, 1)`` vector: predicted as ``(C,)``."""
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal((1, 4, 1, 1)).astype(np.float32), "b")
    graph_proto = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), onnx.helper.make_node("Add", ["c", "b"], ["y"])],
        "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])], [w, b])
    model = onnx.helper.make_model(graph_proto, opset_imports=[onnx.helper.make_opsetid("", 17)])
    graph = convert(model)
    preds = random_predictions(graph)
    assert preds["b"].shape == (4,)
    out = write_predictions(model, graph, preds)
    assert stored_array(out, "b").shape == (1, 4, 1, 1)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    expected = F.conv2d(torch.from_numpy(x), torch.from_numpy(preds["W"]), torch.from_numpy(preds["b"]), padding=1)
    np.testing.assert_allclose(run(out, x), expected.numpy(), atol=1e-4, rtol=1e-4)


def test_fp16_model():
    torch.manual_seed(0)
    module = randomise_bn(TinyResNet()).half()
    model = export(module, torch.randn(2, 3, 16, 16).half())
    graph = convert(model)
    preds = random_predictions(graph)
    out = write_predictions(model, graph, preds)
    for name, value in preds.items():
        stored = stored_array(out, name)
        assert stored.dtype == np.float16
        np.testing.assert_array_equal(stored, value.astype(np.float16))
    x = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)
    reference = load_into(module.float(), {k: v.astype(np.float16).astype(np.float32) for k, v in preds.items()})
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(out, x.astype(np.float16)).astype(np.float32), expected, atol=3e-2, rtol=3e-2)


def test_bf16_model_rounds_to_nearest_even(rng=np.random.default_rng(4)):
    model = bf16_conv_model(rng)
    graph = convert(model)
    preds = random_predictions(graph)
    # Ties: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7 (rounds to even: 1); 1 + 3*2^-8 to 1 + 2^-6.
    preds["b"][:2] = [1 + 2**-8, 1 + 3 * 2**-8]
    out = write_predictions(model, graph, preds)
    const = next(n for n in out.graph.node if n.op_type == "Constant")
    assert const.attribute[0].t.data_type == onnx.TensorProto.BFLOAT16
    assert [t.name for t in out.graph.initializer] == ["b"]
    for name in ("W", "b"):
        stored = stored_array(out, name)
        assert stored.dtype == ml_dtypes.bfloat16
        torch_bits = torch.from_numpy(preds[name]).bfloat16().view(torch.int16).numpy()
        np.testing.assert_array_equal(stored.view(np.int16), torch_bits)
    assert stored_array(out, "b")[:2].astype(np.float32).tolist() == [1.0, 1 + 2**-6]
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    w, b = (torch.from_numpy(preds[k]).bfloat16().float() for k in ("W", "b"))
    expected = F.conv2d(torch.from_numpy(x), w, b, padding=1).numpy()
    np.testing.assert_allclose(run(out, x), expected, atol=1e-4, rtol=1e-4)


def test_double_model(rng=np.random.default_rng(5)):
    model = transpose_matmul_model(rng)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(stored_array(model, "W").astype(np.float64), "W"))
    graph = convert(model)
    preds = {"W": rng.standard_normal((4, 6))}
    out = write_predictions(model, graph, preds)
    assert stored_array(out, "W").dtype == np.float64
    np.testing.assert_array_equal(stored_array(out, "W"), preds["W"])


# -- everything else is untouched --------------------------------------------------------------

def test_everything_else_byte_identical(resnet):
    _, model, graph = resnet
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.doc_string = "a doc string"
    model.metadata_props.add(key="author", value="someone")
    model.metadata_props.add(key="ghn_onnx.stale", value="from an earlier run")
    before = model.SerializeToString()
    preds = random_predictions(graph)
    del preds["fc.bias"]  # an unpredicted parameter keeps its value
    out = write_predictions(model, graph, preds, metadata={"checkpoint_sha256": "abc", "bn": "calibrated"})
    assert model.SerializeToString() == before  # input untouched

    assert [t.name for t in out.graph.initializer] == [t.name for t in model.graph.initializer]
    for old, new in zip(model.graph.initializer, out.graph.initializer):
        if old.name in preds:
            assert list(new.dims) == list(old.dims) and new.data_type == old.data_type
        else:
            assert new.SerializeToString() == old.SerializeToString()

    def skeleton(m):
        m = onnx.ModelProto.FromString(m.SerializeToString())
        for t in m.graph.initializer:
            if t.name in preds:
                t.ClearField("raw_data")
        del m.metadata_props[:]
        return m.SerializeToString()

    assert skeleton(out) == skeleton(model)  # nodes, inputs, outputs, opset, IR version, producer...
    assert out.ir_version == model.ir_version and list(out.opset_import) == list(model.opset_import)
    meta = [(p.key, p.value) for p in out.metadata_props]
    assert meta[0] == ("author", "someone")
    assert dict(meta) == {
        "author": "someone", "ghn_onnx.bn": "calibrated", "ghn_onnx.checkpoint_sha256": "abc",
        "ghn_onnx.version": ghn_onnx.__version__,
        "ghn_onnx.predicted_tensors": dict(meta)["ghn_onnx.predicted_tensors"],
    }
    listed = json.loads(dict(meta)["ghn_onnx.predicted_tensors"])
    assert listed == {"count": len(preds), "names": [n for n in resolve_shared(graph) if n in preds]}

    again = write_predictions(out, graph, preds)  # re-predicting replaces our keys only
    assert {p.key for p in again.metadata_props} == {"author", "ghn_onnx.version", "ghn_onnx.predicted_tensors"}


@pytest.mark.parametrize("bad, message", [
    ({"conv0.weight": np.zeros((8, 3, 3, 2), np.float32)}, "canonical shape"),
    ({"fc.bias": np.full(10, np.nan, np.float32)}, "non-finite"),
    ({"fc.bias": np.full(10, np.inf, np.float32)}, "non-finite"),
    ({"nope": np.zeros(3, np.float32)}, "does not have"),
])
def test_bad_predictions_raise(resnet, bad, message):
    _, model, graph = resnet
    with pytest.raises(GhnOnnxError, match=message):
        write_predictions(model, graph, bad)


def test_fp16_overflow_and_bad_metadata_raise():
    torch.manual_seed(0)
    model = export(torch.nn.Linear(4, 3).half(), torch.randn(2, 4).half())
    graph = convert(model)
    with pytest.raises(GhnOnnxError, match="overflow"):
        write_predictions(model, graph, {"weight": np.full((3, 4), 1e5, np.float32)})
    with pytest.raises(GhnOnnxError, match="set by ghn_onnx"):
        write_predictions(model, graph, {}, metadata={"version": "1"})


def read_twice(graph) -> list[str]:
    """Stored tensors that more than one ParamRef of ``graph`` reads."""
    counts = Counter(p.tensor for p in graph.predicted_tensors())
    return [name for name, k in counts.items() if k > 1]


def test_shared_tensor_first_node_wins(rng=np.random.default_rng(6)):
    """One initializer read by two MatMuls (tied weights): the first node's prediction is written."""
    model = matmul_model(rng, d_in=5, d_hidden=5, d_out=5)
    model.graph.node[3].input[1] = "W1"
    model.graph.initializer.pop()  # W2 is gone; both layers read W1
    graph = convert(model)
    assert read_twice(graph) == ["W1"]
    owner = resolve_shared(graph)["W1"]
    assert owner is graph.nodes[[n.name for n in graph.nodes].index("W1")].params[0]
    preds = random_predictions(graph)
    out = write_predictions(model, graph, preds)
    np.testing.assert_array_equal(stored_array(out, "W1"), preds["W1"].T)


def test_untie_aliases_gives_each_parameter_its_own_tensor():
    """A fresh BN export reads every BN weight and running_var from one all-ones tensor."""
    torch.manual_seed(0)
    module = TinyResNet()
    model = export(module, torch.randn(2, 3, 16, 16))
    tied = convert(model)
    assert read_twice(tied)  # e.g. bn1.weight is an Identity of bn0.weight
    untied, names = untie_aliases(model)
    assert "bn1.weight" in names and "bn0.running_var" in names
    graph = convert(untied)
    assert not read_twice(graph)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(run(untied, x), run(model, x), atol=1e-6)
    preds = random_predictions(graph)
    out = write_predictions(untied, graph, preds)
    with torch.no_grad():
        expected = load_into(module, preds)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(out, x), expected, atol=1e-4, rtol=1e-4)


# -- files -------------------------------------------------------------------------------------

def predict_file(src: Path, dst: Path, seed: int = 0, **save_kw) -> onnx.ModelProto:
    model = load_model(src)
    graph = convert(model)
    out = write_predictions(model, graph, random_predictions(graph, seed), metadata={"checkpoint_sha256": "x"})
    save_model(out, dst, source_path=src, **save_kw)
    return out


def test_predict_to_file_leaves_input_alone(resnet, tmp_path):
    _, model, _ = resnet
    src = tmp_path / "in.onnx"
    onnx.save_model(model, str(src))
    digest = sha(src)
    out = predict_file(src, tmp_path / "out.onnx")
    assert sha(src) == digest
    assert not (tmp_path / "out.onnx.data").exists()
    onnx.checker.check_model(str(tmp_path / "out.onnx"))
    x = np.ones((1, 3, 16, 16), np.float32)
    np.testing.assert_array_equal(run(str(tmp_path / "out.onnx"), x), run(out, x))
    with pytest.raises(GhnOnnxError, match="refusing to overwrite"):
        save_model(out, tmp_path / "sub" / ".." / "in.onnx", source_path=src)
    assert sha(src) == digest
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx"]


def data_files(folder: Path, name: str = "out.onnx") -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(name + ".") and p.name.endswith(".data"))


def test_external_data_round_trip(resnet, tmp_path):
    _, model, _ = resnet
    src = tmp_path / "in.onnx"
    onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), str(src),
                    save_as_external_data=True, location="in.onnx.data", size_threshold=1024)
    digests = {p: sha(p) for p in (src, tmp_path / "in.onnx.data")}
    dst = tmp_path / "out.onnx"
    out = predict_file(src, dst, external_data=True)
    [data_name] = data_files(tmp_path)  # named after its content: out.onnx.<16 hex digits>.data
    assert len(data_name) == len("out.onnx.") + 16 + len(".data")
    first = {p: sha(p) for p in (dst, tmp_path / data_name)}
    predict_file(src, dst, external_data=True)  # again over the old output: same bytes, same names
    assert {p: sha(p) for p in first} == first and data_files(tmp_path) == [data_name]
    assert {p: sha(p) for p in digests} == digests
    assert not os.path.samefile(tmp_path / data_name, tmp_path / "in.onnx.data")
    skeleton = onnx.load(str(dst), load_external_data=False)
    locations = {e.value for t in skeleton.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {data_name}
    onnx.checker.check_model(str(dst))
    x = np.ones((1, 3, 16, 16), np.float32)
    np.testing.assert_array_equal(run(str(dst), x), run(out, x))
    with pytest.raises(GhnOnnxError, match="refusing to overwrite"):  # "in.onnx.data" is the input's
        save_model(out, tmp_path / "in.onnx", source_path=src, external_data=True)
    with pytest.raises(GhnOnnxError, match="refusing to overwrite"):  # the output is the input's data file
        save_model(out, tmp_path / "in.onnx.data", source_path=src)
    with pytest.raises(GhnOnnxError, match="external data file"):  # data left behind in in.onnx.data
        save_model(onnx.load(str(src), load_external_data=False), tmp_path / "other.onnx")
    with pytest.raises(GhnOnnxError, match="does not exist"):
        save_model(out, tmp_path / "missing" / "out.onnx")
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "in.onnx.data", "out.onnx", data_name]
    # Other predictions replace the pair, and the old data file goes once the new pair is in.
    predict_file(src, dst, external_data=True, seed=1)
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "in.onnx.data", "out.onnx", *data_files(tmp_path)]
    assert data_files(tmp_path) != [data_name]
    onnx.checker.check_model(str(dst))


def test_output_is_deterministic(resnet, tmp_path):
    _, model, graph = resnet
    preds = random_predictions(graph)
    a = write_predictions(model, graph, preds, metadata={"a": "1", "b": "2"})
    b = write_predictions(model, graph, dict(reversed(list(preds.items()))), metadata={"b": "2", "a": "1"})
    save_model(a, tmp_path / "a.onnx")
    save_model(b, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


@pytest.mark.parametrize("external", [False, True])
def test_interrupted_write_leaves_no_partial_file(resnet, tmp_path, monkeypatch, external):
    _, model, graph = resnet
    out = write_predictions(model, graph, random_predictions(graph))
    dst = tmp_path / "out.onnx"
    dst.write_bytes(b"previous model")
    (tmp_path / "out.onnx.data").write_bytes(b"previous data")
    real_save = onnx.save_model

    def dies_midway(proto, f, *args, **kwargs):  # external data: let it write, then truncate
        real_save(proto, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:100])
        raise OSError("disk full")

    def dies_writing(path, data):  # inline: the first bytes, then the disk fills
        Path(path).write_bytes(data[:100])
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", dies_midway)
    monkeypatch.setattr(writeback, "_write_bytes", dies_writing)
    with pytest.raises(OutputError, match="cannot write .disk full"):
        save_model(out, dst, external_data=external)
    assert dst.read_bytes() == b"previous model"
    assert (tmp_path / "out.onnx.data").read_bytes() == b"previous data"
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.data"]


class Crash(BaseException):
    """The process dies here: nothing after it runs, no cleanup either."""


FILE_STEPS = ("replace", "fsync", "unlink", "write")


@pytest.mark.parametrize("step", range(12))
def test_external_data_pair_survives_a_crash_at_any_step(resnet, tmp_path, monkeypatch, step):
    """Old pair on disk, a new one being saved, the process dies at file operation ``step``:
    the model on disk loads with its data, and is the old model or the new one, never a mix."""
    _, model, graph = resnet
    old = write_predictions(model, graph, random_predictions(graph, seed=1))
    new = write_predictions(model, graph, random_predictions(graph, seed=2))
    dst = tmp_path / "out.onnx"
    save_model(old, dst, external_data=True)
    calls = {"n": 0, "crashed": False}

    def guard(real):
        def step_or_crash(*args, **kwargs):
            if calls["crashed"]:
                return None  # a dead process does nothing more
            calls["n"] += 1
            if calls["n"] > step:
                calls["crashed"] = True
                raise Crash
            return real(*args, **kwargs)
        return step_or_crash

    monkeypatch.setattr(os, "replace", guard(os.replace))
    monkeypatch.setattr(os, "fsync", guard(os.fsync))
    monkeypatch.setattr(Path, "unlink", guard(Path.unlink))
    monkeypatch.setattr(writeback, "_write_bytes", guard(writeback._write_bytes))
    monkeypatch.setattr(writeback.shutil, "rmtree", guard(writeback.shutil.rmtree))
    try:
        save_model(new, dst, external_data=True)
    except Crash:
        pass
    monkeypatch.undo()
    loaded = onnx.load(str(dst))  # with its external data: every location it names exists and is whole
    values = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    matches = [all(np.array_equal(values[t.name], numpy_helper.to_array(t)) for t in m.graph.initializer)
               for m in (old, new)]
    assert any(matches), f"crash at step {step}: the model on disk is neither the old nor the new one"
    if not calls["crashed"]:  # the save completed: the new pair, and the old data file is gone
        assert matches[1] and len(data_files(tmp_path)) == 1


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/null", "folder", "hard link to the input",
                                  "symbolic link to the input", "empty name"])
def test_outputs_that_are_not_ours_are_refused(resnet, tmp_path, kind):
    _, model, _ = resnet
    src = tmp_path / "in.onnx"
    onnx.save_model(model, str(src))
    digest = sha(src)
    dst = tmp_path / "out.onnx"
    if kind == "fifo":
        os.mkfifo(dst)
    elif kind == "link to /dev/null":
        dst.symlink_to("/dev/null")
    elif kind == "folder":
        dst.mkdir()
    elif kind == "hard link to the input":
        os.link(src, dst)
    elif kind == "symbolic link to the input":
        dst.symlink_to(src)
    before = os.lstat(dst) if kind != "empty name" else None
    expect = {"fifo": "is a FIFO", "link to /dev/null": "is a character device (through a symbolic link)",
              "folder": "is a directory", "empty name": "not a file name"}.get(kind, "refusing to overwrite")
    with pytest.raises(GhnOnnxError, match=re.escape(expect)):
        save_model(load_model(src), "" if kind == "empty name" else dst, source_path=src)
    assert sha(src) == digest
    if before is not None:
        after = os.lstat(dst)
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_check_output_file_refuses_a_device_without_touching_it():
    from ghn_onnx.onnx_io.files import check_output_file

    with pytest.raises(GhnOnnxError, match="is a character device"):
        check_output_file("/dev/null")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_refused_write_is_an_output_error(resnet, tmp_path, monkeypatch):
    _, model, graph = resnet
    out = write_predictions(model, graph, random_predictions(graph))

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(writeback.tempfile, "mkdtemp", read_only)
    with pytest.raises(OutputError, match=r"out.onnx: cannot write \(Read-only file system\)"):
        save_model(out, tmp_path / "out.onnx")
    assert not list(tmp_path.iterdir())
