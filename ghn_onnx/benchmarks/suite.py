"""Benchmarks of parameter prediction: every fast path against the sequential reference, one run.

    ghn-onnx bench [--device cpu|cuda] [--repeats 15] [--sizes 1,8,64,512] [--json F] [--markdown F]

Sections (:data:`SECTIONS`), timed on one device; within a section the fast path and the
reference run in turn, round after round (so background load hits both), after one warm-up
call each, and the figure is the median:

* ``latency``: ResNet-50, CIFAR variant (3x3 stem, no max-pool, 10 classes, TorchScript export
  with BN kept; or any ONNX file): GHN forward with the graph batch prebuilt, file to file
  (:func:`~ghn_onnx.pipeline.predict_files`), and the physical bound of the forward: bytes of
  predicted fp32 parameters / the device's copy bandwidth
  (:func:`~ghn_onnx.benchmarks.timing.copy_bandwidth`: median of a 256 MB copy, read + write
  counted, as ``ghn_onnx.benchmarks.kernels`` does). On CUDA also node states + the Triton flat decode.
* ``throughput``: GHN forward over batches of ``sizes`` generated networks
  (:class:`GeneratedNets`), batch prebuilt: networks and predicted parameters per second.
* ``train``: one :meth:`~ghn_onnx.training.trainer.Trainer.train_step` (meta-batch 8, fixed
  networks, random images), and the GHN's forward + backward alone on the same graphs.
* ``kernels`` (CUDA only): :func:`ghn_onnx.benchmarks.kernels.bench_kernels`.

The reference is ``GHN.forward(..., sequential=True)``: GHN-2's loop over node indices and its
decoding (whole 64x64 blocks, tile, then normalise). In training there is no inference switch,
so the reference step is the same step with ``GatedGNN.forward_sequential`` in place of the level
sweep, under autograd (:func:`sequential_message_passing`). The reference can take minutes on big
batches: it is skipped for a batch size when one call is estimated (linearly from the previous
size) to exceed ``reference_cap_s``; when its warm-up call alone exceeds the cap, that one call is
its figure. GHN weights are random (speed does not depend on them).

This module never imports click; ``ghn-onnx bench`` (:mod:`ghn_onnx.cli`) parses options and
calls :func:`run_benchmarks`; :mod:`ghn_onnx.benchmarks.timing` times, :mod:`ghn_onnx.benchmarks.report`
formats the results.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import onnx
import torch

from ghn_onnx.benchmarks.timing import compare, copy_bandwidth, synchronizer
from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.ghn import GHN, GHNConfig, triton_support
from ghn_onnx.graph.graph import Graph

SECTIONS = ("latency", "throughput", "train", "kernels")
#: Seed namespace of the widths re-sampled for repeated architectures (see :class:`GeneratedNets`).
BENCH_NAMESPACE = 0xBE7C


class BenchError(GhnOnnxError):
    """A benchmark cannot run as configured (missing optional dependency, no CUDA device)."""


@dataclass(frozen=True)
class BenchConfig:
    """Attributes mirror ``ghn-onnx bench`` options."""

    device: str = "cpu"
    repeats: int = 15  # rounds of the latency forward; file to file: repeats // 3; the rest: repeats // 5
    sizes: tuple[int, ...] = (1, 8, 64, 512)
    distinct: int = 64  # exported architectures; bigger batches re-use them at re-sampled widths
    reference_cap_s: float = 60.0
    meta_batch: int = 8
    train_batch_size: int = 64
    sections: tuple[str, ...] = SECTIONS
    latency_model: str | None = None  # an ONNX file; None: the CIFAR ResNet-50
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None: torch's default

    def rounds(self, section: str) -> int:
        divisor = {"latency": 1, "file_to_file": 3, "throughput": 5, "train": 5, "kernels": 1}[section]
        return max(1, self.repeats // divisor)


# -- inputs ---------------------------------------------------------------------------------------

def predicted_numel(graphs: list[Graph]) -> int:
    """Parameters the GHN predicts for ``graphs`` (what a forward call writes)."""
    return sum(p.numel for g in graphs for n in g.nodes for p in n.params)


def export_cifar_resnet50(path: Path) -> Path:
    """torchvision ResNet-50 with a 3x3 stride-1 stem, no max-pool, 10 classes, exported like the
    generated networks (TorchScript, opset 17, BN kept)."""
    try:
        import torchvision
    except ImportError:
        raise BenchError("the ResNet-50 case needs torchvision (pip install 'ghn-onnx[dev]'), "
                         "or time another model with --model FILE.onnx") from None
    from ghn_onnx.training.generator import export_onnx

    torch.manual_seed(0)
    net = torchvision.models.resnet50(num_classes=10)
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    onnx.save(export_onnx(net), str(path))
    return path


class NetDraw(NamedTuple):
    spec: object  # ArchSpec
    C: int
    fc_dim: int
    graph: Graph


class GeneratedNets:
    """Generated training networks, made once per run and handed out as prefixes.

    Net ``i`` is architecture ``i mod distinct``. For ``i < distinct`` it is draw ``i`` of
    ``TrainingStream(seed)``, exported through ONNX (:func:`arch_graph`, 0.3-1.5 s each); after
    that, the same architecture at a width re-sampled with ``sample_width`` (generator
    ``[BENCH_NAMESPACE, seed, i]``), its graph re-shaped by :func:`refresh_shapes` (milliseconds),
    as :class:`~ghn_onnx.training.generator.ArchPool` re-uses architectures in training. The first
    ``distinct`` nets are distinct architectures; 512 nets with ``distinct=64`` are 64
    architectures, each 8 times at its drawn widths (narrow-only architectures repeat as copies).
    """

    def __init__(self, seed: int = 0, distinct: int = 64, log: Callable[[str], None] = lambda m: None) -> None:
        from ghn_onnx.training.generator import TrainingStream

        self.stream, self.seed, self.distinct, self.log = TrainingStream(seed), seed, distinct, log
        self.nets: list[NetDraw] = []
        self.seconds = 0.0

    def take(self, n: int) -> list[NetDraw]:
        from ghn_onnx.training.generator import arch_graph, build_net, refresh_shapes
        from ghn_onnx.training.sampling import sample_width

        t0 = time.perf_counter()
        if n > len(self.nets):
            exports = max(0, min(n, self.distinct) - len(self.nets))
            self.log(f"generating networks {len(self.nets)}..{n - 1} ({exports} ONNX exports)")
        while len(self.nets) < n:
            i = len(self.nets)
            if i < self.distinct:
                spec, C, fc = self.stream.draw(i)
                self.nets.append(NetDraw(spec, C, fc, arch_graph(spec, C, fc)))
            else:
                base = self.nets[i % self.distinct]
                C, fc = sample_width(np.random.default_rng([BENCH_NAMESPACE, self.seed, i]), base.spec)
                graph = refresh_shapes(base.graph, build_net(base.spec, C, fc))
                self.nets.append(NetDraw(base.spec, C, fc, graph))
        self.seconds += time.perf_counter() - t0
        return self.nets[:n]


def random_ghn(device: torch.device, seed: int = 0) -> GHN:
    torch.manual_seed(seed)
    return GHN(GHNConfig()).to(device).eval()


# -- sections -------------------------------------------------------------------------------------

def bench_latency(cfg: BenchConfig, device: torch.device, log: Callable[[str], None]) -> dict:
    """One model: GHN forward (batch prebuilt), file to file, and the write bound of the forward."""
    from ghn_onnx.onnx_io.loading import load_model
    from ghn_onnx.pipeline import predict_files, prepare

    sync, ghn = synchronizer(device), random_ghn(device, cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if cfg.latency_model is None:
            log("exporting the CIFAR ResNet-50")
            path, name = export_cifar_resnet50(tmp / "resnet50.onnx"), "resnet50"
        else:
            path = Path(cfg.latency_model)
            name = path.stem
        _, graph = prepare(load_model(path), path.name)
        batch = ghn.batch([graph])
        log(f"latency: {name}, GHN forward")
        with torch.no_grad():
            params = sum(v.numel() for d in ghn(batch) for v in d.values())
            variants = {}
            if triton_support.available(device, ghn.config.hid):
                variants["flat_decode"] = lambda: ghn.decode_flat(ghn.node_states(batch), batch, "triton")
            forward = compare(lambda: ghn(batch), lambda: ghn(batch, sequential=True), cfg.rounds("latency"), sync,
                              variants=variants)
        log(f"latency: {name}, file to file")
        out = tmp / f"out_{path.name}"
        f2f = compare(lambda: predict_files([path], [out], ghn), lambda: predict_files([path], [out], ghn, reference=True),
                      cfg.rounds("file_to_file"), sync)
    bandwidth = copy_bandwidth(device)
    return {"model": name, "nodes": len(graph), "edges_with_virtual": len(batch.edges),
            "levels": [len(batch.forward), len(batch.backward)], "params": params,
            "ghn_forward": forward, "file_to_file": f2f,
            "copy_bandwidth_GBps": bandwidth / 1e9, "bound_s": 4 * params / bandwidth}


def bench_throughput(cfg: BenchConfig, device: torch.device, nets: GeneratedNets, log: Callable[[str], None]) -> dict:
    """GHN forward over batches of generated networks; the reference is capped by estimated time."""
    sync, ghn = synchronizer(device), random_ghn(device, cfg.seed)
    sizes: dict[str, dict] = {}
    last: tuple[int, float] | None = None  # (size, reference seconds) of the last size it ran at
    for n in sorted(cfg.sizes):
        estimate = None if last is None else last[1] * n / last[0]
        sizes[str(n)] = r = _throughput_at(ghn, nets.take(n), cfg, sync, estimate, log)
        if r["reference_s"] is not None:
            last = (n, r["reference_s"])
    return {"distinct": nets.distinct, "generation_s": nets.seconds, "sizes": sizes}


def _throughput_at(ghn: GHN, draws: list[NetDraw], cfg: BenchConfig, sync: Callable[[], None],
                   estimate: float | None, log: Callable[[str], None]) -> dict:
    graphs = [d.graph for d in draws]
    t0 = time.perf_counter()
    batch = ghn.batch(graphs)
    build_s = time.perf_counter() - t0
    log(f"throughput: {len(graphs)} networks ({batch.n_nodes} nodes, {len(batch.edges)} edges)"
        + (f", reference estimated {estimate:.1f} s" if estimate is not None else ""))
    with torch.no_grad():
        r = compare(lambda: ghn(batch), lambda: ghn(batch, sequential=True), cfg.rounds("throughput"), sync,
                    cfg.reference_cap_s, estimate)
    return {"networks": len(graphs), "architectures": len({d.spec.key for d in draws}), "nodes": batch.n_nodes,
            "edges_with_virtual": len(batch.edges), "params": predicted_numel(graphs), "batch_build_s": build_s, **r}


class _FixedNets:
    """A ``NetSource`` serving the same networks in turn: nothing is exported inside a timed step."""

    class Sample(NamedTuple):
        graph: Graph
        net: torch.nn.Module

    def __init__(self, samples: list[_FixedNets.Sample]) -> None:
        self.samples, self.draws = samples, 0

    def draw(self) -> _FixedNets.Sample:
        self.draws += 1
        return self.samples[(self.draws - 1) % len(self.samples)]

    def state(self) -> dict:
        return {"draws": self.draws}

    def add_training_time(self, seconds: float) -> None:
        pass


@contextlib.contextmanager
def sequential_message_passing(ghn: GHN):
    """Within the block, ``ghn``'s message passing is the reference loop
    (``GatedGNN.forward_sequential``) wherever the level sweep would run, autograd included;
    nothing changes outside it. Under autocast the loop runs in fp32 (its ``index_add`` needs
    one dtype); on CPU training has no autocast, so the step is otherwise identical."""
    gnn = ghn.gnn

    def forward(h: torch.Tensor, batch) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            return gnn.forward_sequential(h.float(), batch)

    gnn.forward = forward
    try:
        yield
    finally:
        del gnn.forward


def bench_train(cfg: BenchConfig, device: torch.device, nets: GeneratedNets, log: Callable[[str], None]) -> dict:
    """``Trainer.train_step`` and the GHN's forward + backward alone, fast vs reference message passing."""
    from ghn_onnx.training.datasets import ImageSet
    from ghn_onnx.training.generator import build_net
    from ghn_onnx.training.trainer import TrainConfig, Trainer, init_ghn

    draws = nets.take(cfg.meta_batch)
    samples = [_FixedNets.Sample(d.graph, build_net(d.spec, d.C, d.fc_dim, device=device)) for d in draws]
    rng = np.random.default_rng(cfg.seed)
    images = ImageSet(rng.integers(0, 256, (4 * cfg.train_batch_size, 32, 32, 3), dtype=np.uint8),
                      rng.integers(0, 10, 4 * cfg.train_batch_size).astype(np.int64))
    tcfg = TrainConfig(meta_batch=cfg.meta_batch, batch_size=cfg.train_batch_size, seed=cfg.seed)
    ghn = init_ghn(seed=cfg.seed)
    sync, graphs = synchronizer(device), [s.graph for s in samples]
    amp = device.type == "cuda" and tcfg.amp
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(ghn, tcfg, images, _FixedNets(samples), tmp, device=device)

        def reference_step():
            with sequential_message_passing(ghn):
                trainer.train_step()

        def forward_backward():
            ghn.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                preds = ghn(graphs)  # the batch is built inside, as in a training step
                loss = sum(v.float().square().mean() for p in preds for v in p.values())
            loss.backward()

        def reference_forward_backward():
            with sequential_message_passing(ghn):
                forward_backward()

        log(f"train: step with meta-batch {cfg.meta_batch}, batch {cfg.train_batch_size}")
        step = compare(trainer.train_step, reference_step, cfg.rounds("train"), sync)
        log("train: GHN forward + backward")
        fwd_bwd = compare(forward_backward, reference_forward_backward, cfg.rounds("train"), sync)
    return {"meta_batch": cfg.meta_batch, "batch_size": cfg.train_batch_size, "amp": amp,
            "nodes": sum(len(g) for g in graphs), "params": predicted_numel(graphs),
            "train_step": step, "ghn_forward_backward": fwd_bwd}


