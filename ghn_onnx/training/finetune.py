"""``ghn-onnx eval --finetune-bench``: how well networks fine-tune from each initialisation.

For every benchmark network (held-out generated ID architectures, torchvision models adjusted
for 32x32) and every optimiser recipe, each initialisation of :data:`INITS` is trained on
CIFAR-10 (the 45k training part of :func:`train_val_split`, batch 64, RandomCrop + flip):

1. **learning rate, on validation**: from the initialised network, one run per learning rate of
   the recipe's grid for ``select_steps`` steps (its own cosine schedule to ``select_steps``); the
   learning rate with the highest accuracy on ``val_images`` random images of the fixed 5,000-image
   validation split wins (ties: the first in the grid). Test images play no part in the choice.
2. **the curve, on test**: one run at the chosen learning rate, cosine to the largest of
   ``steps``, accuracy on ``test_images`` random CIFAR-10 test images at 0 and at each of ``steps``
   (the protocol of :func:`~ghn_onnx.training.evaluation.sgd_curve`: one schedule, measured on the
   way). Accuracy has BN on the statistics of each test batch of 64, as everywhere in ``eval``.

Every initialisation of one network starts from the same seeded PyTorch default initialisation
(what GHN predictions leave untouched stays at it) and sees the same mini-batches. The GHN
initialisations go through the product's post-processing: generated nets by
:func:`~ghn_onnx.writeback.for_training.for_training` on the graph's predictions, torchvision
models through :func:`~ghn_onnx.pipeline.predict_models` with ``for_training=`` (ONNX export →
predict → parameters read back).

``targets`` in the result compares ``ghn-ft`` (the shipped :class:`ForTraining` defaults) with
the better of ``default`` and ``lsuv`` per network: the share of networks where it is at least as
good, and the mean gap in points, at every step count (issue 14's targets: ≥ 80% at 100 and 300
steps, mean gap ≥ -1 point at 1,000).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.ghn.model import GHN
from ghn_onnx.training.datasets import ImageSet, normalize, train_val_split
from ghn_onnx.training import evaluation
from ghn_onnx.training.evaluation import mean_and_sem, random_subset
from ghn_onnx.writeback.for_training import ForTraining, for_training

Log = Callable[[str], None]


class FinetuneConfigError(GhnOnnxError):
    """A fine-tuning benchmark setting is unknown or out of range."""


# -- optimiser recipes ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """An optimiser and its schedule: ``make(parameters, lr)`` builds the optimiser; the learning
    rate follows a cosine from ``lr`` to 0 over the run's last step; gradients are clipped to norm 5."""

    name: str
    describe: str
    make: Callable[[object, float], torch.optim.Optimizer]
    lr_grid: tuple[float, ...]


RECIPES: dict[str, Recipe] = {
    "sgd": Recipe("sgd", "SGD momentum 0.9, weight decay 3e-4, cosine to the last step, gradient clip 5 (GHN-2's)",
                  lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=3e-4),
                  (0.05, 0.025, 0.01, 0.005)),
    "adamw": Recipe("adamw", "AdamW betas (0.9, 0.999), weight decay 0.01, cosine to the last step, no warm-up, "
                             "gradient clip 5",
                    lambda p, lr: torch.optim.AdamW(p, lr=lr, betas=(0.9, 0.999), weight_decay=0.01),
                    (3e-3, 1e-3, 3e-4, 1e-4)),
}


def train_curve(net: nn.Module, train: ImageSet, test: ImageSet, marks: list[int], recipe: Recipe, lr: float, *,
                batch_size: int = 64, seed: int = 0, device: str | torch.device = "cpu") -> dict[int, float]:
    """Train ``net`` in place with ``recipe`` at ``lr`` for ``max(marks)`` steps (one cosine
    schedule); accuracy on ``test`` at each step count in ``marks`` (0 = before training). With
    ``RECIPES["sgd"]`` this is :func:`~ghn_onnx.training.evaluation.sgd_curve` step for step
    (tested)."""
    return evaluation.train_curve(net, train, test, marks, lambda p: recipe.make(p, lr), batch_size=batch_size,
                                  seed=seed, device=device)


