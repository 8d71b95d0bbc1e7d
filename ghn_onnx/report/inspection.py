"""What a GHN would see of an ONNX model, and how much of the model it would predict.

:func:`inspect` converts a model and accounts for every float tensor stored in it
(initializers and ``Constant`` node values, :func:`~ghn_onnx.onnx_io.storage.stored_tensors`), each in
exactly one group:

- **predicted**: tensors some GHN node predicts (conv / linear weights, biases, norm scales and
  shifts, positional encodings);
- **statistics**: BatchNorm running mean and variance. They are calibrated on data after the
  parameters are set, never predicted, so they are reported apart and left out of the first
  coverage figure;
- **unsupported**: parameters of ops that no GHN primitive covers (left as they are);
- **other**: everything else stored as float (resize scales, clip bounds, scalar constants, ...).

Coverage is reported both ways: predicted elements over stored float elements *excluding
statistics*, and over *all* stored float elements.

The classifier (:class:`~ghn_onnx.ghn.decode.rules.ClassifierHead`) is reported with the rule that
fills it: a head whose out-features are not the GHN's class count is predicted from the GHN's
class rows, sliced or tiled (:meth:`Report.for_classes` names the GHN's count; ``ghn-onnx
inspect`` takes it from ``--checkpoint``, default the shipped one).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import onnx

from ghn_onnx.convert import convert
from ghn_onnx.convert.tensors import StoredTensor
from ghn_onnx.ghn.decode.rules import ClassifierHead, classifier_head
from ghn_onnx.graph.graph import Graph, Layout
from ghn_onnx.graph.primitives import Primitive
from ghn_onnx.onnx_io.loading import load_model
from ghn_onnx.onnx_io.storage import FLOAT_TYPES, alias_source, is_batch_norm, stored_tensors, untie_aliases


@dataclass(frozen=True)
class TensorCount:
    """How many tensors and elements a group of stored tensors holds."""

    tensors: int
    elements: int

    @classmethod
    def of(cls, tensors: Iterable[StoredTensor]) -> "TensorCount":
        tensors = list(tensors)
        return cls(len(tensors), sum(t.numel for t in tensors))


@dataclass(frozen=True)
class Report:
    """The inspection of one model; see the module docstring for the tensor groups."""

    model: str
    primitives: dict[str, int]  # every primitive, in embedding-id order, zeros included
    nodes: int
    edges: int
    edges_with_virtual: int
    predicted: TensorCount
    statistics: TensorCount
    unsupported_params: TensorCount
    other: TensorCount
    stored_float: TensorCount
    unsupported: dict[str, list[StoredTensor]]  # op type -> its parameter tensors
    shared: dict[str, int]  # stored tensor -> how many parameters read it, where more than one
    warnings: list[str]
    bn_folded: bool
    classifier: ClassifierHead | None = None  # the class head and how a GHN fills it

    def for_classes(self, classes: int | None) -> "Report":
        """This report for a GHN with ``classes`` classes (how it fills the classifier)."""
        if self.classifier is None:
            return self
        return replace(self, classifier=replace(self.classifier, classes=classes))

    @property
    def excluding_statistics(self) -> TensorCount:
        return TensorCount(self.stored_float.tensors - self.statistics.tensors,
                           self.stored_float.elements - self.statistics.elements)

    @property
    def coverage_excluding_statistics(self) -> float:
        return _share(self.predicted.elements, self.excluding_statistics.elements)

    @property
    def coverage_of_stored(self) -> float:
        return _share(self.predicted.elements, self.stored_float.elements)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types, keys in a fixed order (the order of the text report)."""

        def count(c: TensorCount) -> dict[str, int]:
            return {"tensors": c.tensors, "elements": c.elements}

        return {
            "model": self.model,
            "graph": {"nodes": self.nodes, "edges": self.edges, "edges_with_virtual": self.edges_with_virtual},
            "primitives": dict(self.primitives),
            "parameters": {
                "predicted": count(self.predicted),
                "statistics": count(self.statistics),
                "unsupported": count(self.unsupported_params),
                "other": count(self.other),
                "stored_float": count(self.stored_float),
                "excluding_statistics": count(self.excluding_statistics),
                "coverage_excluding_statistics": round(self.coverage_excluding_statistics, 6),
                "coverage_of_stored_float": round(self.coverage_of_stored, 6),
                "classifier": self.classifier.to_json() if self.classifier is not None else None,
            },
            "unsupported": {
                op: [{"tensor": t.name, "shape": list(t.shape), "elements": t.numel} for t in tensors]
                for op, tensors in self.unsupported.items()
            },
            "shared": dict(self.shared),
            "warnings": list(self.warnings),
            "bn_folded": self.bn_folded,
        }


