"""Reading an ONNX file with errors a user can act on, and refusing models a GHN cannot serve."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from ghn_onnx.errors import ModelLoadError, UnsupportedModelError

# Ops that mean the weights are quantized: a GHN predicts float parameters only.
QUANTIZED_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QuantizeLinear",
    "DequantizeLinear", "DynamicQuantizeLinear", "QGemm", "QLinearAdd", "QLinearMul",
    "QAttention", "MatMulNBits", "QLinearGlobalAveragePool", "QLinearConcat",
})
# Ops with sub-graphs: a GHN graph is a static DAG.
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load ``path`` with its external data, or raise :class:`ModelLoadError` saying why not.

    The file is only read, never written.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not model.graph.node:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph nodes; truncated or another format?)")
    _load_external_data(model, path)
    return model


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    external = [t for t in model.graph.initializer if uses_external_data(t)]
    if not external:
        return
    base = path.parent
    for t in external:
        location = next((e.value for e in t.external_data if e.key == "location"), None)
        if location is None or not (base / location).is_file():
            raise ModelLoadError(
                f"{path}: external data file {location!r} for tensor {t.name!r} not found next to the model"
            )
    try:
        load_external_data_for_model(model, str(base))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelLoadError(f"{path}: external data is unreadable or truncated ({_first_line(exc)})") from None
    for t in model.graph.initializer:
        expected = _expected_nbytes(t)
        if expected is not None and len(t.raw_data) and len(t.raw_data) != expected:
            raise ModelLoadError(f"{path}: external data for {t.name!r} is truncated "
                                 f"({len(t.raw_data)} of {expected} bytes)")


def _expected_nbytes(t: onnx.TensorProto) -> int | None:
    import numpy as np

    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize


def check_supported(model: onnx.ModelProto, name: str = "model") -> None:
    """Raise :class:`UnsupportedModelError` for quantized models and models with control flow."""
    ops = {n.op_type for n in model.graph.node}
    quantized = sorted(ops & QUANTIZED_OPS)
    if quantized:
        raise UnsupportedModelError(
            f"{name}: quantized model ({', '.join(quantized)}); GHNs predict float parameters: "
            "export the float model instead"
        )
    control = sorted(ops & CONTROL_FLOW_OPS)
    if control:
        raise UnsupportedModelError(
            f"{name}: control flow ({', '.join(control)}) is not supported; export a static graph "
            "(e.g. trace the model with fixed shapes)"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