def bench_kernel_section(cfg: BenchConfig, device: torch.device, nets: GeneratedNets, log: Callable[[str], None]) -> dict:
    """``bench_kernels`` on the 8 DeepNets fixtures when the shared data is there, else 8 generated nets."""
    from ghn_onnx.benchmarks.kernels import bench_kernels, parity_dir

    graphs = None if parity_dir().is_dir() else [d.graph for d in nets.take(8)]
    log("kernels: " + ("DeepNets fixtures" if graphs is None else "8 generated networks"))
    return {"graphs_from": "deepnets fixtures" if graphs is None else "generated",
            **bench_kernels(device, graphs=graphs, repeats=cfg.rounds("kernels"))}


def run_benchmarks(cfg: BenchConfig, command: str = "", log: Callable[[str], None] = lambda m: None) -> dict:
    """Run the sections of ``cfg`` and return a JSON-friendly dict: environment, each section's
    figures, and ``errors`` (a failed section is recorded and the others still run).

    Raises:
        BenchError: an unknown section or size, CUDA asked for and not available, or torchvision
            missing for the ResNet-50; GhnOnnxError: the ``latency_model`` cannot be read.
    """
    unknown = sorted(set(cfg.sections) - set(SECTIONS))
    if unknown:
        raise BenchError(f"Expected sections from {', '.join(SECTIONS)} (got {', '.join(unknown)})")
    if not cfg.sizes or min(cfg.sizes) < 1:
        raise BenchError(f"Expected batch sizes >= 1 (got {list(cfg.sizes)})")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("no CUDA device is available")
    if cfg.threads is not None and cfg.threads < 1:
        raise BenchError(f"Expected threads >= 1 (got {cfg.threads})")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)
    try:
        return _run(cfg, device, command, log)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: BenchConfig, device: torch.device, command: str, log: Callable[[str], None]) -> dict:
    from ghn_onnx.benchmarks.report import environment

    rounds = {k: cfg.rounds(k) for k in ("latency", "file_to_file", "throughput", "train")}
    results: dict = {**environment(device), "command": command, "config": asdict(cfg), "rounds": rounds,
                     "errors": {}}
    nets = GeneratedNets(cfg.seed, cfg.distinct, log)
    runners = {"latency": lambda: bench_latency(cfg, device, log),
               "throughput": lambda: bench_throughput(cfg, device, nets, log),
               "train": lambda: bench_train(cfg, device, nets, log),
               "kernels": lambda: bench_kernel_section(cfg, device, nets, log)}
    for section in SECTIONS:
        if section not in cfg.sections:
            continue
        if section == "kernels" and not triton_support.available(device):
            results["kernels"] = {"skipped": "Triton kernels need a CUDA device and Triton"}
            continue
        t0 = time.perf_counter()
        try:
            results[section] = runners[section]()
        except GhnOnnxError:  # the user's input or setup (--model unreadable, torchvision missing)
            raise
        except Exception as exc:  # noqa: BLE001 - keep the other sections' figures (a GPU run is precious)
            log(traceback.format_exc())
            results["errors"][section] = f"{type(exc).__name__}: {exc}"
        log(f"{section}: {time.perf_counter() - t0:.0f} s")
    results["generation_s"] = nets.seconds
    results["peak_rss_GB"] = peak_rss_gb()
    return results


def peak_rss_gb() -> float | None:
    """Peak resident memory of this process so far (Linux reports KiB), or None where unknown."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
