"""The fuzz corpus: hostile inputs for ``inspect``, ``predict``, ``calibrate`` and
``convert-checkpoint``, each a :class:`Case` in a folder of its own.

Two sources:

* **hand-written** (:func:`hostile_cases`): one case per finding of the adversarial review and
  per refusal the loaders make: graphs with self-loops, cycles and duplicate outputs, huge
  declared shapes, bad UTF-8, bad op types, files that are not regular (FIFO, device, link to
  ``/dev/zero``), outputs that are not ours to replace, hostile checkpoints (configs of the
  wrong type or range, truncated or foreign archives, a pickle that would run code);
* **mutations** (:func:`mutation_cases`) of the committed fixtures in
  ``tests/fixtures/frameworks``, seeded and deterministic: graph surgery on the ModelProto
  (drop / duplicate / rewire nodes, re-declare tensors, change op types and attributes) and
  byte-level damage to the file (truncation, flipped bytes, names made invalid UTF-8).

A case says which exit codes are acceptable; the runner (:mod:`.runner`) executes it and
``tests/test_fuzz.py`` classifies what happened.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "frameworks"
OPSET = 17
BAD_INPUT = frozenset({2})
MAY_WORK = frozenset({0, 2})  # a mutation can leave a valid model


@dataclass
class Case:
    """One CLI run.

    Attributes:
        name: unique, also the case's folder name.
        args: the arguments after ``ghn-onnx``, relative to the case folder (the working directory).
        expect: acceptable exit codes.
        inputs: files (relative) whose bytes must not change; every regular file in the folder
            before the run that is not ``output`` is added by the runner.
        output: the output file (relative): complete when the run succeeds, else absent or
            unchanged.
        marker: a file that must not exist after the run (what a malicious pickle would create).
        fresh: run in a fresh interpreter (``python -m ghn_onnx.cli``) instead of a fork of the
            warmed-up runner.
        timeout: seconds.
        folder: the working directory under the corpus root (default: ``name``).
        written: outputs a run writes, complete, even when it fails as a whole (``predict -O`` with
            one bad input among good ones).
    """

    name: str
    args: list[str]
    expect: frozenset[int]
    inputs: list[str] = field(default_factory=list)
    output: str | None = None
    marker: str | None = None
    fresh: bool = False
    timeout: float = 30.0
    folder: str | None = None
    written: list[str] = field(default_factory=list)

    @property
    def cwd(self) -> str:
        return self.folder or self.name

    def to_json(self) -> dict:
        return {"name": self.name, "args": self.args, "expect": sorted(self.expect), "inputs": self.inputs,
                "output": self.output, "marker": self.marker, "fresh": self.fresh, "timeout": self.timeout,
                "cwd": self.cwd, "written": self.written}


# -- small models ----------------------------------------------------------------------------------

def conv_model(*nodes: onnx.NodeProto, inits: dict[str, np.ndarray] | None = None,
               outputs: tuple[str, ...] = ("y",), extra_inits: list[TensorProto] | None = None) -> onnx.ModelProto:
    """input x (1, 3, 8, 8) -> Conv(w) -> c -> ``nodes`` -> outputs."""
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), **(inits or {})}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), *nodes], "fuzz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()] + list(extra_inits or []))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def declared_only(name: str, dims: list[int], elem_type: int = TensorProto.FLOAT) -> TensorProto:
    """An initializer with dims and no data."""
    t = TensorProto(name=name, data_type=elem_type)
    t.dims.extend(dims)
    return t


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def with_bad_utf8(model: onnx.ModelProto, name: str) -> bytes:
    """The model's bytes with every occurrence of the string ``name`` made invalid UTF-8 (same
    length, so the protobuf stays well-formed)."""
    data = model.SerializeToString()
    raw = name.encode()
    return data.replace(raw, b"\xff" + raw[1:])


# -- hand-written cases ------------------------------------------------------------------------------

def hostile_cases(root: Path) -> list[Case]:
    """Every hand-written case, built under ``root``."""
    cases: list[Case] = []
    for build in (_graph_cases, _file_cases, _output_cases, _checkpoint_cases, _reference_cases):
        cases.extend(build(root))
    return cases


def _folder(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    return d


def _model_case(root: Path, name: str, data: onnx.ModelProto | bytes, commands=("inspect",),
                expect: frozenset[int] = BAD_INPUT) -> list[Case]:
    """``data`` saved as ``m.onnx``, run through each command of ``commands``."""
    out = []
    for command in commands:
        d = _folder(root, f"{name}-{command}")
        (d / "m.onnx").write_bytes(data if isinstance(data, bytes) else data.SerializeToString())
        out.append(_run(name=f"{name}-{command}", command=command, model="m.onnx", expect=expect, folder=d))
    return out


def _run(name: str, command: str, model: str, expect: frozenset[int], folder: Path) -> Case:
    if command == "inspect":
        return Case(name, ["inspect", model], expect)
    if command == "predict":
        return Case(name, ["predict", model, "-o", "out.onnx"], expect, output="out.onnx")
    if command == "calibrate":
        images = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
        np.save(folder / "images.npy", images)
        return Case(name, ["calibrate", model, "-o", "out.onnx", "--calibrate", "images.npy", "--calibration-images", "4",
                           "--calibration-batch", "2"], expect, output="out.onnx")
    raise ValueError(command)


def _graph_cases(root: Path) -> list[Case]:
    """Graphs that break the spec, in every way the review found and a few more."""
    all_three = ("inspect", "predict", "calibrate")
    relu = lambda i, o, name="": helper.make_node("Relu", [i], [o], name=name)  # noqa: E731
    big = 2 ** 31
    cases = []
    cases += _model_case(root, "self-loop", conv_model(helper.make_node("Add", ["c", "y"], ["y"], name="selfish")),
                         all_three)
    cases += _model_case(root, "cycle-2", conv_model(helper.make_node("Add", ["c", "b"], ["a"], name="n1"),
                                                     relu("a", "b", "n2"), relu("a", "y")))
    cases += _model_case(root, "cycle-3", conv_model(helper.make_node("Add", ["c", "r3"], ["r1"], name="n1"),
                                                     relu("r1", "r2", "n2"), relu("r2", "r3", "n3"), relu("r1", "y")),
                         all_three)
    cases += _model_case(root, "cycle-shape-ops", conv_model(
        helper.make_node("Identity", ["s2"], ["s1"]), helper.make_node("Identity", ["s1"], ["s2"]),
        helper.make_node("Mul", ["c", "s1"], ["y"])))
    cases += _model_case(root, "duplicate-output", conv_model(relu("c", "y", "a"), relu("c", "y", "b")), all_three)
    cases += _model_case(root, "writes-initializer", conv_model(relu("c", "w"), relu("c", "y")))
    cases += _model_case(root, "writes-graph-input", conv_model(relu("c", "x"), relu("c", "y")))
    gemm = helper.make_node("Gemm", ["f", "wg"], ["y"], transB=1)
    cases += _model_case(root, "gemm-2^31x2^31", conv_model(
        helper.make_node("Flatten", ["c"], ["f"]), gemm, extra_inits=[declared_only("wg", [big, big])]),
        ("inspect", "predict"))
    cases += _model_case(root, "conv-dim-2^31", conv_model(
        helper.make_node("Conv", ["c", "w2"], ["y"]), extra_inits=[declared_only("w2", [big, 4, 1, 1])]),
        ("inspect", "predict"))
    cases += _model_case(root, "negative-dim", conv_model(
        helper.make_node("Conv", ["c", "w2"], ["y"]), extra_inits=[declared_only("w2", [-4, 4, 1, 1])]))
    cases += _model_case(root, "unknown-elem-type", conv_model(
        helper.make_node("Conv", ["c", "w2"], ["y"]), extra_inits=[declared_only("w2", [4, 4, 1, 1], 99)]))
    mismatch = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones(6, np.float32)))
    del mismatch.attribute[0].t.dims[:]
    mismatch.attribute[0].t.dims.extend([2, 5])
    cases += _model_case(root, "constant-shape-vs-data", conv_model(
        mismatch, helper.make_node("Reshape", ["c", "k"], ["y"])), ("inspect", "predict"))
    target = helper.make_tensor("s", TensorProto.INT64, [3], [1, 2, 3])
    shape = helper.make_node("Constant", [], ["shape"], value=target)
    shape.attribute[0].t.dims[0] = 4  # 4 declared, 3 stored
    cases += _model_case(root, "reshape-target-short", conv_model(
        shape, helper.make_node("Reshape", ["c", "shape"], ["y"])))
    cases += _model_case(root, "bad-utf8-tensor-name", with_bad_utf8(conv_model(relu("c", "hidden"),
                                                                                relu("hidden", "y")), "hidden"),
                         ("inspect", "predict"))
    cases += _model_case(root, "bad-utf8-node-name", with_bad_utf8(conv_model(relu("c", "y", "relu_node")),
                                                                   "relu_node"))
    cases += _model_case(root, "bad-utf8-op-type", with_bad_utf8(conv_model(
        helper.make_node("Sigmoid", ["c"], ["y"])), "Sigmoid"), ("inspect", "predict"))
    cases += _model_case(root, "empty-op-type", conv_model(helper.make_node("", ["c"], ["y"])), expect=MAY_WORK)
    cases += _model_case(root, "nul-op-type", conv_model(helper.make_node("Re\x00lu", ["c"], ["y"])), expect=MAY_WORK)
    no_out = helper.make_node("ReduceMean", ["c"], [], axes=[2, 3])
    cases += _model_case(root, "node-without-outputs", conv_model(no_out, relu("c", "y")))
    deep = [relu("c" if i == 0 else f"h{i - 1}", f"h{i}") for i in range(3000)] + [relu("h2999", "y")]
    cases += _model_case(root, "chain-3000", conv_model(*deep), ("inspect",), expect=MAY_WORK)
    cases += _model_case(root, "huge-input-dims", _huge_input(), ("inspect", "predict"), expect=MAY_WORK)
    return cases


def _huge_input() -> onnx.ModelProto:
    m = conv_model(helper.make_node("Relu", ["c"], ["y"]))
    dims = m.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, [2 ** 40, 3, 2 ** 40, 2 ** 40]):
        d.dim_value = v
    return m


def _file_cases(root: Path) -> list[Case]:
    """Paths that are not regular files, files too big to read, damaged files."""
    cases = []
    d = _folder(root, "fifo-model")
    os.mkfifo(d / "m.onnx")
    cases += [Case("fifo-model", ["inspect", "m.onnx"], BAD_INPUT),
              Case("fifo-model-predict", ["predict", "m.onnx", "-o", "o.onnx"], BAD_INPUT, folder="fifo-model"),
              Case("fifo-model-calibrate", ["calibrate", "m.onnx", "-o", "o.onnx", "--calibrate", "m.onnx"], BAD_INPUT,
                   folder="fifo-model")]
    d = _folder(root, "dev-zero-link")
    (d / "m.onnx").symlink_to("/dev/zero")
    cases.append(Case("dev-zero-link", ["inspect", "m.onnx"], BAD_INPUT))
    d = _folder(root, "directory-model")
    (d / "m.onnx").mkdir()
    cases.append(Case("directory-model", ["inspect", "m.onnx"], BAD_INPUT))
    d = _folder(root, "sparse-3gib")
    with open(d / "m.onnx", "wb") as f:  # sparse: no disk used, but more than an ONNX file can be
        f.truncate(3 << 30)
    cases.append(Case("sparse-3gib", ["inspect", "m.onnx"], BAD_INPUT))
    for name, data in (("empty", b""), ("text", b"not a model\n"), ("zeros", b"\x00" * 4096)):
        cases += _model_case(root, f"file-{name}", data)
    full = (FIXTURES / "torch_cnn.onnx").read_bytes()
    cases += _model_case(root, "truncated", full[: len(full) // 3])
    # External data that is not what it says.
    for name, location, payload in (("ext-missing", "absent.data", None), ("ext-outside", "../outside.data", b"x"),
                                    ("ext-dev-zero", "/dev/zero", None), ("ext-fifo", "pipe.data", "fifo"),
                                    ("ext-short", "short.data", b"\x00" * 16), ("ext-no-length", "big.data", "big")):
        d = _folder(root, name)
        m = conv_model(helper.make_node("Conv", ["c", "w2"], ["y"]),
                       inits={"w2": np.ones((4, 4, 1, 1), np.float32)})
        t = next(t for t in m.graph.initializer if t.name == "w2")
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value=location)
        if name != "ext-no-length":
            t.external_data.add(key="length", value="64")
        if payload == "fifo":
            os.mkfifo(d / location)
        elif payload == "big":
            with open(d / location, "wb") as f:
                f.truncate(2 << 30)  # sparse; without a length onnx would read all of it
        elif payload is not None:
            (d / location).parent.mkdir(parents=True, exist_ok=True)
            (d / location).write_bytes(payload)
        save(m, d / "m.onnx")
        cases.append(Case(name, ["inspect", "m.onnx"], BAD_INPUT if name != "ext-no-length" else MAY_WORK))
    return cases


def _output_cases(root: Path) -> list[Case]:
    """Outputs that are not files the tool may replace, or that it cannot write."""
    cases = []

    def folder(name: str) -> Path:
        d = _folder(root, name)
        shutil.copy(FIXTURES / "torch_cnn.onnx", d / "m.onnx")
        return d

    d = folder("out-fifo")
    os.mkfifo(d / "o.onnx")
    cases.append(Case("out-fifo", ["predict", "m.onnx", "-o", "o.onnx"], BAD_INPUT))
    d = folder("out-link-dev-null")
    (d / "o.onnx").symlink_to("/dev/null")
    cases.append(Case("out-link-dev-null", ["predict", "m.onnx", "-o", "o.onnx"], BAD_INPUT))
    d = folder("out-char-device")
    try:  # a /dev/null of our own, so a bug would replace only it
        os.mknod(d / "o.onnx", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        cases.append(Case("out-char-device", ["predict", "m.onnx", "-o", "o.onnx"], BAD_INPUT))
        cases.append(Case("calibrate-out-char-device", ["calibrate", "m.onnx", "-o", "o.onnx", "--calibrate", "m.onnx"],
                          BAD_INPUT, folder="out-char-device"))
    except (PermissionError, OSError):
        pass
    d = folder("out-hard-link")
    os.link(d / "m.onnx", d / "o.onnx")
    cases.append(Case("out-hard-link", ["predict", "m.onnx", "-o", "o.onnx"], BAD_INPUT, inputs=["o.onnx"]))
    d = folder("out-symlink-input")
    (d / "o.onnx").symlink_to("m.onnx")
    cases.append(Case("out-symlink-input", ["predict", "m.onnx", "-o", "o.onnx"], BAD_INPUT))
    folder("out-is-input")
    cases.append(Case("out-is-input", ["predict", "m.onnx", "-o", "m.onnx"], BAD_INPUT))
    folder("out-empty")
    cases.append(Case("out-empty", ["predict", "m.onnx", "-o", ""], BAD_INPUT))
    d = folder("out-directory")
    (d / "o.onnx").mkdir()
    cases.append(Case("out-directory", ["predict", "m.onnx", "-o", "o.onnx"], BAD_INPUT))
    folder("out-missing-folder")
    cases.append(Case("out-missing-folder", ["predict", "m.onnx", "-o", "nowhere/o.onnx"], BAD_INPUT))
    folder("out-sys")
    cases.append(Case("out-sys", ["predict", "m.onnx", "-o", "/sys/ghn_onnx_fuzz.onnx"], frozenset({1})))
    folder("out-proc")
    cases.append(Case("out-proc", ["predict", "m.onnx", "-o", "/proc/ghn_onnx_fuzz.onnx"], frozenset({1})))
    folder("outdir-proc")
    cases.append(Case("outdir-proc", ["predict", "m.onnx", "-O", "/proc/ghn_onnx_fuzz"], frozenset({1})))
    d = folder("outdir-is-file")
    (d / "file").write_bytes(b"x")
    cases.append(Case("outdir-is-file", ["predict", "m.onnx", "-O", "file"], BAD_INPUT))
    folder("inspect-png-fifo")
    os.mkfifo(root / "inspect-png-fifo" / "g.png")
    cases.append(Case("inspect-png-fifo", ["inspect", "m.onnx", "--png", "g.png"], BAD_INPUT))
    d = folder("calibrate-out-sys")
    np.save(d / "images.npy", np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8))
    cases.append(Case("calibrate-out-sys", ["calibrate", "m.onnx", "-o", "/sys/ghn_onnx_fuzz.onnx", "--calibrate",
                                            "images.npy", "--calibration-images", "4", "--calibration-batch", "2"], frozenset({1})))
    # A batch with one unreadable input: the good one is written, the bad one reported, exit 2.
    d = folder("batch-one-bad")
    (d / "bad.onnx").write_bytes(b"garbage")
    cases.append(Case("batch-one-bad", ["predict", "m.onnx", "bad.onnx", "-O", "out"], BAD_INPUT,
                      written=["out/m.onnx"]))
    return cases


def _checkpoint_cases(root: Path) -> list[Case]:
    """``predict --checkpoint`` with hostile safetensors files."""
    import torch
    from safetensors.torch import save_file

    cases = []
    good = {"embed.weight": torch.zeros(15, 32)}
    configs = {
        "hid-negative": '{"hid": -32}', "hid-huge": '{"hid": 10000000}', "hid-dict": '{"hid": {}}',
        "max-shape-string": '{"max_shape": [64, 64, "eleven", 11]}', "max-shape-scalar": '{"max_shape": 7}',
        "ve-cutoff-dict": '{"ve_cutoff": {"a": 1}}', "config-list": "[1, 2]", "config-not-json": "{hid: 32",
        "weight-norm-string": '{"weight_norm": "yes"}', "unknown-key": '{"depth": 3}',
        "config-deep": "[" * 100000 + "]" * 100000,
    }
    for name, config in configs.items():
        d = _folder(root, f"ckpt-{name}")
        shutil.copy(FIXTURES / "torch_cnn.onnx", d / "m.onnx")
        save_file(good, str(d / "g.safetensors"), metadata={"format": "ghn-onnx/ghn2-v1", "config": config})
        cases.append(Case(f"ckpt-{name}", ["predict", "m.onnx", "-o", "o.onnx", "--checkpoint", "g.safetensors"],
                          BAD_INPUT, output="o.onnx"))
    d = _folder(root, "ckpt-shapes-over-file")  # a valid config, tensors of other shapes
    shutil.copy(FIXTURES / "torch_cnn.onnx", d / "m.onnx")
    save_file(good, str(d / "g.safetensors"), metadata={"format": "ghn-onnx/ghn2-v1", "config": '{"hid": 1024}'})
    cases.append(Case("ckpt-shapes-over-file", ["predict", "m.onnx", "-o", "o.onnx", "--checkpoint", "g.safetensors"],
                      BAD_INPUT, output="o.onnx"))
    for name, make in (("ckpt-fifo", lambda p: os.mkfifo(p)), ("ckpt-folder", lambda p: p.mkdir()),
                       ("ckpt-pickle", lambda p: p.write_bytes(_evil_pickle(p.parent / "pwned"))),
                       ("ckpt-garbage", lambda p: p.write_bytes(b"\xff" * 64))):
        d = _folder(root, name)
        shutil.copy(FIXTURES / "torch_cnn.onnx", d / "m.onnx")
        make(d / "g.safetensors")
        cases.append(Case(name, ["predict", "m.onnx", "-o", "o.onnx", "--checkpoint", "g.safetensors"], BAD_INPUT,
                          output="o.onnx", marker="pwned"))
    return cases


def _evil_pickle(marker: Path) -> bytes:
    """A pickle that, if loaded with ``pickle.load``, creates ``marker`` (it must never be)."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps({"state_dict": Evil(), "config": {"hid": 32}})


