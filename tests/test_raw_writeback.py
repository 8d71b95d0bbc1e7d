"""Writing predictions without re-serialising them (:mod:`ghn_onnx.writeback.raw`,
:func:`~ghn_onnx.writeback.write.save_predicted`): the same file as serialising the whole model,
byte for byte and parsed field by field; the fallbacks; the atomic write; the wire walker on
garbage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ghn_onnx.errors import GhnOnnxError, OutputError
from ghn_onnx.ghn import GHN, GHNConfig
from ghn_onnx.pipeline import predict_files
from ghn_onnx.writeback import raw
from ghn_onnx.writeback import write as writeback
from ghn_onnx.writeback.write import PredictedModel, save_predicted
from onnx_builders import conv_model, damaged_copies
from writeback_models import bf16_conv_model

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "frameworks").glob("*.onnx"))


@pytest.fixture(scope="module")
def ghn() -> GHN:
    torch.manual_seed(0)
    return GHN(GHNConfig()).eval()


@pytest.fixture
def spliced(monkeypatch) -> list[int]:
    """How many tensors each raw write spliced in (one entry per file written the raw way)."""
    calls: list[int] = []
    real = raw.with_raw_data

    def spy(skeleton, data):
        calls.append(len(data))
        return real(skeleton, data)

    monkeypatch.setattr(raw, "with_raw_data", spy)
    return calls


def both_ways(src: Path, tmp: Path, ghn: GHN, **options) -> tuple[Path, Path, onnx.ModelProto]:
    """``src`` predicted file to file, spliced and re-serialised; and the returned model."""
    a, b = tmp / f"raw_{src.name}", tmp / f"reserialized_{src.name}"
    [pred] = predict_files([src], [a], ghn, **options)
    predict_files([src], [b], ghn, reserialize=True, **options)
    return a, b, pred.model


@pytest.mark.parametrize("src", FIXTURES, ids=lambda p: p.stem)
def test_spliced_file_is_the_serialised_file(src, ghn, tmp_path, spliced):
    a, b, model = both_ways(src, tmp_path, ghn)
    assert onnx.load(str(a)) == onnx.load(str(b)) == model  # every field, parsed
    assert a.read_bytes() == b.read_bytes() == model.SerializeToString()
    constants = {n.output[0] for n in onnx.load(str(src)).graph.node if n.op_type == "Constant"}
    names = {t.name for t in model.graph.initializer}
    predicted = set(json.loads({p.key: p.value for p in model.metadata_props}["ghn_onnx.predicted_tensors"])["names"])
    if predicted <= names - constants:  # every predicted tensor an initializer: the raw route
        assert spliced == [len(predicted)]
    else:
        assert spliced == []


def test_repredicted_file_has_its_ghn_metadata_replaced(ghn, tmp_path, spliced):
    first = tmp_path / "first.onnx"
    predict_files([FIXTURES[0]], [first], ghn, metadata={"run": "one", "extra": "x"})
    a, b, model = both_ways(first, tmp_path, ghn, metadata={"run": "two"})
    assert len(spliced) == 2  # the first prediction and the re-prediction
    assert a.read_bytes() == b.read_bytes()
    keys = [p.key for p in onnx.load(str(a)).metadata_props]
    assert len(keys) == len(set(keys)) and "ghn_onnx.extra" not in keys
    assert {p.key: p.value for p in model.metadata_props}["ghn_onnx.run"] == "two"


def test_dtypes_and_external_input_data_take_the_raw_route(ghn, tmp_path, spliced):
    fp16 = conv_model()
    for t in fp16.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    fp16.graph.node.insert(0, helper.make_node("Cast", ["w"], ["w32"], to=TensorProto.FLOAT))
    fp16.graph.node[1].input[1] = "w32"
    onnx.save(fp16, str(tmp_path / "fp16.onnx"))
    external = conv_model()
    onnx.save(external, str(tmp_path / "external.onnx"), save_as_external_data=True, size_threshold=0,
              location="external.onnx.weights")
    for name in ("fp16.onnx", "external.onnx"):
        a, b, model = both_ways(tmp_path / name, tmp_path, ghn)
        assert a.read_bytes() == b.read_bytes() == model.SerializeToString()  # inline, as serialising writes it
    assert spliced == [1, 1]


def test_a_predicted_constant_falls_back(ghn, tmp_path, spliced):
    onnx.save(bf16_conv_model(np.random.default_rng(0)), str(tmp_path / "bf16.onnx"))
    a, b, model = both_ways(tmp_path / "bf16.onnx", tmp_path, ghn)
    assert spliced == []  # the weight is a Constant node's value
    assert onnx.load(str(a)) == onnx.load(str(b)) == model and a.read_bytes() == b.read_bytes()


def test_values_that_do_not_fit_fall_back_to_the_same_error(tmp_path, spliced):
    model = conv_model()
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    skeleton.graph.initializer[0].ClearField("raw_data")
    wrong = {"w": np.zeros((8, 8, 3, 3), np.float64)}
    with pytest.raises(GhnOnnxError, match="expected dtype float32"):
        save_predicted(PredictedModel(skeleton, wrong), tmp_path / "out.onnx")
    assert spliced == [] and not (tmp_path / "out.onnx").exists()


def test_over_protobufs_limit_it_is_the_external_data_route(ghn, tmp_path, spliced, monkeypatch):
    monkeypatch.setattr(writeback, "MAX_PROTOBUF_BYTES", 2000)  # the weight: 2,304 bytes
    src = tmp_path / "m.onnx"
    onnx.save(conv_model(), str(src))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    predict_files([src], [tmp_path / "a" / "out.onnx"], ghn)
    predict_files([src], [tmp_path / "b" / "out.onnx"], ghn, reserialize=True)
    assert spliced == [1]  # spliced, measured, then left to the external data route
    files = [sorted(os.listdir(tmp_path / d)) for d in "ab"]
    assert files[0] == files[1] and len(files[0]) == 2
    for name in files[0]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_files_only_fill_no_model(ghn, tmp_path, spliced, monkeypatch):
    fills: list[int] = []
    real = PredictedModel.fill
    monkeypatch.setattr(PredictedModel, "fill", lambda self: fills.append(len(self.data)) or real(self))
    [pred] = predict_files([FIXTURES[0]], [tmp_path / "a.onnx"], ghn, return_models=False)
    assert pred.model is None and fills == [] and len(spliced) == 1
    [full] = predict_files([FIXTURES[0]], [tmp_path / "b.onnx"], ghn)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes() == full.model.SerializeToString()


def test_interrupted_raw_write_leaves_the_old_output(ghn, tmp_path, spliced, monkeypatch):
    src, dst = FIXTURES[0], tmp_path / "out.onnx"
    dst.write_bytes(b"previous model")

    def dies_writing(path, data):
        assert not isinstance(data, bytes)  # the pieces: this is the raw route
        Path(path).write_bytes(b"".join(data)[:100])
        raise OSError("disk full")

    monkeypatch.setattr(writeback, "_write_bytes", dies_writing)
    with pytest.raises(OutputError, match="cannot write .disk full"):
        predict_files([src], [dst], ghn)
    assert dst.read_bytes() == b"previous model" and sorted(os.listdir(tmp_path)) == ["out.onnx"]
    with pytest.raises(GhnOnnxError, match="refusing to overwrite the input"):
        predict_files([src], [src], ghn)


def test_predict_files_refuses_the_data_files_it_read(ghn, tmp_path):
    """``predict_files`` hands the writer the data files ``read_model`` read (no second pass over
    the source): an output that is one of them, by name or by a symbolic link, is still refused (onnx
    itself refuses to read a data file with several hard links)."""
    from ghn_onnx.onnx_io.loading import read_model

    model = onnx.load(str(FIXTURES[0]))
    src, data = tmp_path / "in.onnx", tmp_path / "in.onnx.data"
    onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), str(src),
                    save_as_external_data=True, location="in.onnx.data", size_threshold=1024)
    assert read_model(src)[1] == (data,)
    assert read_model(tmp_path.parent / tmp_path.name / "in.onnx")[1] == (data,)
    os.symlink(data, tmp_path / "linked.onnx")
    digests = {p: p.read_bytes() for p in (src, data)}
    for out in (data, tmp_path / "linked.onnx"):
        with pytest.raises(GhnOnnxError, match="refusing to overwrite the input"):
            predict_files([src], [out], ghn)
    assert {p: p.read_bytes() for p in digests} == digests
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "in.onnx.data", "linked.onnx"]


def test_file_to_file_benchmark_reports_both_routes_and_the_copy():
    from ghn_onnx.benchmarks.file_to_file import bench_file_to_file, format_result

    r = bench_file_to_file(FIXTURES[0], repeats=1, per_process=False)
    assert {"spliced_s", "reserialized_s", "copy_s", "copy_fsync_s"} <= set(r["in_process"])
    assert set(r["in_process"]["stages_s"]) == {"load", "prepare", "ghn", "predicted_model", "read_kept", "save_predicted",
                                                      "fill"}
    table = format_result(r)
    assert "| predict_files, spliced, return_models=False" in table and "marginal per file" not in table


# -- the splicer and the walker ----------------------------------------------------------------

def _model_with_fields() -> onnx.ModelProto:
    """Initializers with fields after raw_data (doc_string, metadata_props) and one left alone."""
    rng = np.random.default_rng(1)
    inits = []
    for i, dtype in enumerate((np.float32, np.float16, ml_dtypes.bfloat16, np.float64)):
        t = numpy_helper.from_array(rng.standard_normal((3, 2 + i)).astype(dtype), f"t{i}")
        t.doc_string = f"tensor {i}"
        t.metadata_props.add(key="k", value="v" * 200)  # a 2-byte length varint
        inits.append(t)
    big = numpy_helper.from_array(rng.standard_normal((70, 70)).astype(np.float32), "big")  # 3-byte varint
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], inits + [big])
    model = helper.make_model(graph)
    model.metadata_props.add(key="after", value="graph")
    return model


def test_splicing_gives_protobufs_bytes():
    model = _model_with_fields()
    for filled in ([0], [1, 4], [0, 1, 2, 3, 4], []):
        skeleton = onnx.ModelProto()
        skeleton.CopyFrom(model)
        data = {}
        for i in filled:
            t = skeleton.graph.initializer[i]
            data[i] = memoryview(t.raw_data).cast("B")
            t.ClearField("raw_data")
        pieces = raw.with_raw_data(skeleton.SerializeToString(), {i: memoryview(bytes(v)) for i, v in data.items()})
        assert b"".join(pieces) == model.SerializeToString()


def test_splicing_refuses_what_it_does_not_expect():
    model = _model_with_fields()
    data = memoryview(b"\0" * 24)
    with pytest.raises(raw.WireError, match="already has raw_data"):
        raw.with_raw_data(model.SerializeToString(), {0: data})
    with pytest.raises(raw.WireError, match="out of range"):
        raw.with_raw_data(model.SerializeToString(), {9: data})
    with pytest.raises(raw.WireError, match="one length-delimited graph"):
        raw.with_raw_data(model.SerializeToString() * 2, {})
    assert raw.encode_varint(0) == b"\0" and raw.encode_varint(300) == b"\xac\x02"
    assert raw.read_varint(raw.encode_varint(2**63), 0, 10) == (2**63, 10)


def test_walker_ends_with_pieces_or_a_wire_error_on_garbage():
    """Mutated skeletons and random bytes: nothing but a WireError escapes, and every call ends
    (each step of the walker moves forward)."""
    model = _model_with_fields()
    for t in model.graph.initializer[:2]:
        t.ClearField("raw_data")
    skeleton = model.SerializeToString()
    outcomes = {"pieces": 0, "error": 0}
    for case, buf in damaged_copies(skeleton, 3000):
        try:
            raw.with_raw_data(buf, {0: memoryview(b"\1" * 24), 1: memoryview(b"\2" * 12)})
            outcomes["pieces"] += 1
        except raw.WireError:
            outcomes["error"] += 1
    assert outcomes["error"] > 1000 and outcomes["pieces"] > 100, outcomes


def test_inputs_without_data_files_are_not_parsed_again(tmp_path, monkeypatch):
    """An existing output is checked against the input's data files; an input that names none
    (no ``location`` key anywhere, found by a scan in small reads) is not parsed for them."""
    monkeypatch.setattr(writeback, "SCAN_CHUNK", 64)
    for at in (0, 1, 56, 57, 63, 64, 65, 127, 300):
        with_key, without = tmp_path / f"k{at}", tmp_path / f"n{at}"
        with_key.write_bytes(b"\0" * at + b"location" + b"\0" * 9)
        without.write_bytes(b"\0" * at + b"locatio" + b"\0" * 9)
        assert writeback._may_name_data_files(with_key) and not writeback._may_name_data_files(without), at
    os.mkfifo(tmp_path / "fifo")
    assert writeback._may_name_data_files(tmp_path / "fifo") and writeback._may_name_data_files(tmp_path)
    src = tmp_path / "in.onnx"
    onnx.save(conv_model(), str(src), save_as_external_data=True, size_threshold=0, location="in.onnx.data")
    assert writeback._external_data_files(src) == [tmp_path / "in.onnx.data"]
    onnx.save(conv_model(), str(src))
    parsed: list[int] = []
    real = onnx.load_model_from_string
    monkeypatch.setattr(onnx, "load_model_from_string", lambda *a, **k: parsed.append(1) or real(*a, **k))
    assert writeback._external_data_files(src) == [] and parsed == []
