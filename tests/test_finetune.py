"""The fine-tuning benchmark (``eval --finetune-bench``): the learning rate is chosen on the
validation split only, LSUV gives unit-variance outputs, results are deterministic, the SGD
recipe is GHN-2's ``sgd_curve``, and the GHN inits go through ``for_training``."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from ghn_onnx.cli import main
from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.training.datasets import ImageSet, normalize
from ghn_onnx.training.evaluation import sgd_curve
from ghn_onnx.training.finetune import (INITS, RECIPES, BenchNet, FinetuneConfig, FinetuneConfigError, InitData,
                                        choose_lr, finetune_benchmark, format_finetune, generated_net, merge_results,
                                        load_parameters, parse_init, select_inits, targets, train_curve)
from ghn_onnx.writeback.for_training import ForTraining, for_training


def _images(n: int, seed: int) -> ImageSet:
    """Learnable synthetic CIFAR-like images: the class sets the mean colour."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    base = (labels[:, None] * 23 % 256).astype(np.float64)
    mean = base[:, None, None, :] * np.array([1.0, 0.5, 0.2])  # (n, 1, 1, 3)
    images = np.clip(rng.normal(mean, 40, size=(n, 32, 32, 3)), 0, 255)
    return ImageSet(images.astype(np.uint8), labels.astype(np.int64))


@pytest.fixture(scope="module")
def splits():
    return {"train": _images(5200, 0), "test": _images(128, 1)}  # train_val_split holds out 5,000


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def _tiny_bench() -> BenchNet:
    torch.manual_seed(1)
    predicted = {k: torch.randn_like(v) * 0.1 for k, v in _tiny().named_parameters()}
    return BenchNet("tiny", _tiny, lambda post: dict(predicted))


CFG = dict(generated=0, torchvision=(), inits=("default", "lsuv", "ghn"), optimizers=("sgd",), steps=(2, 3),
           select_steps=2, lr_grid={"sgd": (0.1, 0.01)}, val_images=64, test_images=64)


def test_sgd_recipe_is_ghn2_sgd_curve(splits):
    data = splits["train"].subset(np.arange(256))
    a, b = _tiny(), _tiny()
    ours = train_curve(a, data, splits["test"], [0, 2, 3], RECIPES["sgd"], 0.05, seed=3)
    ref = sgd_curve(b, data, splits["test"], [0, 2, 3], lr=0.05, seed=3)
    assert ours == ref
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_lr_is_chosen_on_validation_never_on_test(splits):
    bench = _tiny_bench()
    a = finetune_benchmark(_FakeGhn(), splits, FinetuneConfig(**CFG), nets=[bench])
    other_test = {"train": splits["train"], "test": _images(128, 7)}
    b = finetune_benchmark(_FakeGhn(), other_test, FinetuneConfig(**CFG), nets=[bench])
    for spec in CFG["inits"]:
        ra, rb = a["nets"][0]["runs"]["sgd"][spec], b["nets"][0]["runs"]["sgd"][spec]
        assert ra["val"] == rb["val"] and ra["lr"] == rb["lr"]  # another test set: same choice
        assert ra["lr"] == max(CFG["lr_grid"]["sgd"], key=lambda lr: ra["val"][str(lr)])


def test_choose_lr_scores_each_rate_on_the_given_set_and_leaves_the_net(splits):
    data, val = splits["train"].subset(np.arange(256)), splits["test"]
    net = _tiny()
    before = copy.deepcopy(net.state_dict())
    lr, scores = choose_lr(net, data, val, RECIPES["sgd"], (0.2, 0.001), 3)
    for rate in (0.2, 0.001):
        assert scores[rate] == train_curve(_tiny(), data, val, [3], RECIPES["sgd"], rate)[3]
    assert lr == max(scores, key=scores.get)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_benchmark_is_deterministic_and_reports_targets(splits):
    cfg = FinetuneConfig(**{**CFG, "inits": ("default", "lsuv", "ghn-ft")})
    a = finetune_benchmark(_FakeGhn(), splits, cfg, nets=[_tiny_bench()])
    b = finetune_benchmark(_FakeGhn(), splits, cfg, nets=[_tiny_bench()])
    strip = lambda r: [{s: {k: v for k, v in x.items() if k != "seconds"} for s, x in e["runs"]["sgd"].items()}
                       for e in r["nets"]]
    assert strip(a) == strip(b)
    assert set(a["targets"]["sgd"]) == {"2", "3"} and a["targets"]["sgd"]["3"]["nets"] == 1
    assert "| tiny | lsuv |" in format_finetune(a)