def _reference_cases(root: Path) -> list[Case]:
    """``convert-checkpoint`` with hostile reference files."""
    import io

    import torch

    cases = []

    def case(name: str, filename: str, make, expect=BAD_INPUT, extra=()):
        d = _folder(root, f"ref-{name}")
        make(d / filename)
        cases.append(Case(f"ref-{name}", ["convert-checkpoint", filename, "-o", "g.safetensors", *extra], expect,
                          output="g.safetensors", marker="pwned"))

    def npz(arrays):
        return lambda p: np.savez(p, **arrays)

    small = {"embed.weight": np.zeros((15, 32), np.float32)}
    case("npz-truncated", "r.npz", lambda p: (npz(small)(p), p.write_bytes(p.read_bytes()[:300])))
    case("npz-strings", "r.npz", npz({"embed.weight": np.array(["a", "b"])}))
    case("npz-wrong-keys", "r.npz", npz(small))

    def object_npz(p):
        buf = io.BytesIO()
        np.save(buf, np.array([_EvilObject(p.parent / "pwned")], dtype=object), allow_pickle=True)
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("embed.weight.npy", buf.getvalue())
    case("npz-object-pickle", "r.npz", object_npz)

    def bomb_npz(p):  # every key of a GHN-2, one declaring 10^12 floats, deflated to almost nothing
        from ghn_onnx.ghn import GHN, GHNConfig

        with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for key, value in GHN(GHNConfig()).state_dict().items():
                buf = io.BytesIO()
                if key == "decoder.fc.0.weight":
                    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                                               "shape": (10 ** 6, 10 ** 6)})
                    buf.write(b"\x00" * (1 << 20))
                else:
                    np.save(buf, np.zeros(tuple(value.shape), np.float32))
                z.writestr(f"{key}.npy", buf.getvalue())
    case("npz-bomb", "r.npz", bomb_npz)
    case("npz-is-torch-zip", "r.npz", lambda p: torch.save({"state_dict": {}}, p))
    case("npz-not-zip", "r.npz", lambda p: p.write_bytes(b"PK\x03\x04" + b"\x00" * 100))
    case("pt-state-not-dict", "r.pt", lambda p: torch.save({"state_dict": [1, 2, 3], "config": {"hid": 32}}, p))
    case("pt-state-tensor", "r.pt", lambda p: torch.save({"state_dict": torch.zeros(3), "config": {"hid": 32}}, p))
    case("pt-config-huge", "r.pt", lambda p: torch.save({"state_dict": {}, "config": {"hid": 10 ** 7}}, p))
    case("pt-config-not-dict", "r.pt", lambda p: torch.save({"state_dict": {}, "config": [1]}, p))
    case("pt-evil-pickle", "r.pt", lambda p: p.write_bytes(_evil_pickle(p.parent / "pwned")))
    case("pt-evil-torch", "r.pt", lambda p: torch.save({"state_dict": {"x": _EvilObject(p.parent / "pwned")}}, p))
    case("pt-not-torch", "r.pt", lambda p: p.write_bytes(b"hello"))
    case("npz-hid-option-huge", "r.npz", npz(small), extra=("--hid", "10000000"))
    case("npz-spatial-negative", "r.npz", npz(small), extra=("--spatial", "-3"))
    case("fifo", "r.npz", lambda p: os.mkfifo(p))
    return cases