def choose_lr(net: nn.Module, train: ImageSet, val: ImageSet, recipe: Recipe, grid: tuple[float, ...], steps: int,
              *, batch_size: int = 64, seed: int = 0, device: str | torch.device = "cpu"
              ) -> tuple[float, dict[float, float]]:
    """The learning rate of ``grid`` whose ``steps``-step run from ``net`` (a copy per rate; ``net``
    is not changed) scores best on ``val``; ties go to the first. Returns it and every score."""
    scores = {lr: train_curve(copy.deepcopy(net), train, val, [steps], recipe, lr, batch_size=batch_size,
                              seed=seed, device=device)[steps] for lr in grid}
    return max(grid, key=lambda lr: (scores[lr], -grid.index(lr))), scores


# -- initialisations ------------------------------------------------------------------------------

@dataclass
class InitData:
    """What an initialisation may use: a batch of normalised training images ``(B, 3, 32, 32)``
    for data-dependent ones, the GHN's prediction for the network (``predict(None)``: as
    predicted; ``predict(ForTraining(...))``: post-processed), the seed and the device."""

    batch: torch.Tensor
    predict: Callable[[ForTraining | None], dict[str, torch.Tensor]]
    seed: int = 0
    device: str = "cpu"


InitFn = Callable[[nn.Module, InitData], None]
#: name -> factory(options) -> function(net, data) that initialises ``net`` in place.
INITS: dict[str, Callable[[dict[str, float]], InitFn]] = {}
#: Inits that never read the GHN: their results do not depend on the checkpoint.
GHN_FREE_INITS = frozenset({"default", "lsuv"})


def register_init(name: str):
    def add(factory: Callable[[dict[str, float]], InitFn]) -> Callable[[dict[str, float]], InitFn]:
        INITS[name] = factory
        return factory
    return add


def _no_options(name: str, options: dict[str, float]) -> None:
    if options:
        raise FinetuneConfigError(f"init {name!r} takes no options (got {', '.join(options)})")


@register_init("default")
def _default_init(options: dict[str, float]) -> InitFn:
    """PyTorch's (torchvision's) default initialisation: the network as built, seeded."""
    _no_options("default", options)
    return lambda net, data: None


@register_init("lsuv")
def _lsuv_init(options: dict[str, float]) -> InitFn:
    """LSUV (Mishkin & Matas 2016) with the ``lsuv`` package of its first author: orthonormal
    conv / linear weights, then layer by layer each weight rescaled until its output has unit
    variance on one batch of training images (tolerance 0.1, at most 10 rescalings)."""
    _no_options("lsuv", options)

    def init(net: nn.Module, data: InitData) -> None:
        try:
            from lsuv import lsuv_with_singlebatch
        except ImportError:
            raise FinetuneConfigError("the lsuv init needs the lsuv package: pip install 'ghn-onnx[finetune]'") from None
        torch.manual_seed(data.seed)  # its orthonormal init draws from the global generator
        lsuv_with_singlebatch(net, data.batch, verbose=False, device=torch.device(data.device))
    return init


@register_init("ghn")
def _ghn_init(options: dict[str, float]) -> InitFn:
    """The GHN's prediction as it is (``ghn-onnx predict``)."""
    _no_options("ghn", options)
    return lambda net, data: load_parameters(net, data.predict(None))


# ghn-ft option → (ForTraining field, how its number is read)
_FT_KEYS = {"noise": ("noise", float), "ortho": ("orthogonal_from", lambda v: None if v < 0 else float(v)),
            "seed": ("seed", int), "normalised": ("normalised_only", bool), "rescale": ("rescale", bool)}


@register_init("ghn-ft")
def _ghn_ft_init(options: dict[str, float]) -> InitFn:
    """The GHN's prediction post-processed for fine-tuning (``predict --for-training``):
    :class:`ForTraining` defaults, or ``ghn-ft:noise=0.1,ortho=0.5,seed=1,rescale=1,normalised=0``
    (``ortho=-1``: no orthogonalisation)."""
    post = ft_options(options)
    return lambda net, data: load_parameters(net, data.predict(post))


def ft_options(options: dict[str, float]) -> ForTraining:
    """The :class:`ForTraining` a ``ghn-ft`` spec's options give."""
    unknown = set(options) - set(_FT_KEYS)
    if unknown:
        raise FinetuneConfigError(f"init 'ghn-ft': expected options from {', '.join(_FT_KEYS)} "
                                  f"(got {', '.join(sorted(unknown))})")
    try:
        return ForTraining(**{_FT_KEYS[k][0]: _FT_KEYS[k][1](v) for k, v in options.items()})
    except GhnOnnxError as exc:
        raise FinetuneConfigError(f"init 'ghn-ft': {exc}") from None