def test_split_runs_merge_into_one_result_and_refuse_other_settings():
    run = lambda acc: {"steps": [0, 100], "acc": [0.1, acc], "lr": 0.01}
    cfg = {"optimizers": ["sgd"], "inits": ["default", "lsuv", "ghn-ft"], "generated": 1, "torchvision": [], "seed": 0}

    def result(i, d, s, g, **meta):
        return {"meta": {"config": {**cfg, "generated_from": i}, "seed": 0, "date": f"d{i}", "seconds": 10.0, **meta},
                "nets": [{"net": f"test/{i}", "runs": {"sgd": {"default": run(d), "lsuv": run(s), "ghn-ft": run(g)}}}]}

    # the same checkpoint (sha256) at two paths, runs with notes: still one benchmark
    a = result(0, 0.30, 0.35, 0.36, checkpoint="/a.safetensors", checkpoint_sha256="s")
    b = result(1, 0.40, 0.20, 0.38, checkpoint="/b.safetensors", checkpoint_sha256="s", note="n")
    merged = merge_results([a, b])
    assert [e["net"] for e in merged["nets"]] == ["test/0", "test/1"]
    assert merged["meta"]["config"]["generated"] == 2 and merged["meta"]["seconds"] == 20.0
    assert merged["meta"]["notes"] == ["n"] and merged["meta"]["checkpoint"] == ["/a.safetensors", "/b.safetensors"]
    assert merged["targets"] == targets({"meta": {"config": cfg}, "nets": a["nets"] + b["nets"]})
    with pytest.raises(FinetuneConfigError, match="share networks"):
        merge_results([a, a])
    with pytest.raises(FinetuneConfigError, match="differ in checkpoint_sha256"):
        merge_results([result(0, 0.3, 0.3, 0.3, checkpoint_sha256="x"), result(1, 0.3, 0.3, 0.3, checkpoint_sha256="y")])


def test_runs_split_by_init_merge_and_baselines_need_no_checkpoint():
    """default / lsuv do not read the GHN: a run of them merges with a ghn-ft run from another
    checkpoint (the merged checkpoint is the GHN run's); two GHN runs from different checkpoints,
    one cell measured twice, or one ghn-ft spec meaning two post-processings do not merge."""
    run = lambda acc: {"steps": [0, 100], "acc": [0.1, acc], "lr": 0.01}

    def result(inits, accs, sha, **meta):
        cfg = {"optimizers": ["sgd"], "inits": inits, "generated": 2, "generated_from": 0, "torchvision": []}
        return {"meta": {"config": cfg, "date": "d", "seconds": 5.0, "checkpoint_sha256": sha, "trained_steps": sha,
                         **meta},
                "nets": [{"net": f"test/{i}", "params": 7, "runs": {"sgd": {s: run(a) for s, a in zip(inits, acc)}}}
                         for i, acc in enumerate(accs)]}

    base = result(["default", "lsuv"], [(0.30, 0.35), (0.40, 0.20)], "old")
    new = result(["ghn-ft"], [(0.36,), (0.38,)], "new", post_processing={"ghn-ft": {"rescale": True}})
    merged = merge_results([base, new])
    assert merged["meta"]["config"]["inits"] == ["default", "lsuv", "ghn-ft"]
    assert merged["meta"]["checkpoint_sha256"] == "new" and merged["meta"]["trained_steps"] == "new"
    assert merged["meta"]["post_processing"] == {"ghn-ft": {"rescale": True}}
    assert [sorted(e["runs"]["sgd"]) for e in merged["nets"]] == [["default", "ghn-ft", "lsuv"]] * 2
    t = merged["targets"]["sgd"]["100"]
    assert (t["at_least_as_good"], t["nets"]) == (1, 2)
    with pytest.raises(FinetuneConfigError, match="GHN inits that differ in checkpoint_sha256"):
        merge_results([result(["ghn"], [(0.3,), (0.3,)], "a"), new])
    # an older run of every init: its baselines merge with the new ghn-ft once its GHN runs are left out
    old = result(["default", "lsuv", "ghn-ft"], [(0.30, 0.35, 0.1), (0.40, 0.20, 0.1)], "old")
    with pytest.raises(FinetuneConfigError, match="GHN inits that differ"):
        merge_results([old, new])
    assert merge_results([select_inits(old, ["default", "lsuv"]), new])["nets"] == merged["nets"]
    with pytest.raises(FinetuneConfigError, match="no runs of ghn"):
        select_inits(old, ["ghn"])
    with pytest.raises(FinetuneConfigError, match="share networks and inits"):
        merge_results([base, base])
    with pytest.raises(FinetuneConfigError, match="different post-processing"):
        merge_results([new, result(["ghn"], [(0.3,), (0.3,)], "new", post_processing={"ghn-ft": {"rescale": False}})])


def test_the_benchmark_records_what_each_ghn_ft_spec_resolved_to(splits):
    cfg = FinetuneConfig(**{**CFG, "inits": ("ghn-ft", "ghn-ft:rescale=1,ortho=-1")})
    meta = finetune_benchmark(_FakeGhn(), splits, cfg, nets=[_tiny_bench()])["meta"]
    assert meta["post_processing"]["ghn-ft"] == dataclasses.asdict(ForTraining())
    assert meta["post_processing"]["ghn-ft:rescale=1,ortho=-1"] == dataclasses.asdict(
        ForTraining(rescale=True, orthogonal_from=None))


