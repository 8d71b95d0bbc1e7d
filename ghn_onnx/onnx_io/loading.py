"""Reading an ONNX file with errors a user can act on, and refusing models a GHN cannot serve.

:func:`load_model` (and :func:`read_model`, :func:`open_model`, which also say which files
were read and which tensors were left in the file) is the one door models come in through. It reads regular files only, with
the size capped before the first byte is read (:mod:`.files`), and then checks the model once
(:func:`validate_model`) so that later stages can trust it:

* every string is valid UTF-8 (op types, tensor and node names, domains);
* the graph is a DAG in SSA form: each tensor has at most one producer, no node writes an
  initializer or graph input, and there is no cycle of any length (a node reading its own output
  included);
* every stored tensor (initializer, ``Constant`` value, other attribute tensors) has a known
  element type, non-negative dims, and holds as many values as its dims say;
* the parameter elements all stored tensors declare fit the element budget
  (:func:`element_budget`), checked before external data is read or anything is allocated.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Iterator

import onnx
import onnx.parser
from google.protobuf import json_format, text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from ghn_onnx.errors import ModelLoadError, UnsupportedModelError
from ghn_onnx.onnx_io.deferred import DeferredFile, read_deferred
from ghn_onnx.onnx_io.files import read_regular_file, regular_file_stat
from ghn_onnx.onnx_io.storage import np_dtype, tensor_nbytes

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

# An ONNX file is one protobuf message, which cannot exceed 2 GiB: larger weights live in
# external data files.
MAX_MODEL_BYTES = onnx.checker.MAXIMUM_PROTOBUF
# Memory per declared parameter element while predicting: the stored value (up to 8 bytes), the
# fp32 prediction, the output copy and its serialisation. The default element budget is the
# memory available divided by this.
BYTES_PER_ELEMENT = 16
# Parsing needs the file's bytes and the message built from them.
PARSE_MEMORY_FACTOR = 3
BUDGET_ENV = "GHN_ONNX_MAX_ELEMENTS"

# Bits per element where it is not the numpy itemsize, and how many values one int32_data entry
# holds for those types.
PACKED_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.FLOAT4E2M1: 4}
for _name, _bits in (("UINT2", 2), ("INT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6)):
    if hasattr(onnx.TensorProto, _name):
        PACKED_BITS[getattr(onnx.TensorProto, _name)] = _bits
INT32_PER_ENTRY = {t: 8 // b for t, b in PACKED_BITS.items() if b in (2, 4)}
# The typed field each element type keeps its values in (when not in raw_data), and how many
# entries one element takes there (complex numbers: two).
T = onnx.TensorProto
VALUE_FIELDS = {
    T.FLOAT: ("float_data", 1), T.COMPLEX64: ("float_data", 2), T.DOUBLE: ("double_data", 1),
    T.COMPLEX128: ("double_data", 2), T.INT64: ("int64_data", 1), T.UINT32: ("uint64_data", 1),
    T.UINT64: ("uint64_data", 1), T.STRING: ("string_data", 1),
    **{t: ("int32_data", 1) for t in (T.INT32, T.INT16, T.INT8, T.UINT16, T.UINT8, T.BOOL, T.FLOAT16,
                                      T.BFLOAT16, T.FLOAT8E4M3FN, T.FLOAT8E4M3FNUZ, T.FLOAT8E5M2,
                                      T.FLOAT8E5M2FNUZ, T.INT4, T.UINT4, T.FLOAT4E2M1)},
}
KNOWN_TYPES = frozenset(v for k, v in T.DataType.items() if k != "UNDEFINED")
# Tensor fields that hold values, not text: not walked for UTF-8.
DATA_FIELDS = frozenset({"raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                         "string_data", "floats", "ints", "strings"})
del T


def load_model(path: str | os.PathLike, max_elements: int | None = None) -> onnx.ModelProto:
    """Load ``path`` with its external data, or raise :class:`ModelLoadError` saying why not.

    The file is only read, never written. ``max_elements``: the element budget
    (default :func:`element_budget`). See the module docstring for what is checked.
    """
    return read_model(path, max_elements)[0]


def read_model(path: str | os.PathLike, max_elements: int | None = None) -> tuple[onnx.ModelProto, tuple[Path, ...]]:
    """:func:`load_model`, and the external data files it read (sorted, no repeats).

    Why: onnx forgets where external tensors came from once they are loaded, and a writer
    must not replace the source's data files; without this list it has to find them by reading
    the source again (for a 94 MB ResNet-50, 50 ms of a 320 ms file to file).
    """
    path = Path(path)
    cap, reason = _size_cap()
    data = read_regular_file(path, cap, ModelLoadError, "an .onnx file", reason)
    fmt = _format(path)
    try:
        with warnings.catch_warnings():
            # onnx warns that its ".onnxtxt" parser is experimental; the outcome is reported below.
            warnings.simplefilter("ignore", UserWarning)
            model = onnx.load_model_from_string(data, format=fmt)
    except PARSE_ERRORS as exc:
        raise ModelLoadError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    except MemoryError:
        raise ModelLoadError(f"{path}: not enough memory to parse it ({len(data):,} bytes)") from None
    del data
    _check_read(model, path, max_elements)
    return model, _load_external_data(model, path)


def open_model(path: str | os.PathLike, max_elements: int | None = None
               ) -> tuple[onnx.ModelProto, tuple[Path, ...], DeferredFile | None]:
    """:func:`read_model` with the large initializers left in the file where that applies
    (:mod:`ghn_onnx.onnx_io.deferred`): the model, the external data files read, and the file
    the deferred tensors are in (None: nothing deferred, the model is complete).

    The model is checked as :func:`read_model` checks it. Before it is written or handed to
    anything that reads tensor values, call ``deferred.fill(model)``; a writer refuses a model
    that still defers tensors.
    """
    path = Path(path)
    if _format(path) == "protobuf":
        got = read_deferred(path, _size_cap()[0])
        if got is not None:
            model, source = got
            # External data files are read by their own loader, which reads every external tensor.
            if not any(t.data_location == onnx.TensorProto.EXTERNAL and not source.is_deferred(t)
                       for t, _ in stored_tensor_protos(model)):
                _check_read(model, path, max_elements)
                return model, (), source
    model, files = read_model(path, max_elements)
    return model, files, None


def _format(path: Path) -> str:
    return onnx.serialization.registry.get_format_from_file_extension(path.suffix) or "protobuf"


def _size_cap() -> tuple[int, str]:
    """The largest file parsed, and why, for messages."""
    cap = min(MAX_MODEL_BYTES, max(memory_available() // PARSE_MEMORY_FACTOR, 1 << 20))
    reason = (f"the {cap:,} bytes an ONNX file can hold (keep large weights in external data)"
              if cap == MAX_MODEL_BYTES else f"a third of the memory available ({cap:,} bytes)")
    return cap, reason


def _check_read(model: onnx.ModelProto, path: Path, max_elements: int | None) -> None:
    if not model.graph.node:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph nodes; truncated or another format?)")
    validate_model(model, str(path), max_elements=max_elements)
    _check_node_inputs(model, path)


# -- validation ----------------------------------------------------------------------------------

def validate_model(model: onnx.ModelProto, name: str = "model", *, max_elements: int | None = None,
                   check_data: bool = True) -> None:
    """Raise :class:`ModelLoadError` (``"<name>: invalid ONNX model (...)"``) unless ``model``
    can be trusted by the later stages (see the module docstring).

    Args:
        model: the model (not modified).
        name: how messages name it.
        max_elements: the element budget; ``None``: :func:`element_budget`.
        check_data: also check that each inline tensor holds as many values as its dims say
            (models built in memory may leave data out on purpose: ``False``).
    """
    where = _non_utf8(model)
    if where is not None:
        raise ModelLoadError(f"{name}: invalid ONNX model ({where} is not valid UTF-8 text)")
    _check_graph(model.graph, name)
    _check_tensors(model, name, element_budget() if max_elements is None else max_elements, check_data)


def _non_utf8(model: onnx.ModelProto) -> str | None:
    """Where the first string field that does not hold valid UTF-8 is (protobuf hands such a
    field over as ``bytes``), e.g. ``graph.node[3].op_type = b'R\\xffl'``; None if there is none.

    Why ``ListFields`` and labels built only on failure: this walk visits every message of the
    file, and reflecting over every declared field with ``HasField`` and formatting a label per
    item was a quarter of a generated network's load + convert (45 of ~180 ms)."""
    string, message = FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE
    # A place is (parent place, field name, index or None); the label is spelled out only for the
    # one that is reported.
    stack: list[tuple[object, tuple | None]] = [(model, None)]
    while stack:  # depth first, in field-number order
        msg, at = stack.pop()
        children: list[tuple[object, tuple]] = []
        for fd, value in msg.ListFields():  # the fields that are set, in C
            if fd.name in DATA_FIELDS:
                continue
            kind = fd.type
            if kind == string:
                values = enumerate(value) if fd.is_repeated else ((None, value),)
                for i, v in values:
                    if not isinstance(v, str):
                        return f"{_place_label((at, fd.name, i))} = {bytes(v)[:40]!r}"
            elif kind == message:
                if fd.is_repeated:
                    children.extend((v, (at, fd.name, i)) for i, v in enumerate(value))
                else:
                    children.append((value, (at, fd.name, None)))
        stack.extend(reversed(children))
    return None


