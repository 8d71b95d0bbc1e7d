"""Training and evaluation architectures for a GHN, as graphs read through the ONNX converter.

Every graph the GHN trains on is made the way a user's model is: the network is exported with
PyTorch's TorchScript exporter, exporter aliases are untied, and :func:`ghn_onnx.convert.convert`
reads it. Exporting costs 0.1-1 s per network, so :class:`ArchPool` exports a new architecture
only while exports stay within a fraction of the training time, and otherwise re-uses an exported
architecture at a freshly drawn width through :func:`refresh_shapes` (milliseconds).

Seeds live in separate namespaces: evaluation sets are drawn from ``[EVAL_NAMESPACE, split]``,
training draws from ``[TRAIN_NAMESPACE, seed, index]`` and pool re-use from
``[POOL_NAMESPACE, seed, index]``, so no training seed can reproduce an evaluation stream, and the
training stream also rejects every spec whose hash is in an evaluation set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import onnx
import torch
import torch.nn as nn

from ghn_onnx.convert import convert
from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.graph.graph import Graph, Layout, LayoutStep, Node, ParamRef
from ghn_onnx.onnx_io.storage import untie_aliases
from ghn_onnx.training.network import Network, build_net
from ghn_onnx.training.sampling import GEN_C, GEN_FC_DIM, sample_arch, sample_width
from ghn_onnx.training.spec import ArchSpec

EVAL_NAMESPACE = 0xE7A1
TRAIN_NAMESPACE = 0x7A11
POOL_NAMESPACE = 0x9001
#: Evaluation splits and their sizes; ``wide`` is the first 50 ``test`` architectures at 4x width.
EVAL_SIZES: dict[str, int] = {"test": 200, "wide": 50, "deep": 50, "dense": 50, "bnfree": 50}
WIDE_FACTOR = 4
_EVAL_SPLIT_IDS = {"test": 1, "deep": 2, "dense": 3, "bnfree": 4}
#: Export settings (the parity fixtures' settings).
OPSET = 17
INPUT_SHAPE = (1, 3, 32, 32)


class GraphRefreshError(GhnOnnxError):
    """A graph cannot be re-shaped from a network: a parameter is missing or a layout is not
    width-independent."""


# -- graphs ---------------------------------------------------------------------------------------

def export_onnx(net: nn.Module) -> onnx.ModelProto:
    """TorchScript export (opset 17, eval mode, no constant folding, input ``1x3x32x32`` named
    ``input``, output ``logits``), so initializer names are the PyTorch parameter names.

    Runs single-threaded: tracing runs one batch-1 forward pass, and on a busy 2-core machine two
    intra-op threads make it 10-50x slower.
    """
    buf = io.BytesIO()
    was_training = net.training
    net.eval()
    try:
        with _single_thread(), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(net, (torch.zeros(INPUT_SHAPE),), buf, dynamo=False, opset_version=OPSET,
                              training=torch.onnx.TrainingMode.EVAL, do_constant_folding=False,
                              input_names=["input"], output_names=["logits"])
    finally:
        net.train(was_training)
    return onnx.load_from_string(buf.getvalue())


@contextlib.contextmanager
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def arch_onnx(spec: ArchSpec, C: int, fc_dim: int, num_classes: int = 10) -> onnx.ModelProto:
    """The exported network with aliases untied (what a user would feed to ``predict``).

    BatchNorm is built with running statistics (zeros / ones) so that eval-mode export emits
    ``BatchNormalization`` nodes, which the converter maps to ``bn``; DeepNets themselves use
    batch statistics only, so the statistics are never meaningful.
    """
    net = build_net(spec, C, fc_dim, num_classes, track_running_stats=True)
    model, _ = untie_aliases(export_onnx(net))
    return model


def arch_graph(spec: ArchSpec, C: int, fc_dim: int, num_classes: int = 10) -> Graph:
    """The GHN graph of ``spec`` at width ``C``: export, untie, convert (named by ``spec.key``)."""
    return convert(arch_onnx(spec, C, fc_dim, num_classes), name=spec.key)


def refresh_shapes(graph: Graph, net: nn.Module) -> Graph:
    """``graph`` (of the same architecture at another width) with every parametrised node's shapes
    taken from ``net``'s parameters: node types, names and edges are kept.

    ParamRef tensor names are the module's parameter names (TorchScript export without constant
    folding). Transposes in a layout carry over; reshapes are re-derived when they only flatten a
    tensor or add/remove unit axes. Convolution groups come from the owning ``nn.Conv2d``.

    Raises:
        GraphRefreshError: a tensor of ``graph`` is not a parameter of ``net``, or a layout cannot
            be carried to the new shape.
    """
    params = dict(net.named_parameters())
    groups = {f"{name}.weight": m.groups for name, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    nodes: list[Node] = []
    for node in graph.nodes:
        if not node.params:
            nodes.append(node)
            continue
        refs = tuple(_refresh_ref(ref, params) for ref in node.params)
        main = refs[0]
        nodes.append(dataclasses.replace(node, shape=main.canonical_shape, params=refs,
                                         groups=groups.get(main.tensor, node.groups)))
    return Graph(nodes, graph.edges.copy(), name=graph.name, warnings=list(graph.warnings),
                 unsupported={k: list(v) for k, v in graph.unsupported.items()}, info=dict(graph.info))


def _refresh_ref(ref: ParamRef, params: dict[str, torch.Tensor]) -> ParamRef:
    p = params.get(ref.tensor)
    if p is None:
        raise GraphRefreshError(f"Expected parameter {ref.tensor!r} in the network (it is not one of its "
                                f"{len(params)} parameters)")
    stored = tuple(int(d) for d in p.shape)
    if len(stored) != len(ref.stored_shape):
        raise GraphRefreshError(f"{ref.tensor!r}: expected rank {len(ref.stored_shape)} (got shape {stored})")
    steps, shape = [], stored
    for step in ref.layout.steps:
        if step.kind == "reshape":
            step = LayoutStep("reshape", (shape, _reshape_target(ref.tensor, step.arg, shape)))
        steps.append(step)
        shape = step.out_shape(shape)
    return dataclasses.replace(ref, stored_shape=stored, layout=Layout(tuple(steps)))


def _reshape_target(name: str, arg: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
    old_from, old_to = (tuple(a) for a in arg)
    if len(old_to) == 1:  # flatten
        return (int(np.prod(shape)),)
    if [d for d in old_from if d != 1] == [d for d in old_to if d != 1]:  # add / remove unit axes
        dims = iter(d for d in shape if d != 1)
        try:
            return tuple(1 if d == 1 else next(dims) for d in old_to)
        except StopIteration:
            pass
    raise GraphRefreshError(f"{name!r}: reshape {list(old_from)} -> {list(old_to)} cannot be carried "
                            f"to shape {list(shape)}")


# -- evaluation sets ------------------------------------------------------------------------------

def eval_specs(split: str, n: int | None = None) -> list[ArchSpec]:
    """The first ``n`` (default all) architectures of a fixed evaluation set (never trained on).

    Deterministic and prefix-stable. ``wide`` is the first 50 ``test`` architectures, evaluated
    at :func:`eval_width` (4x wider).
    """
    if split not in EVAL_SIZES:
        raise ValueError(f"Expected an evaluation split from {sorted(EVAL_SIZES)} (got {split!r})")
    size = EVAL_SIZES[split]
    n = size if n is None else n
    if not 0 <= n <= size:
        raise ValueError(f"Expected 0 <= n <= {size} for {split!r}: only those are excluded from training (got {n})")
    return list(_eval_set(split)[:n])


def eval_width(split: str) -> tuple[int, int]:
    """``(C, fc_dim)`` at which evaluation architectures are built: the generation width, and
    ``C x 4`` for ``wide``."""
    return (GEN_C * WIDE_FACTOR if split == "wide" else GEN_C), GEN_FC_DIM


@functools.lru_cache(maxsize=None)
def _eval_set(split: str) -> tuple[ArchSpec, ...]:
    if split == "wide":
        return _eval_set("test")[:EVAL_SIZES["wide"]]
    rng = np.random.default_rng([EVAL_NAMESPACE, _EVAL_SPLIT_IDS[split]])
    out: list[ArchSpec] = []
    seen: set[str] = set()
    while len(out) < EVAL_SIZES[split]:
        spec = sample_arch(rng, split)
        if spec.key not in seen:
            seen.add(spec.key)
            out.append(spec)
    return tuple(out)


@functools.lru_cache(maxsize=None)
def eval_keys() -> frozenset[str]:
    """Hashes of every evaluation architecture: training never draws these."""
    return frozenset(s.key for split in EVAL_SIZES for s in _eval_set(split))


# -- training stream ------------------------------------------------------------------------------

class Draw(NamedTuple):
    spec: ArchSpec
    C: int
    fc_dim: int


class TrainingStream:
    """An endless, resumable stream of ``(spec, C, fc_dim)`` training draws.

    Draw ``i`` is a pure function of ``(seed, i)``: its generator is seeded with
    ``[TRAIN_NAMESPACE, seed, i]``, it skips evaluation architectures (by hash), and the width is
    re-sampled per draw (GHN2_FACTS §5.2). ``state()`` / ``from_state()`` resume exactly.
    """

    def __init__(self, seed: int = 0, split: str = "train", counter: int = 0) -> None:
        self.seed = int(seed)
        self.split = split
        self.counter = int(counter)
        self._excluded = eval_keys()

    def draw(self, index: int) -> Draw:
        rng = np.random.default_rng([TRAIN_NAMESPACE, self.seed, int(index)])
        while True:
            spec = sample_arch(rng, self.split)
            if spec.key not in self._excluded:
                return Draw(spec, *sample_width(rng, spec))

    def __iter__(self) -> Iterator[Draw]:
        return self

    def __next__(self) -> Draw:
        d = self.draw(self.counter)
        self.counter += 1
        return d

    def state(self) -> dict[str, Any]:
        return {"seed": self.seed, "split": self.split, "counter": self.counter}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "TrainingStream":
        return cls(state["seed"], state.get("split", "train"), state["counter"])


# -- pool -----------------------------------------------------------------------------------------

@dataclass
class PoolSample:
    """One training network: its spec and width, the network (batch-statistics BN, freshly
    initialised) and its GHN graph (both None for a draw made with ``build=False``). ``new`` is
    True when the architecture was just added to the pool."""

    spec: ArchSpec
    C: int
    fc_dim: int
    net: Network | None
    graph: Graph | None
    new: bool


@dataclass
class _Entry:
    spec: ArchSpec
    C: int
    fc_dim: int
    graph: Graph | None  # None until (re-)exported after a resume


class ArchPool:
    """Exported architectures, re-used at fresh widths so that exporting stays cheap.

    Each :meth:`draw` either takes the next architecture from the stream and exports it (when
    ``export + refresh seconds <= budget_fraction * training seconds``, or the pool is empty), or
    picks a pool entry with the generator ``[POOL_NAMESPACE, seed, draw]``, re-samples its width
    and refreshes its graph. The caller reports training time with :meth:`add_training_time`.

    The pool's content is the stream's draws ``start .. start + n - 1``, so :meth:`state` /
    :meth:`from_state` restore it exactly (graphs are re-exported lazily, on first re-use, and
    that time counts against the budget). Which draws add an architecture depends on measured
    times; everything else is a function of the seed and the counters. With ``add_every=k`` the
    pool instead adds an architecture on every k-th draw and ignores times: the draw sequence is
    then a pure function of the seed (identical on every rank of a multi-process run, and after a
    resume).

    ``draw(build=False)`` advances the pool exactly as ``draw()`` but builds, exports and
    refreshes nothing (its sample has ``net`` and ``graph`` None; a new architecture is exported
    when first re-used): a rank of a multi-process run draws the other ranks' networks this way.
    """

    def __init__(self, stream: TrainingStream | None = None, budget_fraction: float = 0.1,
                 num_classes: int = 10, device: torch.device | str | None = None,
                 timer: Callable[[], float] = time.perf_counter, add_every: int | None = None) -> None:
        if not 0 <= budget_fraction:
            raise ValueError(f"Expected budget_fraction >= 0 (got {budget_fraction})")
        if add_every is not None and add_every < 1:
            raise ValueError(f"Expected add_every >= 1 or None (got {add_every})")
        self.add_every = add_every
        self.stream = stream if stream is not None else TrainingStream()
        self.budget_fraction = float(budget_fraction)
        self.num_classes = num_classes
        self.device = device
        self.timer = timer
        self.start = self.stream.counter
        self.entries: list[_Entry] = []
        self.draws = 0
        self.training_seconds = 0.0
        self.export_seconds = 0.0
        self.refresh_seconds = 0.0
        self.build_seconds = 0.0
        self.exports = 0

    def add_training_time(self, seconds: float) -> None:
        self.training_seconds += float(seconds)

    @property
    def generation_seconds(self) -> float:
        return self.export_seconds + self.refresh_seconds

    def _may_add(self, index: int) -> bool:
        if not self.entries:
            return True
        if self.add_every is not None:
            return index % self.add_every == 0
        return self.generation_seconds <= self.budget_fraction * self.training_seconds

    def draw(self, build: bool = True) -> PoolSample:
        index = self.draws
        self.draws += 1
        if self._may_add(index):
            spec, C, fc_dim = next(self.stream)
            if not build:
                self.entries.append(_Entry(spec, C, fc_dim, graph=None))
                return PoolSample(spec, C, fc_dim, None, None, new=True)
            entry = _Entry(spec, C, fc_dim, self._export(spec, C, fc_dim))
            self.entries.append(entry)
            return PoolSample(spec, C, fc_dim, self._build(spec, C, fc_dim), entry.graph, new=True)
        rng = np.random.default_rng([POOL_NAMESPACE, self.stream.seed, index])
        entry = self.entries[int(rng.integers(len(self.entries)))]
        C, fc_dim = sample_width(rng, entry.spec)
        if not build:
            return PoolSample(entry.spec, C, fc_dim, None, None, new=False)
        if entry.graph is None:
            entry.graph = self._export(entry.spec, entry.C, entry.fc_dim)
        net = self._build(entry.spec, C, fc_dim)
        t0 = self.timer()
        graph = refresh_shapes(entry.graph, net)
        self.refresh_seconds += self.timer() - t0
        return PoolSample(entry.spec, C, fc_dim, net, graph, new=False)

    def _export(self, spec: ArchSpec, C: int, fc_dim: int) -> Graph:
        t0 = self.timer()
        graph = arch_graph(spec, C, fc_dim, self.num_classes)
        self.export_seconds += self.timer() - t0
        self.exports += 1
        return graph

    def _build(self, spec: ArchSpec, C: int, fc_dim: int) -> Network:
        t0 = self.timer()
        net = build_net(spec, C, fc_dim, self.num_classes, device=self.device)
        self.build_seconds += self.timer() - t0
        return net

    def stats(self) -> dict[str, float]:
        """Counters and times; ``overhead`` = (export + refresh) / training time."""
        return {"entries": len(self.entries), "draws": self.draws, "exports": self.exports,
                "export_seconds": self.export_seconds, "refresh_seconds": self.refresh_seconds,
                "build_seconds": self.build_seconds, "training_seconds": self.training_seconds,
                "overhead": self.generation_seconds / self.training_seconds if self.training_seconds else float("inf")}

    def state(self) -> dict[str, Any]:
        return {"stream": self.stream.state(), "start": self.start, "entries": len(self.entries),
                "draws": self.draws, "budget_fraction": self.budget_fraction,
                "training_seconds": self.training_seconds, "export_seconds": self.export_seconds,
                "refresh_seconds": self.refresh_seconds, "num_classes": self.num_classes,
                "add_every": self.add_every}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device | str | None = None,
                   timer: Callable[[], float] = time.perf_counter) -> "ArchPool":
        stream = TrainingStream.from_state(state["stream"])
        pool = cls(stream, state["budget_fraction"], state.get("num_classes", 10), device, timer,
                   state.get("add_every"))
        pool.start = state["start"]
        if stream.counter != pool.start + state["entries"]:
            raise ValueError(f"Expected stream counter {pool.start + state['entries']} = start + entries "
                             f"(got {stream.counter})")
        pool.entries = [_Entry(*stream.draw(i), graph=None) for i in range(pool.start, stream.counter)]
        pool.draws = state["draws"]
        pool.training_seconds = state["training_seconds"]
        pool.export_seconds = state["export_seconds"]
        pool.refresh_seconds = state["refresh_seconds"]
        return pool