def parse_spec(spec: str) -> tuple[str, dict[str, float]]:
    """``name:key=value,...`` -> ``(name, {key: value})``.

    Raises:
        FinetuneConfigError: an unknown name or an option that is not ``key=number``.
    """
    name, _, rest = spec.partition(":")
    if name not in INITS:
        raise FinetuneConfigError(f"expected inits from {', '.join(INITS)} (got {name!r})")
    options: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        try:
            options[key.strip()] = float(value)
        except ValueError:
            eq = ""
        if not eq:
            raise FinetuneConfigError(f"init {spec!r}: expected key=number options (got {item!r})")
    return name, options


def parse_init(spec: str) -> InitFn:
    """``name`` or ``name:key=value,...`` (see :data:`INITS`) -> the init function.

    Raises:
        FinetuneConfigError: an unknown name, option or value.
    """
    name, options = parse_spec(spec)
    return INITS[name](options)


@torch.no_grad()
def load_parameters(net: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Copy ``params`` into ``net``'s parameters of the same names.

    Raises:
        FinetuneConfigError: a name ``net`` does not have, or another shape (a prediction for
            another network).
    """
    own = dict(net.named_parameters())
    for k, v in params.items():
        if k not in own or own[k].shape != v.shape:
            raise FinetuneConfigError(f"predicted {k!r} {tuple(v.shape)} does not fit the network")
        own[k].copy_(v)


# -- benchmark networks ---------------------------------------------------------------------------

@dataclass
class BenchNet:
    """A benchmark network: ``build()`` gives it at its seeded default init, ``predict`` as in
    :class:`InitData`."""

    name: str
    build: Callable[[], nn.Module]
    predict: Callable[[ForTraining | None], dict[str, torch.Tensor]]


def generated_net(ghn: GHN, index: int, seed: int, device: str = "cpu") -> BenchNet:
    """Held-out ID architecture ``index`` at the evaluation width; predictions post-processed by
    :func:`for_training` on its graph."""
    from ghn_onnx.pipeline import predict_graphs
    from ghn_onnx.training.generator import arch_graph, eval_specs, eval_width
    from ghn_onnx.training.network import build_net

    C, fc_dim = eval_width("test")
    spec = eval_specs("test", index + 1)[index]
    graph = arch_graph(spec, C, fc_dim)
    raw = predict_graphs(ghn, [graph])[0]

    def build() -> nn.Module:
        torch.manual_seed(seed)
        return build_net(spec, C, fc_dim, device=device)

    def predict(post: ForTraining | None) -> dict[str, torch.Tensor]:
        values = raw if post is None else for_training(graph, raw, post)[0]
        return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in values.items()}

    return BenchNet(f"test/{index}", build, predict)


def torchvision_net(ghn: GHN, name: str, seed: int) -> BenchNet:
    """A 32x32 torchvision model (:mod:`.cifar_models`) predicted through the product pipeline."""
    from ghn_onnx.pipeline import predict_models
    from ghn_onnx.training.cifar_models import cifar_model, export_model, parameters_from_onnx

    exported = export_model(cifar_model(name, seed=seed))

    def predict(post: ForTraining | None) -> dict[str, torch.Tensor]:
        model = predict_models([exported], ghn, [name], for_training=post)[0].model
        return parameters_from_onnx(model, cifar_model(name, seed=seed))

    return BenchNet(name, lambda: cifar_model(name, seed=seed), predict)


# -- the benchmark --------------------------------------------------------------------------------

@dataclass(frozen=True)
class FinetuneConfig:
    """What :func:`finetune_benchmark` runs. The defaults are the issue's full benchmark (a GPU's
    work: 11 networks x 4 inits x 2 optimisers x (4 x 100 + 1,000) steps)."""

    generated: int = 8                  # N held-out ID architectures ...
    generated_from: int = 0             # ... from this index (a long benchmark split into runs)
    torchvision: tuple[str, ...] = ("resnet18", "mobilenet_v2", "efficientnet_b0")
    inits: tuple[str, ...] = ("default", "lsuv", "ghn", "ghn-ft")
    optimizers: tuple[str, ...] = ("sgd", "adamw")
    steps: tuple[int, ...] = (100, 300, 1000)
    select_steps: int = 100             # budget of each learning-rate trial (validation)
    lr_grid: dict[str, tuple[float, ...]] = field(default_factory=dict)  # per optimiser; default RECIPES'
    val_images: int = 1000              # of the 5,000-image validation split, random
    test_images: int = 2000             # CIFAR-10 test, random
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        from ghn_onnx.training.cifar_models import TORCHVISION_MODELS
        from ghn_onnx.training.generator import EVAL_SIZES

        def check(ok: bool, what: str) -> None:
            if not ok:
                raise FinetuneConfigError(what)

        check(0 <= self.generated and 0 <= self.generated_from
              and self.generated_from + self.generated <= EVAL_SIZES["test"],
              f"generated: expected held-out nets within 0..{EVAL_SIZES['test'] - 1} "
              f"(got {self.generated} from index {self.generated_from})")
        for name in self.torchvision:
            check(name in TORCHVISION_MODELS,
                  f"expected torchvision models from {', '.join(TORCHVISION_MODELS)} (got {name!r})")
        check(len(self.inits) >= 1, "expected at least one init")
        for spec in self.inits:
            parse_init(spec)
        for name in (*self.optimizers, *self.lr_grid):
            check(name in RECIPES, f"expected optimizers from {', '.join(RECIPES)} (got {name!r})")
        check(len(self.optimizers) >= 1, "expected at least one optimizer")
        check(len(self.steps) >= 1 and all(s >= 1 for s in self.steps),
              f"steps: expected step counts >= 1 (got {self.steps})")
        check(self.select_steps >= 1, f"select_steps: expected >= 1 (got {self.select_steps})")
        check(all(g and all(lr > 0 and math.isfinite(lr) for lr in g) for g in self.lr_grid.values()),
              f"lr_grid: expected learning rates > 0 (got {self.lr_grid})")
        check(1 <= self.val_images <= 5000, f"val_images: expected 1..5000 (got {self.val_images})")
        check(self.test_images >= 1, f"test_images: expected >= 1 (got {self.test_images})")
        check(self.batch_size >= 2, f"batch_size: expected >= 2 (got {self.batch_size})")

    def grid(self, optimizer: str) -> tuple[float, ...]:
        return tuple(self.lr_grid.get(optimizer) or RECIPES[optimizer].lr_grid)


def bench_nets(ghn: GHN, cfg: FinetuneConfig) -> list[BenchNet]:
    indices = range(cfg.generated_from, cfg.generated_from + cfg.generated)
    return ([generated_net(ghn, i, cfg.seed, cfg.device) for i in indices]
            + [torchvision_net(ghn, name, cfg.seed) for name in cfg.torchvision])


def finetune_benchmark(ghn: GHN, splits: dict[str, ImageSet], cfg: FinetuneConfig = FinetuneConfig(), *,
                       log: Log = lambda _: None, nets: list[BenchNet] | None = None) -> dict:
    """Run the benchmark (module docstring); the JSON-able result. ``nets`` replaces the
    networks of ``cfg`` (tests)."""
    t_start = time.perf_counter()
    ghn.eval()
    train, val_split = train_val_split(splits["train"])
    val = random_subset(val_split, cfg.val_images, cfg.seed)
    test = random_subset(splits["test"], cfg.test_images, cfg.seed)
    batch = normalize(random_subset(train, cfg.batch_size, cfg.seed).images).to(cfg.device)
    marks = sorted({0, *cfg.steps})
    results = []
    nets = nets if nets is not None else bench_nets(ghn, cfg)
    if not nets:
        raise FinetuneConfigError("expected at least one network (generated or torchvision)")
    for bn in nets:
        base = bn.build()
        entry: dict = {"net": bn.name, "params": sum(p.numel() for p in base.parameters()), "runs": {}}
        data = InitData(batch, bn.predict, cfg.seed, cfg.device)
        for opt in cfg.optimizers:
            entry["runs"][opt] = {}
            for spec in cfg.inits:
                t0 = time.perf_counter()
                net = copy.deepcopy(base)
                parse_init(spec)(net, data)
                args = {"batch_size": cfg.batch_size, "seed": cfg.seed, "device": cfg.device}
                lr, scores = choose_lr(net, train, val, RECIPES[opt], cfg.grid(opt), cfg.select_steps, **args)
                curve = train_curve(net, train, test, marks, RECIPES[opt], lr, **args)
                entry["runs"][opt][spec] = {"lr": lr, "val": {str(k): v for k, v in scores.items()},
                                            "steps": marks, "acc": [curve[s] for s in marks],
                                            "seconds": time.perf_counter() - t0}
                log(f"finetune {bn.name} {opt} {spec}: lr {lr:g} (val {scores[lr]:.4f}); "
                    + ", ".join(f"{s}: {curve[s]:.4f}" for s in marks))
        results.append(entry)
    out = {"meta": {"config": asdict(cfg), "recipes": {k: RECIPES[k].describe for k in cfg.optimizers},
                    "lr_rule": (f"highest accuracy on {len(val)} random validation images after "
                                f"{cfg.select_steps} steps (own cosine), ties to the first of the grid"),
                    "train_images": len(train), "val_images": len(val), "test_images": len(test),
                    "test_source": "CIFAR-10 test, random subset in random order", "seed": cfg.seed,
                    "bn": "batch statistics of each test batch of 64", "threads": torch.get_num_threads(),
                    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
           "nets": results}
    post = {spec: asdict(ft_options(o)) for spec, (name, o) in ((s, parse_spec(s)) for s in cfg.inits)
            if name == "ghn-ft"}
    if post:  # what each ghn-ft spec meant when it ran: the ForTraining defaults change with versions
        out["meta"]["post_processing"] = post
    out["targets"] = targets(out)
    out["meta"]["seconds"] = time.perf_counter() - t_start
    return out


#: What ``eval --finetune-bench`` records of its checkpoint (``checkpoint_source``).
CHECKPOINT_FIELDS = frozenset({"checkpoint", "checkpoint_sha256", "images_seen", "trained_steps", "format", "source"})


def merge_results(results: list[dict]) -> dict:
    """One result from runs of the same benchmark split by network (``generated_from``) or by
    init: every (network, optimiser, init) cell from the one run that has it, networks and inits
    in the order they first appear, ``targets`` recomputed, ``seconds`` summed.

    Inits that do not read the GHN (:data:`GHN_FREE_INITS`: default, lsuv) do not depend on the
    checkpoint, so a run of them merges with runs of GHN inits from any checkpoint: a better
    checkpoint is re-measured without re-running its baselines. Runs of GHN inits must share the
    checkpoint (sha256), and a ``ghn-ft`` spec its resolved post-processing where recorded.

    Raises:
        FinetuneConfigError: runs that differ in anything but their networks and inits
            (optimisers, steps, grids, images, seed), runs of GHN inits from different checkpoints,
            or two runs of the same cell.
    """
    if not results:
        raise FinetuneConfigError("expected at least one benchmark result to merge")
    varying = {"generated", "generated_from", "torchvision", "inits"}
    # Not settings: how long and how many threads a run took, notes, what post-processing each
    # ghn-ft spec resolved to (compared per spec below), the checkpoint (compared where it matters).
    incidental = {"config", "date", "seconds", "threads", "note", "notes", "runs", "post_processing",
                  *CHECKPOINT_FIELDS}

    def setting(r: dict) -> dict:
        meta = {k: v for k, v in r["meta"].items() if k not in incidental}
        return {**meta, "config": {k: v for k, v in r["meta"]["config"].items() if k not in varying}}

    first = setting(results[0])
    for other in map(setting, results[1:]):
        if other != first:
            diff = sorted(k for k in {*first, *other} if first.get(k) != other.get(k))
            raise FinetuneConfigError(f"cannot merge benchmark runs that differ in {', '.join(diff)}")
    uses_ghn = [r for r in results if any(_init_name(s) not in GHN_FREE_INITS for s in r["meta"]["config"]["inits"])]
    for key in ("checkpoint_sha256", "trained_steps"):
        if len({str(r["meta"].get(key)) for r in uses_ghn}) > 1:
            raise FinetuneConfigError(f"cannot merge benchmark runs of GHN inits that differ in {key}")
    post: dict = {}
    for r in results:
        for spec, options in r["meta"].get("post_processing", {}).items():
            if post.setdefault(spec, options) != options:
                raise FinetuneConfigError(f"cannot merge benchmark runs whose {spec!r} is different post-processing")
    nets: dict[str, dict] = {}
    for r in results:
        for e in r["nets"]:
            entry = nets.setdefault(e["net"], {**{k: v for k, v in e.items() if k != "runs"}, "runs": {}})
            for opt, by_init in e["runs"].items():
                cells = entry["runs"].setdefault(opt, {})
                for spec, run in by_init.items():
                    if spec in cells:
                        raise FinetuneConfigError(f"cannot merge benchmark runs that share networks and inits "
                                                  f"({e['net']} {opt} {spec})")
                    cells[spec] = run
    source = (uses_ghn or results)[0]["meta"]
    meta = {**results[0]["meta"], **{k: source[k] for k in CHECKPOINT_FIELDS if k in source},
            "date": f"{results[0]['meta']['date']} to {results[-1]['meta']['date']}",
            "seconds": sum(r["meta"]["seconds"] for r in results), "runs": len(results),
            "checkpoint": sorted({str(r["meta"].get("checkpoint")) for r in results}),
            "notes": [r["meta"]["note"] for r in results if "note" in r["meta"]]}
    meta.pop("note", None)
    if post:
        meta["post_processing"] = post
    configs = [r["meta"]["config"] for r in results]
    generated = sorted({int(n.split("/")[1]) for n in nets if n.startswith("test/")})
    meta["config"] = {**meta["config"], "generated": len(generated),
                      "generated_from": generated[0] if generated else min(c["generated_from"] for c in configs),
                      "torchvision": list(dict.fromkeys(m for c in configs for m in c["torchvision"])),
                      "inits": list(dict.fromkeys(s for c in configs for s in c["inits"]))}
    out = {"meta": meta, "nets": list(nets.values())}
    out["targets"] = targets(out)
    return out


def select_inits(result: dict, inits: list[str]) -> dict:
    """``result`` with only the runs of ``inits`` (e.g. its checkpoint-free baselines, to merge
    with a re-measurement of the GHN inits from a newer checkpoint); ``targets`` recomputed.

    Raises:
        FinetuneConfigError: an init that ``result`` did not run.
    """
    missing = [s for s in inits if s not in result["meta"]["config"]["inits"]]
    if missing:
        raise FinetuneConfigError(f"the benchmark result has no runs of {', '.join(missing)}")
    meta = {**result["meta"], "config": {**result["meta"]["config"], "inits": list(inits)}}
    if "post_processing" in meta:
        meta["post_processing"] = {k: v for k, v in meta["post_processing"].items() if k in inits}
    nets = [{**e, "runs": {opt: {s: r for s, r in by_init.items() if s in inits} for opt, by_init in e["runs"].items()}}
            for e in result["nets"]]
    out = {"meta": meta, "nets": nets}
    out["targets"] = targets(out)
    return out


def _init_name(spec: str) -> str:
    return spec.partition(":")[0]


def targets(result: dict, candidate: str = "ghn-ft", baselines: tuple[str, ...] = ("default", "lsuv")) -> dict:
    """Per optimiser and step count: on how many networks ``candidate`` is at least as accurate as
    the best of ``baselines``, and the mean gap (candidate - best baseline, points) with its
    standard error. Empty where the inits were not all run."""
    out: dict = {}
    for opt in result["meta"]["config"]["optimizers"]:
        rows = [e["runs"][opt] for e in result["nets"]
                if candidate in e["runs"][opt] and all(b in e["runs"][opt] for b in baselines)]
        if not rows:
            continue
        per_step = {}
        for j, step in enumerate(rows[0][candidate]["steps"]):
            if step == 0:
                continue
            gaps = [100 * (r[candidate]["acc"][j] - max(r[b]["acc"][j] for b in baselines)) for r in rows]
            mean, sem = mean_and_sem(gaps)
            per_step[str(step)] = {"at_least_as_good": sum(g >= 0 for g in gaps), "nets": len(gaps),
                                   "mean_gap_points": mean, "sem": sem}
        out[opt] = per_step
    return out


def format_finetune(result: dict) -> str:
    """A markdown table per optimiser (accuracy at each step count, chosen learning rate), then the
    target lines."""
    lines = []
    for opt in result["meta"]["config"]["optimizers"]:
        inits = result["meta"]["config"]["inits"]
        cells = [r for e in result["nets"] for r in e["runs"].get(opt, {}).values()]
        steps = cells[0]["steps"] if cells else []
        lines += [f"{opt}: {result['meta']['recipes'][opt]}", "",
                  "| net | init | lr | " + " | ".join(f"{s} steps" for s in steps) + " |",
                  "|---|---|---|" + "---|" * len(steps)]
        for e in result["nets"]:
            for spec in (s for s in inits if s in e["runs"].get(opt, {})):
                r = e["runs"][opt][spec]
                lines.append(f"| {e['net']} | {spec} | {r['lr']:g} | "
                             + " | ".join(f"{100 * a:.1f}" for a in r["acc"]) + " |")
        for step, t in result["targets"].get(opt, {}).items():
            lines.append(f"{opt} {step} steps: ghn-ft >= best of default/lsuv on {t['at_least_as_good']}/{t['nets']} "
                         f"nets, mean gap {t['mean_gap_points']:+.1f} ± {t['sem']:.1f} points")
        lines.append("")
    lines.append(f"{result['meta']['seconds']:.0f} s")
    return "\n".join(lines)