def _place_label(place: tuple | None) -> str:
    parts: list[str] = []
    while place is not None:
        place, name, i = place
        parts.append(name if i is None else f"{name}[{i}]")
    return ".".join(reversed(parts))


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node #{index}"


def _check_graph(graph: onnx.GraphProto, name: str) -> None:
    """SSA and acyclicity of the main graph (sub-graphs are refused later, as control flow)."""
    stored = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    producer: dict[str, int] = {}
    for j, node in enumerate(graph.node):
        if not any(node.output):
            raise ModelLoadError(f"{name}: invalid ONNX model ({_node_label(node, j)} has no outputs)")
        for out in node.output:
            if not out:
                continue
            if out in producer:
                i = producer[out]
                raise ModelLoadError(f"{name}: invalid ONNX model (tensor {out!r} is produced by two nodes: "
                                     f"{_node_label(graph.node[i], i)} and {_node_label(node, j)})")
            if out in stored:
                raise ModelLoadError(f"{name}: invalid ONNX model ({_node_label(node, j)} writes {out!r}, "
                                     "which is already an initializer or graph input)")
            producer[out] = j
    # Kahn's algorithm over node -> consumer edges; self-edges count, so a node that reads its
    # own output never becomes ready.
    n = len(graph.node)
    consumers: list[list[int]] = [[] for _ in range(n)]
    waiting = [0] * n
    for j, node in enumerate(graph.node):
        for i in {producer[x] for x in node.input if x in producer}:
            consumers[i].append(j)
            waiting[j] += 1
    ready = [j for j in range(n) if waiting[j] == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for j in consumers[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(j)
    if done < n:
        raise ModelLoadError(f"{name}: invalid ONNX model ({_describe_cycle(graph, producer, waiting)})")


def _describe_cycle(graph: onnx.GraphProto, producer: dict[str, int], waiting: list[int]) -> str:
    """One cycle among the nodes Kahn's algorithm could not order, in words."""
    start = next(j for j, w in enumerate(waiting) if w > 0)
    path, seen = [], {}
    j = start
    while j not in seen:  # walk back through unordered producers until a node repeats
        seen[j] = len(path)
        path.append(j)
        node = graph.node[j]
        j = next(producer[x] for x in node.input if x in producer and waiting[producer[x]] > 0)
    cycle = path[seen[j]:][::-1]
    if len(cycle) == 1:
        node = graph.node[cycle[0]]
        own = next(x for x in node.input if producer.get(x) == cycle[0])
        return f"{_node_label(node, cycle[0])} reads its own output {own!r}"
    names = " -> ".join(repr(graph.node[k].name or f"#{k}") for k in cycle + cycle[:1])
    return f"the graph has a cycle of {len(cycle)} nodes: {names}"


def stored_tensor_protos(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """Every TensorProto that holds values in ``model`` (initializers and attribute tensors, in
    sub-graphs and functions too: what :func:`onnx.load` would load external data for), with
    what it is, for messages."""
    graphs: list[onnx.GraphProto] = [model.graph]
    nodes: list[onnx.NodeProto] = list(model.graph.node) + [n for f in model.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            g = graphs.pop()
            for t in g.initializer:
                yield t, f"initializer {t.name!r}"
            if g is not model.graph:
                nodes.extend(g.node)
            continue
        node = nodes.pop()
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t, f"tensor {a.t.name or a.name!r} of node {node.name or node.op_type!r}"
            for t in a.tensors:
                yield t, f"tensor {t.name or a.name!r} of node {node.name or node.op_type!r}"
            if a.HasField("g"):
                graphs.append(a.g)
            graphs.extend(a.graphs)


def _check_tensors(model: onnx.ModelProto, name: str, budget: int, check_data: bool) -> None:
    total, largest, largest_at = 0, 0, ""
    for t, what in stored_tensor_protos(model):
        if t.data_type not in KNOWN_TYPES:
            raise ModelLoadError(f"{name}: invalid ONNX model ({what} has no known element type "
                                 f"(got {t.data_type}))")
        dims = tuple(int(d) for d in t.dims)
        if any(d < 0 for d in dims):
            raise ModelLoadError(f"{name}: invalid ONNX model ({what} has a negative dimension {dims})")
        numel = math.prod(dims)
        total += numel
        if numel > largest:
            largest, largest_at = numel, f"{what}, shape {dims}"
        if check_data and t.data_location != onnx.TensorProto.EXTERNAL:
            held = _held_values(t, numel)
            if held is not None and not held[0]:
                raise ModelLoadError(f"{name}: invalid ONNX model ({what} declares shape {dims} "
                                     f"({numel:,} values) but holds {held[1]})")
    if total > budget:
        raise ModelLoadError(
            f"{name}: declares {total:,} parameter elements (largest: {largest_at}), more than the budget of "
            f"{budget:,} for the memory available here; set {BUDGET_ENV} to change it")


def _held_values(t: onnx.TensorProto, numel: int) -> tuple[bool, str] | None:
    """Whether ``t`` holds exactly the values of ``numel`` elements inline, and what it holds in
    words; None for a type whose storage we cannot count."""
    raw = len(t.raw_data)
    if raw:
        bits = PACKED_BITS.get(t.data_type)
        if bits is None:
            try:
                bits = 8 * np_dtype(t.data_type).itemsize
            except (KeyError, TypeError, ValueError):
                return None
            if t.data_type == onnx.TensorProto.STRING:
                return None
        exact = raw == math.ceil(numel * bits / 8)
        return exact, f"{raw:,} bytes of raw data"
    field = VALUE_FIELDS.get(t.data_type)
    if field is None:
        return None
    entries = len(getattr(t, field[0]))
    per_entry = INT32_PER_ENTRY.get(t.data_type)
    exact = entries == (math.ceil(numel / per_entry) if per_entry else numel * field[1])
    return exact, f"{entries:,} {field[0]} entries"


def memory_available() -> int:
    """Bytes this process can still allocate: the smaller of the system's available memory
    (``MemAvailable``) and what ``RLIMIT_AS`` leaves above the current address space."""
    limits = []
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    if not limits and hasattr(os, "sysconf"):
        try:
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            limits.append(max(soft - _address_space(), 0))
    except (ImportError, OSError, ValueError):
        pass
    return min(limits) if limits else 1 << 34  # unknown: assume 16 GiB


def _address_space() -> int:
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def element_budget() -> int:
    """How many parameter elements a model may declare in all: ``$GHN_ONNX_MAX_ELEMENTS`` if set,
    else the memory available divided by :data:`BYTES_PER_ELEMENT`."""
    value = os.environ.get(BUDGET_ENV)
    if value:
        try:
            return max(int(value), 0)
        except ValueError:
            raise ModelLoadError(f"{BUDGET_ENV}: expected a number of elements (got {value!r})") from None
    return memory_available() // BYTES_PER_ELEMENT


# -- schema and external data ----------------------------------------------------------------------

def _check_node_inputs(model: onnx.ModelProto, path: Path) -> None:
    """Refuse a node with fewer inputs or outputs than its ONNX schema requires (a Conv without
    its weight): the rules read inputs and outputs by position. Not the full onnx.checker, which
    also rejects models that runtimes load fine (graph outputs without a shape, for one)."""
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
        if len(node.output) < schema.min_output:
            raise ModelLoadError(f"{path}: invalid ONNX model ({node.op_type} node {node.name!r} has "
                                 f"{len(node.output)} output(s), the spec requires at least {schema.min_output})")


def _load_external_data(model: onnx.ModelProto, path: Path) -> tuple[Path, ...]:
    """Load every external tensor, each file checked (a regular file next to the model, long
    enough) and each read bounded to the bytes its dims need before anything is read; the
    files read."""
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    external = [(t, what) for t, what in stored_tensor_protos(model) if uses_external_data(t)]
    if not external:
        return ()
    base = path.parent
    files: set[Path] = set()
    for t, _ in external:
        entries = {e.key: e.value for e in t.external_data}
        location = entries.get("location")
        if location is not None:  # what onnx refuses too, said before anything is opened
            where = None
            if os.path.isabs(location):
                where = "is an absolute path; it must be relative to the model's folder"
            elif Path(os.path.normpath(location)).parts[:1] == ("..",):
                where = "points outside the model's folder"
            elif (base / location).is_symlink():
                where = "is a symbolic link"
            if where:
                raise ModelLoadError(f"{path}: external data file {location!r} for tensor {t.name!r} {where}")
        if location is None or not (base / location).is_file():
            kind = ""
            if location is not None and (base / location).exists():
                kind = " (not a regular file)"
            raise ModelLoadError(
                f"{path}: external data file {location!r} for tensor {t.name!r} not found next to the model{kind}"
            )
        expected = tensor_nbytes(t) if t.data_type not in PACKED_BITS else \
            math.ceil(math.prod(t.dims) * PACKED_BITS[t.data_type] / 8)
        try:
            offset = int(entries.get("offset") or 0)
            length = int(entries["length"]) if "length" in entries else None
        except ValueError:
            raise ModelLoadError(f"{path}: external data of {t.name!r} has a non-numeric offset or length") from None
        size = regular_file_stat(base / location, ModelLoadError, "an external data file").st_size
        files.add(base / location)
        need = length if length is not None else expected
        if need is not None and (offset < 0 or need < 0 or offset + need > size):
            raise ModelLoadError(f"{path}: external data for {t.name!r} is truncated ({location!r} has "
                                 f"{size:,} bytes, the tensor needs {need:,} from offset {offset:,})")
        if length is None and expected is not None:  # else onnx would read to the end of the file
            t.external_data.add(key="length", value=str(expected))
    try:
        load_external_data_for_model(model, str(base))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelLoadError(f"{path}: external data is unreadable or truncated ({_first_line(exc)})") from None
    except MemoryError:
        raise ModelLoadError(f"{path}: not enough memory to read its external data") from None
    for t, _ in external:
        expected = tensor_nbytes(t) if t.data_type not in PACKED_BITS else None
        if expected is not None and len(t.raw_data) and len(t.raw_data) != expected:
            raise ModelLoadError(f"{path}: external data for {t.name!r} is truncated "
                                 f"({len(t.raw_data)} of {expected} bytes)")
    return tuple(sorted(files))


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