def inspect_model(model: onnx.ModelProto | str | os.PathLike, name: str | None = None) -> tuple[Report, Graph]:
    """Convert ``model`` (a ModelProto, or the path of a file, only read); the report and the
    graph it describes. ``name`` labels the report (default: the file name, or ``"model"``).

    The model is prepared as prediction prepares it: exporter aliases of merged initializers
    (:func:`~ghn_onnx.onnx_io.storage.untie_aliases`) become tensors of their own before converting.

    Raises:
        ModelLoadError: the file is missing, not ONNX, truncated, or lacks its external data.
        UnsupportedModelError: quantized, control flow, or nothing a GHN can predict.
    """
    if not isinstance(model, onnx.ModelProto):
        name = name or Path(model).name
        model = load_model(model)
    model, untied = untie_aliases(model)
    graph = convert(model, name=name or "model")
    return build_report(model, graph, untied), graph


def inspect(model: onnx.ModelProto | str | os.PathLike, name: str | None = None) -> Report:
    """What a GHN would see of ``model`` and how much of it it would predict (``ghn-onnx
    inspect``); :func:`inspect_model` also returns the graph.

    >>> report = inspect("tests/fixtures/frameworks/torch_cnn.onnx")
    >>> report.primitives["conv"], report.predicted.tensors, report.warnings
    (5, 14, [])
    >>> print(format_report(report).splitlines()[0])
    torch_cnn.onnx: 16 nodes, 17 edges, 120 with virtual edges
    """
    return inspect_model(model, name)[0]


def build_report(model: onnx.ModelProto, graph: Graph, untied: Sequence[str] = ()) -> Report:
    """The report for a model and the graph converted from it; ``untied`` names the tensors
    :func:`~ghn_onnx.onnx_io.storage.untie_aliases` made (reported as a warning)."""
    floats = {name: StoredTensor(name, t.data_type, tuple(int(d) for d in t.dims), Layout())
              for name, t in stored_tensors(model).items() if t.data_type in FLOAT_TYPES}

    predicted_uses = [p.tensor for p in graph.predicted_tensors()]
    statistics_uses = batchnorm_statistics(model, floats)
    taken = set(predicted_uses)
    predicted = [floats[n] for n in dict.fromkeys(predicted_uses)]
    statistics = [floats[n] for n in dict.fromkeys(statistics_uses) if n not in taken]
    taken |= {t.name for t in statistics}
    unsupported = {op: [floats[n] for n in names if n in floats] for op, names in graph.unsupported.items()}
    unsupported_params = {t.name: t for ts in unsupported.values() for t in ts if t.name not in taken}
    taken |= set(unsupported_params)
    other = [t for n, t in floats.items() if n not in taken]

    # One stored tensor read as several parameters (tied weights, or a BN scale that is also a
    # running statistic) holds one value for all of them.
    shared = {n: k for n, k in Counter(predicted_uses + statistics_uses).items() if k > 1}
    warnings = list(graph.warnings)
    if untied:
        warnings.insert(0, f"{len(untied)} parameter(s) were Identity aliases of an initializer the exporter "
                           f"merged because the values were equal (e.g. {untied[0]!r}); each is counted as a "
                           "tensor of its own, as prediction writes it")
    if shared:
        example, k = next(iter(shared.items()))
        warnings.append(f"{len(shared)} stored tensor(s) are read as more than one parameter (e.g. {example!r} "
                        f"is read {k} times); each holds one value for all its readers")

    counts = graph.counts()
    return Report(
        model=graph.name,
        primitives={p.label: counts.get(p.label, 0) for p in Primitive},
        nodes=len(graph),
        edges=len(graph.edges),
        edges_with_virtual=len(graph.edges_with_virtual()),
        predicted=TensorCount.of(predicted),
        statistics=TensorCount.of(statistics),
        unsupported_params=TensorCount.of(unsupported_params.values()),
        other=TensorCount.of(other),
        stored_float=TensorCount.of(floats.values()),
        unsupported=unsupported,
        shared=shared,
        warnings=warnings,
        bn_folded=bool(graph.info.get("bn_folded", False)),
        classifier=classifier_head(graph),
    )