class _EvilObject:
    """Pickles to a call of ``os.system`` that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# -- mutations of the committed fixtures -------------------------------------------------------------

MUTATIONS = ("drop_node", "dup_node", "rewire", "self_loop", "redeclare", "drop_data", "op_type", "attribute",
             "elem_type", "truncate", "flip_bytes", "bad_utf8", "shuffle", "drop_input", "constant_shape")


def fixtures() -> list[Path]:
    return sorted(FIXTURES.glob("*.onnx"))


def mutation_cases(root: Path, count: int, seed: int = 0, predict_every: int = 6) -> list[Case]:
    """``count`` seeded mutations of the fixtures, one to three each; every ``predict_every``-th
    goes through ``predict``, the others through ``inspect``."""
    rng = random.Random(seed)
    models = {p.name: onnx.load(str(p)) for p in fixtures()}  # external data loaded: saved inline below
    names = sorted(models)
    cases = []
    for i in range(count):
        src = names[i % len(names)]
        m = onnx.ModelProto()
        m.CopyFrom(models[src])
        applied = []
        data: bytes | None = None
        for _ in range(rng.randint(1, 3)):
            kind = rng.choice(MUTATIONS)
            if kind in ("truncate", "flip_bytes", "bad_utf8"):
                data = _mutate_bytes(m, data, kind, rng)
            else:
                if data is not None:
                    continue  # structural mutations act on a model that still parses
                _mutate_model(m, kind, rng)
            applied.append(kind)
        command = "predict" if i % predict_every == predict_every - 1 else "inspect"
        name = f"mut{i:03d}-{src.removesuffix('.onnx')}-{'+'.join(applied)}-{command}"
        d = _folder(root, name)
        (d / "m.onnx").write_bytes(data if data is not None else m.SerializeToString())
        cases.append(_run(name, command, "m.onnx", MAY_WORK, d))
    return cases


def _mutate_bytes(m: onnx.ModelProto, data: bytes | None, kind: str, rng: random.Random) -> bytes:
    data = bytearray(data if data is not None else m.SerializeToString())
    if kind == "truncate":
        return bytes(data[: rng.randrange(1, len(data))])
    if kind == "flip_bytes":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    names = [o for n in m.graph.node for o in n.output if len(o) > 1] or ["x"]
    return with_bad_utf8_bytes(bytes(data), rng.choice(names))


def with_bad_utf8_bytes(data: bytes, name: str) -> bytes:
    raw = name.encode()
    return data.replace(raw, b"\xfe" + raw[1:])


def _mutate_model(m: onnx.ModelProto, kind: str, rng: random.Random) -> None:
    g = m.graph
    nodes = g.node
    if not len(nodes):
        return
    i = rng.randrange(len(nodes))
    node = nodes[i]
    outputs = [o for n in nodes for o in n.output if o]
    if kind == "drop_node":
        del nodes[i]
    elif kind == "dup_node":
        nodes.insert(rng.randrange(len(nodes) + 1), node)
    elif kind == "rewire" and len(node.input) and outputs:
        node.input[rng.randrange(len(node.input))] = rng.choice(outputs)  # may close a cycle
    elif kind == "self_loop" and len(node.output) and node.output[0]:
        if len(node.input):
            node.input[rng.randrange(len(node.input))] = node.output[0]
        else:
            node.input.append(node.output[0])
    elif kind == "redeclare" and len(g.initializer):
        t = g.initializer[rng.randrange(len(g.initializer))]
        dims = rng.choice([[2 ** 31, 2 ** 31], [2 ** 31] + list(t.dims[1:]), [0], [-1], [3, 0, 5],
                           [int(np.prod(t.dims)) + 1], list(reversed(t.dims))])
        del t.dims[:]
        t.dims.extend(dims)
    elif kind == "drop_data" and len(g.initializer):
        t = g.initializer[rng.randrange(len(g.initializer))]
        for f in ("raw_data", "float_data", "int64_data", "int32_data"):
            t.ClearField(f)
    elif kind == "op_type":
        node.op_type = rng.choice(["Conv", "Gemm", "MatMul", "BatchNormalization", "If", "Loop", "QLinearConv",
                                   "Softmax", "Concat", "Nonexistent", "", "Conv\x00", "Reshape", "Transpose"])
    elif kind == "attribute":
        attr = rng.choice([("group", 0), ("group", 7), ("kernel_shape", [2 ** 31, 2 ** 31]), ("pads", [-5] * 4),
                           ("perm", [5, 5, 5]), ("axis", 99), ("axes", [40]), ("strides", [0, 0]),
                           ("dilations", [2 ** 30, 1]), ("epsilon", float("nan"))])
        for a in list(node.attribute):
            if a.name == attr[0]:
                node.attribute.remove(a)
        node.attribute.append(helper.make_attribute(*attr))
    elif kind == "elem_type" and len(g.initializer):
        g.initializer[rng.randrange(len(g.initializer))].data_type = rng.choice(
            [TensorProto.INT8, TensorProto.STRING, TensorProto.BOOL, TensorProto.FLOAT16, TensorProto.UNDEFINED,
             TensorProto.COMPLEX64, 77])
    elif kind == "shuffle":
        order = list(nodes)
        rng.shuffle(order)
        del nodes[:]
        nodes.extend(order)
    elif kind == "drop_input" and len(node.input):
        del node.input[rng.randrange(len(node.input))]
    elif kind == "constant_shape":
        consts = [n for n in nodes if n.op_type == "Constant" and n.attribute and n.attribute[0].HasField("t")]
        if consts:
            t = rng.choice(consts).attribute[0].t
            t.dims.append(rng.choice([2, 3, 2 ** 20]))
