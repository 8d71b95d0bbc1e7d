"""Reading a model with its large tensors left in the file (:mod:`ghn_onnx.onnx_io.deferred`):
the same model as a whole-file read once filled, the same predicted files, the same errors on
damaged files, and a clear refusal when the file changes before its tensors are read."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ghn_onnx import pipeline
from ghn_onnx.errors import GhnOnnxError, ModelLoadError
from ghn_onnx.ghn import GHN, GHNConfig
from ghn_onnx.onnx_io import deferred
from ghn_onnx.onnx_io.loading import open_model, read_model
from ghn_onnx.writeback.write import save_model
from onnx_builders import damaged_copies
from onnx_builders import model as build_model
from onnx_builders import weights

FIXTURES = sorted((Path(__file__).parent / "fixtures").rglob("*.onnx"))


@pytest.fixture(autouse=True)
def defer_everything(monkeypatch):
    """Small fixtures have few tensors over the production threshold: defer every float one."""
    monkeypatch.setattr(deferred, "DEFER_MIN_BYTES", 1)


@pytest.fixture(scope="module")
def ghn() -> GHN:
    torch.manual_seed(0)
    return GHN(GHNConfig()).eval()


def _mlp(path: Path, hidden: int = 6) -> Path:
    """Gemm -> Relu -> Gemm, with an int64 Reshape target among the initializers."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["x2"]),
             helper.make_node("Gemm", ["x2", "w1", "b1"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1)]
    m = build_model(nodes, {"x": [2, 2, 4]}, ["y"], {
        "w1": weights((hidden, 8), 1), "b1": weights((hidden,), 2), "w2": weights((3, hidden), 3),
        "b2": weights((3,), 4)})
    m.graph.initializer.append(numpy_helper.from_array(np.array([2, 8], np.int64), "shape"))
    m.metadata_props.add(key="owner", value="someone else")
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_filled_model_equals_a_whole_file_read(path):
    full, files = read_model(path)
    model, files_deferred, source = open_model(path)
    assert files_deferred == files
    if source is None:  # external data files: read whole
        assert files and model == full
        return
    assert source.pending(model) and model != full
    assert source.fill(model) > 0 and not source.pending(model)
    assert model == full


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_predicted_files_equal_a_whole_file_read(path, ghn, tmp_path, monkeypatch):
    """Conversion, prediction and write-back never need the deferred values: byte-equal outputs."""
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    [pa] = pipeline.predict_files([path], [a], ghn)
    monkeypatch.setattr(pipeline, "open_model", lambda p, m=None: (*read_model(p, m), None))
    [pb] = pipeline.predict_files([path], [b], ghn)
    assert a.read_bytes() == b.read_bytes()
    assert pa.model == pb.model  # the models handed back are complete
    assert [n.params for n in pa.graph.nodes] == [n.params for n in pb.graph.nodes]


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_predict_from_a_path_equals_predict_from_the_model(path, ghn):
    assert pipeline.predict(path, ghn).model == pipeline.predict(read_model(path)[0], ghn, name=path.name).model


def test_only_large_float_initializers_are_deferred(tmp_path, monkeypatch):
    monkeypatch.setattr(deferred, "DEFER_MIN_BYTES", 16)
    model, _, source = open_model(_mlp(tmp_path / "m.onnx"))
    assert [t.name for t in source.pending(model)] == ["w1", "b1", "w2"]  # 192, 24, 72 bytes; b2 12
    shape = next(t for t in model.graph.initializer if t.name == "shape")
    assert numpy_helper.to_array(shape).tolist() == [2, 8]  # 16 bytes, but int64: read


def test_the_input_file_is_only_read(tmp_path, ghn):
    src = _mlp(tmp_path / "m.onnx")
    before, mtime = src.read_bytes(), os.stat(src).st_mtime_ns
    pipeline.predict_files([src], [tmp_path / "out.onnx"], ghn, return_models=False)
    assert src.read_bytes() == before and os.stat(src).st_mtime_ns == mtime
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert not any(t.data_location == TensorProto.EXTERNAL for t in out.graph.initializer)
    assert {p.key: p.value for p in out.metadata_props}["owner"] == "someone else"