def batchnorm_statistics(model: onnx.ModelProto, stored: dict[str, StoredTensor]) -> list[str]:
    """The stored tensor behind each BatchNorm running mean and variance input, one entry per
    input (a tensor the exporter shares between inputs appears more than once)."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    names: list[str] = []
    for node in model.graph.node:
        if not is_batch_norm(node):
            continue
        for name in node.input[3:5]:
            source = alias_source(name, stored, producer)
            if source is not None:
                names.append(source)
    return names


def format_report(report: Report) -> str:
    """The human-readable report: one fact per line, aligned columns."""
    r = report
    lines = [
        f"{r.model}: {r.nodes} nodes, {r.edges} edges, {r.edges_with_virtual} with virtual edges",
        "",
        "primitives",
    ]
    lines += [f"  {label:<10} {n:>6}" for label, n in r.primitives.items()]
    lines += [
        "",
        "parameters (float tensors stored in the model)",
        _count_line("predicted", r.predicted),
        _count_line("statistics", r.statistics, "calibrated, not predicted (BatchNorm running mean/var)"),
        _count_line("unsupported", r.unsupported_params, "left as stored (no GHN primitive)"),
        _count_line("other", r.other, "left as stored (scales, bounds, scalar constants)"),
        _count_line("total", r.stored_float),
        "",
        f"coverage   {_percent(r.coverage_excluding_statistics)} of stored float elements, statistics "
        f"excluded ({r.predicted.elements:,} / {r.excluding_statistics.elements:,})",
        f"           {_percent(r.coverage_of_stored)} of all stored float elements "
        f"({r.predicted.elements:,} / {r.stored_float.elements:,})",
    ]
    lines += ["", f"classifier {_classifier_line(r.classifier)}"]
    if r.unsupported:
        lines += ["", "unsupported ops"]
        for op, tensors in r.unsupported.items():
            lines.append(f"  {op}: " + ", ".join(f"{t.name} {list(t.shape)}" for t in tensors))
    lines += ["", "warnings"] + ([f"  - {w}" for w in r.warnings] or ["  (none)"])
    return "\n".join(lines)


def _classifier_line(head: ClassifierHead | None) -> str:
    if head is None:
        return "(none: the last weight is not a linear layer, no class head is used)"
    line = f"{head.weight}{' + ' + head.bias if head.bias else ''}: {head.outputs} outputs"
    if head.classes is None:
        return line + "; a GHN fills them from its class rows, sliced or tiled to this count"
    how = head.explanation()
    line += f", GHN classes {head.classes}: {head.rule}"
    return line + (f"\n           {how}; fine-tune the head" if how else "")


def _count_line(label: str, c: TensorCount, note: str = "") -> str:
    line = f"  {label:<12} {c.tensors:>6} tensors {c.elements:>14,} elements"
    return f"{line}   {note}" if note else line


def _percent(x: float) -> str:
    # Rounded down, so that 100.00% means everything and never 99.997%.
    return f"{math.floor(10000 * x) / 100:6.2f}%"


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0