def test_targets_compare_with_the_better_baseline():
    run = lambda acc: {"steps": [0, 100], "acc": [0.1, acc], "lr": 0.01}
    nets = [{"net": str(i), "runs": {"sgd": {"default": run(d), "lsuv": run(s), "ghn-ft": run(g)}}}
            for i, (d, s, g) in enumerate([(0.30, 0.35, 0.36), (0.40, 0.20, 0.38)])]
    t = targets({"meta": {"config": {"optimizers": ["sgd"]}}, "nets": nets})["sgd"]["100"]
    assert t["at_least_as_good"] == 1 and t["nets"] == 2
    assert t["mean_gap_points"] == pytest.approx((1.0 - 2.0) / 2)


def test_lsuv_gives_unit_variance_outputs(splits):
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 32 * 32, 10))
    batch = normalize(splits["train"].images[:64])
    parse_init("lsuv")(net, InitData(batch, lambda post: {}))
    stds = []
    hooks = [m.register_forward_hook(lambda m, i, o: stds.append(float(o.std())))
             for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        net(batch)
    for h in hooks:
        h.remove()
    assert len(stds) == 3 and all(abs(s - 1.0) <= 0.1 for s in stds)


def test_ghn_ft_is_for_training_of_the_prediction():
    from ghn_onnx.pipeline import load_ghn

    bench = generated_net(load_ghn(), 0, seed=0)
    raw, post = bench.predict(None), bench.predict(ForTraining(noise=0.1))
    tiled = [k for k in raw if raw[k].ndim >= 2 and not torch.equal(raw[k], post[k])]
    assert tiled  # the C=32 net's 128-channel stage is tiled from the 64-channel block
    net = bench.build()
    parse_init("ghn-ft:noise=0.1")(net, InitData(torch.zeros(2, 3, 32, 32), bench.predict))
    own = dict(net.named_parameters())
    assert all(torch.equal(own[k], v) for k, v in post.items())
    assert bench.predict(ForTraining(noise=0.1))[tiled[0]].equal(post[tiled[0]])  # seeded


@pytest.mark.parametrize("spec", ["nope", "default:x=1", "ghn-ft:noise=abc", "ghn-ft:depth=1", "ghn-ft:noise=-1"])
def test_bad_init_specs_are_config_errors(spec):
    with pytest.raises(GhnOnnxError):  # FinetuneConfigError, or ForTraining's own for its values
        parse_init(spec)


@pytest.mark.parametrize("override", [dict(optimizers=("sgd", "lion")), dict(steps=(0,)), dict(generated=201),
                                      dict(generated=2, generated_from=199), dict(generated_from=-1),
                                      dict(torchvision=("vgg",)), dict(lr_grid={"sgd": (-1.0,)})])
def test_bad_configs_are_one_line_errors(override):
    with pytest.raises(FinetuneConfigError):
        FinetuneConfig(**{**CFG, **override})


def test_every_registered_init_runs(splits):
    batch = normalize(splits["train"].images[:16])
    bench = _tiny_bench()
    for name in INITS:
        net = _tiny()
        parse_init(name)(net, InitData(batch, bench.predict))
        assert torch.isfinite(net(batch)).all()


def test_load_parameters_refuses_another_networks_prediction():
    with pytest.raises(FinetuneConfigError):
        load_parameters(_tiny(), {"0.weight": torch.zeros(3, 3, 3, 3)})


def test_cli_bad_init_is_one_line_exit_2():
    result = CliRunner().invoke(main, ["eval", "--finetune-bench", "--bench-inits", "default,bogus"])
    assert result.exit_code == 2
    assert "bogus" in result.output and "Traceback" not in result.output


def test_plot_finetune_writes_a_png(splits, tmp_path):
    from ghn_onnx.training.eval_plot import plot_finetune

    result = finetune_benchmark(_FakeGhn(), splits, FinetuneConfig(**{**CFG, "inits": ("default",),
                                                                      "steps": (1,), "select_steps": 1}),
                                nets=[_tiny_bench()])
    path = plot_finetune(result, tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a merged result where an init ran on some nets only: drawn over those, listed for those
    other = {**result["nets"][0], "net": "other", "runs": {"sgd": {}}}
    partial = {**result, "nets": result["nets"] + [other]}
    assert plot_finetune(partial, tmp_path / "partial.png").stat().st_size > 0
    assert format_finetune(partial).count("| default |") == 1


class _FakeGhn:
    """Stands for the GHN where ``nets`` are given (the benchmark only calls ``eval`` on it)."""

    def eval(self):
        return self
