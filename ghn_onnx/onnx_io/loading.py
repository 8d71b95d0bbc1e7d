"""Reading an ONNX file with errors a user can act on, and refusing models a GHN cannot serve."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import onnx
import onnx.parser
from google.protobuf import json_format, text_format
from google.protobuf.message import DecodeError

from ghn_onnx.errors import ModelLoadError, UnsupportedModelError
from ghn_onnx.onnx_io.storage import tensor_nbytes

# Ops that mean the weights are quantized: a GHN predicts float parameters only.
QUANTIZED_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QuantizeLinear",
    "DequantizeLinear", "DynamicQuantizeLinear", "QGemm", "QLinearAdd", "QLinearMul",
    "QAttention", "MatMulNBits", "QLinearGlobalAveragePool", "QLinearConcat",
})
# What onnx.load raises for a file it cannot parse. It picks the parser by file suffix, so a
# ".json" or ".textproto" file fails with the JSON or text-format parser's own error types.
PARSE_ERRORS = (DecodeError, json_format.ParseError, text_format.ParseError, onnx.parser.ParseError,
                RuntimeError, ValueError, UnicodeDecodeError)
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
        with warnings.catch_warnings():
            # onnx warns that its ".onnxtxt" parser is experimental; the outcome is reported below.
            warnings.simplefilter("ignore", UserWarning)
            model = onnx.load(str(path), load_external_data=False)
    except PARSE_ERRORS as exc:
        raise ModelLoadError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not model.graph.node:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph nodes; truncated or another format?)")
    _check_node_inputs(model, path)
    _load_external_data(model, path)
    return model


def _check_node_inputs(model: onnx.ModelProto, path: Path) -> None:
    """Refuse a node with fewer inputs than its ONNX schema requires (a Conv without its weight):
    the rules read inputs by position. Not the full onnx.checker, which also rejects models that
    runtimes load fine (graph outputs without a shape, for one)."""
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    version = opsets.get("ai.onnx")
    if version is None:
        return
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, version, "")
        except onnx.defs.SchemaError:
            continue  # an op this onnx release does not know: no rule reads it either
        if len(node.input) < schema.min_input:
            raise ModelLoadError(f"{path}: invalid ONNX model ({node.op_type} node {node.name!r} has "
                                 f"{len(node.input)} input(s), the spec requires at least {schema.min_input})")


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
        expected = tensor_nbytes(t)
        if expected is not None and len(t.raw_data) and len(t.raw_data) != expected:
            raise ModelLoadError(f"{path}: external data for {t.name!r} is truncated "
                                 f"({len(t.raw_data)} of {expected} bytes)")


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
    arg = exc.args[0] if len(exc.args) == 1 else None
    # onnx.parser.ParseError carries its message as bytes.
    text = (arg.decode(errors="replace") if isinstance(arg, bytes) else str(exc)).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
