"""ONNX in, ONNX with predicted parameters out: the product's main entry point.

:func:`predict_models` converts each model to a GHN graph, runs the GHN once over the batch of
graphs, and writes the predictions back in each tensor's stored layout and dtype.
:func:`predict_files` does the same file to file, with optional BN calibration.

Tied tensors: PyTorch exporters alias parameters whose values happen to be equal (every BN scale
of a fresh network reads one all-ones tensor through ``Identity`` nodes); these are untied first,
so each parameter gets its own prediction. Parameters genuinely shared by several layers are
predicted once, from the first layer in topological order.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
import torch

from ghn_onnx.convert import convert
from ghn_onnx.onnx_io.loading import load_model
from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.ghn.model import GHN
from ghn_onnx.graph.graph import Graph
from ghn_onnx.graph.primitives import Primitive
from ghn_onnx.onnx_io.storage import untie_aliases
from ghn_onnx.writeback.unfold import folded_convs, is_virtual
from ghn_onnx.writeback.write import resolve_shared, save_model, write_predictions

# Graphs decoded together in one GHN call; bounds memory when predicting many files.
MAX_NODES_PER_CALL = 20_000


@dataclass
class Prediction:
    """One predicted model and what a user should know about it."""

    name: str
    model: onnx.ModelProto
    graph: Graph
    predicted_tensors: int
    predicted_elements: int
    bn_status: str
    warnings: list[str] = field(default_factory=list)
    output: str | None = None
    seconds: float = 0.0

    def summary(self) -> dict:
        return {
            "name": self.name,
            "output": self.output,
            "nodes": len(self.graph),
            "predicted_tensors": self.predicted_tensors,
            "predicted_elements": self.predicted_elements,
            "bn": self.bn_status,
            "warnings": list(self.warnings),
            "seconds": round(self.seconds, 4),
        }


def prepare(model: onnx.ModelProto, name: str) -> tuple[onnx.ModelProto, Graph]:
    """Untie exporter aliases and convert: the model the predictions are written into, and its graph."""
    model, _ = untie_aliases(model)
    return model, convert(model, name=name)


def bn_status(graph: Graph) -> str:
    if graph.info.get("bn_folded"):
        return "folded"
    if any(n.primitive is Primitive.BN for n in graph.nodes):
        return "uncalibrated"  # running statistics untouched: evaluate with batch statistics or calibrate
    return "none"


@torch.no_grad()
def predict_graphs(ghn: GHN, graphs: Sequence[Graph], reference: bool = False) -> list[dict[str, np.ndarray]]:
    """Run the GHN over ``graphs`` in as few calls as memory allows; canonical fp32 arrays.
    ``reference`` uses the sequential reference propagation (for benchmarks and tests)."""
    out: list[dict[str, np.ndarray]] = []
    start = 0
    while start < len(graphs):
        end, nodes = start, 0
        while end < len(graphs) and (end == start or nodes + len(graphs[end]) <= MAX_NODES_PER_CALL):
            nodes += len(graphs[end])
            end += 1
        for params in ghn(list(graphs[start:end]), sequential=reference):
            out.append({k: v.detach().cpu().numpy() for k, v in params.items()})
        start = end
    return out


Unfolder = Callable[[onnx.ModelProto, Graph], "tuple[onnx.ModelProto, Graph, str]"]


def predict_models(models: Sequence[onnx.ModelProto], ghn: GHN, names: Sequence[str] | None = None,
                   metadata: dict[str, str] | None = None, reference: bool = False,
                   unfold: Unfolder | None = None) -> list[Prediction]:
    """Predict the parameters of several models with one batched GHN pass.

    ``unfold(model, graph) -> (model, graph, bn status)`` handles BN-folded models instead (see
    :func:`ghn_onnx.writeback.unfold.predict_unfolded`)."""
    names = list(names or [f"model_{i}" for i in range(len(models))])
    prepared = [prepare(m, n) for m, n in zip(models, names)]
    folded = [unfold is not None and is_bn_folded(m, g) for m, g in prepared]
    params = iter(predict_graphs(ghn, [g for (_, g), f in zip(prepared, folded) if not f], reference))
    results = []
    for (model, graph), name, fold in zip(prepared, names, folded):
        if fold:
            out, ugraph, status = unfold(model, graph)
            n = [p for node in ugraph.nodes for p in node.params if not is_virtual(p)]
            results.append(Prediction(name=name, model=out, graph=ugraph, predicted_tensors=len(n),
                                      predicted_elements=int(sum(p.numel for p in n)), bn_status=status,
                                      warnings=list(ugraph.warnings)))
            continue
        pred = next(params)
        status = bn_status(graph)
        meta = {**(metadata or {}), "bn": status}
        owners = resolve_shared(graph)
        pred = {k: v for k, v in pred.items() if k in owners}
        out = write_predictions(model, graph, pred, metadata=meta)
        results.append(Prediction(
            name=name, model=out, graph=graph, predicted_tensors=len(pred),
            predicted_elements=int(sum(v.size for v in pred.values())), bn_status=status,
            warnings=list(graph.warnings),
        ))
    return results


def is_bn_folded(model: onnx.ModelProto, graph: Graph) -> bool:
    return bool(folded_convs(model, graph))


def predict(model: onnx.ModelProto, ghn: GHN, name: str = "model", metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """``predict(model, ghn) -> onnx.ModelProto`` with every supported parameter predicted."""
    return predict_models([model], ghn, [name], metadata)[0].model


def predict_files(inputs: Sequence[str | os.PathLike], outputs: Sequence[str | os.PathLike], ghn: GHN, *,
                  metadata: dict[str, str] | None = None,
                  calibrate: Callable[[onnx.ModelProto, Graph], tuple[onnx.ModelProto, str]] | None = None,
                  progress: Callable[[Iterable], Iterable] = lambda it: it,
                  reference: bool = False, unfold: Unfolder | None = None) -> list[Prediction]:
    """File to file. Inputs are only read; each output is written atomically (temp + rename).

    ``calibrate(model, graph) -> (model, status)`` is applied to each predicted model before it
    is saved (see :mod:`ghn_onnx.bn.calibration`).
    """
    if len(inputs) != len(outputs):
        raise GhnOnnxError(f"expected one output per input (got {len(inputs)} inputs, {len(outputs)} outputs)")
    resolved = [Path(o).resolve() for o in outputs]
    if len(set(resolved)) != len(resolved):
        raise GhnOnnxError("two inputs would be written to the same output file")
    t0 = time.perf_counter()
    models = [load_model(p) for p in inputs]
    preds = predict_models(models, ghn, [Path(p).name for p in inputs], metadata, reference, unfold)
    share = (time.perf_counter() - t0) / max(len(preds), 1)
    for pred, src, dst in progress(list(zip(preds, inputs, outputs))):
        t1 = time.perf_counter()
        if calibrate is not None and pred.bn_status not in ("none",) and not pred.bn_status.startswith("unfolded"):
            pred.model, pred.bn_status = calibrate(pred.model, pred.graph)
            _set_bn_metadata(pred.model, pred.bn_status)
        save_model(pred.model, dst, source_path=src)
        pred.output = str(dst)
        pred.seconds = share + time.perf_counter() - t1
    return preds


def _set_bn_metadata(model: onnx.ModelProto, status: str) -> None:
    for prop in model.metadata_props:
        if prop.key == "ghn_onnx.bn":
            prop.value = status
            return
    model.metadata_props.add(key="ghn_onnx.bn", value=status)