@pytest.mark.parametrize("change", ["truncate", "rewrite", "replace", "remove"])
def test_a_file_changed_before_its_tensors_are_read_is_refused(tmp_path, change):
    src = _mlp(tmp_path / "m.onnx")
    model, _, source = open_model(src)
    data = src.read_bytes()
    if change == "truncate":
        os.truncate(src, len(data) // 2)
    elif change == "rewrite":  # same size, other bytes, a later time
        src.write_bytes(data[::-1])
        os.utime(src, ns=(os.stat(src).st_atime_ns, os.stat(src).st_mtime_ns + 10**9))
    elif change == "replace":
        other = tmp_path / "other.onnx"
        other.write_bytes(data)
        os.replace(other, src)
    else:
        src.unlink()
    with pytest.raises(ModelLoadError, match="changed while it was being read|no such file"):
        source.fill(model)


def test_an_unfilled_model_is_never_written(tmp_path):
    model, _, source = open_model(_mlp(tmp_path / "m.onnx"))
    with pytest.raises(GhnOnnxError):
        save_model(model, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def _conv_bn(path: Path, c: int = 8) -> Path:
    """Conv -> BatchNormalization: the BN's running statistics are not predicted."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["h", "g", "b", "mean", "var"], ["y"])]
    m = build_model(nodes, {"x": [1, 3, 8, 8]}, ["y"], {
        "w": weights((c, 3, 3, 3)), "g": weights((c,), 1), "b": weights((c,), 2),
        "mean": weights((c,), 3), "var": np.abs(weights((c,), 4))})
    onnx.save(m, str(path))
    return path


def test_a_change_between_reading_and_writing_is_reported_per_file(tmp_path, ghn, monkeypatch):
    """The deferred tensors the GHN leaves alone (here BN running statistics) are read when the
    output is written; a file changed by then is one failed file with a one-line reason, and the
    others are written."""
    good, bad = _conv_bn(tmp_path / "good.onnx"), _conv_bn(tmp_path / "bad.onnx", c=4)
    real = pipeline._predict_prepared

    def and_truncate(*args, **kwargs):
        os.truncate(bad, 10)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_predict_prepared", and_truncate)
    errors = []
    written = pipeline.predict_files([good, bad], [tmp_path / "g.out", tmp_path / "b.out"], ghn,
                                     on_error=lambda p, e: errors.append((p, str(e))))
    assert [p.output for p in written] == [str(tmp_path / "g.out")]
    [(path, message)] = errors
    assert path == bad and "changed while it was being read" in message and "\n" not in message
    assert not (tmp_path / "b.out").exists()
    out = onnx.load(str(tmp_path / "g.out"))
    kept = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    source = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(good)).graph.initializer}
    assert np.array_equal(kept["mean"], source["mean"]) and np.array_equal(kept["var"], source["var"])


def test_damaged_files_give_the_whole_file_reader_s_outcome(tmp_path):
    """Truncated, overwritten and garbage bytes: the same model (once filled) or the same error."""
    base = _mlp(tmp_path / "m.onnx").read_bytes()
    outcomes = {"same model": 0, "same error": 0}
    for case, buf in damaged_copies(base, 400, max_insert=6):
        path = tmp_path / f"case{case}.onnx"
        path.write_bytes(buf)
        try:
            expected = read_model(path)[0]
        except ModelLoadError as exc:
            with pytest.raises(ModelLoadError) as got:
                open_model(path)
            assert str(got.value) == str(exc), case
            outcomes["same error"] += 1
            continue
        model, _, source = open_model(path)
        if source is not None:
            source.fill(model)
        assert model == expected, case
        outcomes["same model"] += 1
    assert outcomes["same error"] > 100 and outcomes["same model"] > 20, outcomes


def test_not_the_binary_format_or_nothing_to_defer_reads_whole(tmp_path, monkeypatch):
    m = _mlp(tmp_path / "m.onnx")
    text = tmp_path / "m.onnxtxt"
    onnx.save(onnx.load(str(m)), str(text), format="onnxtxt")
    assert open_model(text)[2] is None
    monkeypatch.setattr(deferred, "DEFER_MIN_BYTES", 1 << 30)
    assert open_model(m)[2] is None


def test_a_file_of_many_tiny_records_is_left_to_protobuf(tmp_path, monkeypatch):
    """The walker stops after MAX_RECORDS and the whole-file reader takes over (same model)."""
    path = _mlp(tmp_path / "m.onnx")
    monkeypatch.setattr(deferred, "MAX_RECORDS", 5)
    model, _, source = open_model(path)
    assert source is None and model == read_model(path)[0]
