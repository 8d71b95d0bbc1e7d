"""Tiny hand-built ONNX models for rule and error tests (onnx.helper, no exporter)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def weights(shape, seed: int = 0) -> np.ndarray:
    """Distinct float32 values, so that layout mistakes show."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def model(nodes: list[onnx.NodeProto], inputs: dict[str, list], outputs: list[str],
          initializers: dict[str, np.ndarray] | None = None, opset: int = OPSET) -> onnx.ModelProto:
    """A float32 model; ``inputs`` maps graph input names to shapes, output shapes are left open."""
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(v, k) for k, v in (initializers or {}).items()],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def conv_model(**conv_attrs) -> onnx.ModelProto:
    """input (1, 8, 16, 16) -> Conv(w) -> output; ``group`` sets the weight's in/groups."""
    groups = conv_attrs.get("group", 1)
    w = weights((8, 8 // groups, 3, 3))
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[2, 2, 2, 2], **conv_attrs)
    return model([node], {"x": [1, 8, 16, 16]}, ["y"], {"w": w})


def save(m: onnx.ModelProto, path: Path) -> Path:
    onnx.save(m, str(path))
    return path


def damaged_copies(data: bytes, cases: int, seed: int = 0, max_garbage: int = 64, max_insert: int = 12):
    """``(case, bytes)``: ``data`` truncated, overwritten at a few bytes, with bytes inserted, or
    replaced by random bytes, in turn (for readers that must fail cleanly on any input)."""
    import random

    rng = random.Random(seed)
    for case in range(cases):
        buf = bytearray(data)
        kind = case % 4
        if kind == 0:
            buf = buf[:rng.randrange(len(buf))]
        elif kind == 1:
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif kind == 2:
            at = rng.randrange(len(buf))
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, max_insert)))
        else:
            buf = bytearray(rng.randbytes(rng.randint(0, max_garbage)))
        yield case, bytes(buf)
