"""BN calibration, the batch-statistics rewrite and calibration data loading."""

from __future__ import annotations

import copy
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

from click.testing import CliRunner

from ghn_onnx.bn.batch_stats import statistics_model
from ghn_onnx.bn.calibration import (CALIBRATION_MODES, CIFAR10_MEAN, CIFAR10_STD, batch_stats_model, calibrate_bn,
                                     calibration_set,
                                     calibration_targets, data_input, input_spec, iter_batches, load_calibration_data)
from ghn_onnx.convert import convert
from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.graph.graph import Graph
from ghn_onnx.graph.primitives import Primitive
from ghn_onnx.onnx_io.storage import stored_tensors, untie_aliases
from ghn_onnx.writeback.write import resolve_shared, write_predictions
from writeback_models import TinyResNet, bn_model, export, randomise_bn, run

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def calibration_batches(seed: int = 0, sizes=(8, 8, 5), shape=(3, 16, 16)) -> list[np.ndarray]:
    """Off-centre data of uneven batch sizes, so merging batches and centring both matter."""
    rng = np.random.default_rng(seed)
    offset = np.arange(shape[0], dtype=np.float32).reshape(-1, *([1] * (len(shape) - 1)))
    return [(rng.standard_normal((n, *shape)) * 2 + offset + 1).astype(np.float32) for n in sizes]


def bn_inputs(module: nn.Module, batches: list[np.ndarray]) -> dict[nn.Module, torch.Tensor]:
    """Each BN's input over all batches as (C, N*H*W) float64, from forwards in ``module``'s mode."""
    seen: dict[nn.Module, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, inp: seen.setdefault(m, []).append(inp[0].double()))
             for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for b in batches:
            module(torch.from_numpy(b))
    for h in hooks:
        h.remove()
    return {m: torch.cat([s.transpose(0, 1).reshape(s.shape[1], -1) for s in v], dim=1) for m, v in seen.items()}


def set_population_statistics(module: nn.Module, inputs: dict[nn.Module, torch.Tensor]) -> None:
    for bn, x in inputs.items():
        bn.running_mean.copy_(x.mean(dim=1))
        bn.running_var.copy_(x.var(dim=1, unbiased=False))


def torch_calibrate(module: nn.Module, batches: list[np.ndarray], mode: str = "one-pass") -> nn.Module:
    """Reference: each BN's running statistics set to the exact population statistics of its
    input over all batches, the input measured with the BNs above it

    * ``one-pass``: in training mode (normalising with each batch's statistics);
    * ``sequential``: BN by BN in module order (topological here), the BNs above already calibrated;
    * ``two-pass``: in eval mode, all at once, with the one-pass statistics above.
    """
    module = copy.deepcopy(module).eval()
    if mode == "sequential":
        for bn in [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
            set_population_statistics(module, {bn: bn_inputs(module, batches)[bn]})
        return module
    trained = copy.deepcopy(module).train()  # its running statistics move: measure on a copy
    measured = bn_inputs(trained, batches)
    own = dict(module.named_modules())
    set_population_statistics(module, {own[name]: measured[m] for name, m in trained.named_modules() if m in measured})
    if mode == "two-pass":
        set_population_statistics(module, bn_inputs(module, batches))
    return module


def stats(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(stored_tensors(model)[name])


def torch_out(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    module = randomise_bn(TinyResNet())
    return module, export(module, torch.randn(2, 3, 16, 16))


# -- calibrate_bn --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", CALIBRATION_MODES)
def test_calibration_matches_the_torch_reference(resnet, mode):
    module, model = resnet
    before = model.SerializeToString()
    batches = calibration_batches()
    out = calibrate_bn(model, batches, mode=mode)
    assert model.SerializeToString() == before
    reference = torch_calibrate(module, batches, mode)
    for bn in ("bn0", "bn1", "bn2", "down_bn"):
        ref = reference.get_submodule(bn)
        np.testing.assert_allclose(stats(out, f"{bn}.running_mean"), ref.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats(out, f"{bn}.running_var"), ref.running_var.numpy(), rtol=1e-5, atol=1e-6)
    # Same tensors, same places, no extra outputs: only the statistics changed.
    assert [t.name for t in out.graph.initializer] == [t.name for t in model.graph.initializer]
    assert [o.name for o in out.graph.output] == ["y"] and len(out.graph.node) == len(model.graph.node)
    x = calibration_batches(seed=1, sizes=(4,))[0]
    np.testing.assert_allclose(run(out, x), torch_out(reference, x), atol=1e-4, rtol=1e-4)


def test_modes_agree_on_one_batch_and_on_the_first_level(resnet):
    """With one batch, batch and population statistics are the same thing: every mode gives the
    sequential result. With several, only BNs with no BN above them (bn0) agree exactly."""
    module, model = resnet
    names = [f"{bn}.running_{s}" for bn in ("bn0", "bn1", "bn2", "down_bn") for s in ("mean", "var")]
    one = {mode: calibrate_bn(model, calibration_batches(sizes=(12,)), mode=mode) for mode in CALIBRATION_MODES}
    several = {mode: calibrate_bn(model, calibration_batches(), mode=mode) for mode in CALIBRATION_MODES}
    for mode in ("one-pass", "two-pass"):
        for name in names:
            np.testing.assert_allclose(stats(one[mode], name), stats(one["sequential"], name), rtol=1e-5, atol=1e-6)
        for name in names[:2]:
            np.testing.assert_allclose(stats(several[mode], name), stats(several["sequential"], name), rtol=1e-5)
        gap = np.abs(stats(several[mode], "down_bn.running_var") / stats(several["sequential"], "down_bn.running_var") - 1)
        assert 1e-5 < gap.max() < 0.2, gap  # batch statistics of 5-8 images: close, and not the same


def test_one_pass_statistics_against_torch_running_statistics(resnet):
    """What PyTorch's training-mode running statistics (momentum=None: averages over batches) give
    on the same forwards: the same means (equal batch sizes); ``running_var`` is the average
    unbiased batch variance, ours the population variance (average biased batch variance plus
    the spread of the batch means)."""
    module, model = resnet
    batches = calibration_batches(sizes=(6, 6, 6))
    out = calibrate_bn(model, batches)
    trained = copy.deepcopy(module).train()
    bns = {n: m for n, m in trained.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for bn in bns.values():
        bn.momentum = None
        bn.reset_running_stats()
    inputs = bn_inputs(trained, batches)
    for name, bn in bns.items():
        x = inputs[bn].reshape(bn.num_features, len(batches), -1)  # (C, batch, positions of a batch)
        n = x.shape[2]
        spread = x.mean(dim=2).var(dim=1, unbiased=False).numpy()
        np.testing.assert_allclose(stats(out, f"{name}.running_mean"), bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats(out, f"{name}.running_var"),
                                   bn.running_var.numpy() * (n - 1) / n + spread, rtol=1e-5, atol=1e-6)
        assert not np.allclose(stats(out, f"{name}.running_var"), bn.running_var.numpy(), rtol=1e-4)


def test_calibration_is_deterministic_and_takes_threads(resnet):
    _, model = resnet
    batches = calibration_batches()
    a, b = calibrate_bn(model, batches), calibrate_bn(model, batches)
    assert a.SerializeToString() == b.SerializeToString()
    single = calibrate_bn(model, batches, threads=1)
    for t in (t for t in a.graph.initializer if "running" in t.name):
        np.testing.assert_allclose(stats(single, t.name), numpy_helper.to_array(t), rtol=1e-5, atol=1e-7)
    with pytest.raises(GhnOnnxError, match="calibration mode: expected one of one-pass, two-pass, sequential"):
        calibrate_bn(model, batches, mode="fast")
    with pytest.raises(GhnOnnxError, match="threads: expected a number >= 0"):
        calibrate_bn(model, batches, threads=-1)


def test_first_bn_gets_numpy_stats_of_first_conv(resnet):
    module, model = resnet
    batches = calibration_batches()
    out = calibrate_bn(model, batches)
    with torch.no_grad():
        conv = np.concatenate([module.conv0(torch.from_numpy(b)).numpy() for b in batches]).astype(np.float64)
    np.testing.assert_allclose(stats(out, "bn0.running_mean"), conv.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats(out, "bn0.running_var"), conv.var(axis=(0, 2, 3)), rtol=1e-5)


@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
def test_shared_statistics_are_untied_first(mode):
    """A fresh export reads bn*.running_var and bn*.weight from one all-ones tensor: calibrating
    must not change the BN scales."""
    torch.manual_seed(1)
    module = TinyResNet()
    model = export(module, torch.randn(2, 3, 16, 16))
    batches = calibration_batches()
    out = calibrate_bn(model, batches, mode=mode)
    onnx.checker.check_model(out)
    x = calibration_batches(seed=1, sizes=(4,))[0]
    np.testing.assert_allclose(run(out, x), torch_out(torch_calibrate(module, batches, mode), x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
def test_statistics_shared_directly_get_their_own_tensors(mode):
    """Two BNs reading one initializer as scale of one and running_var of the other."""
    rng = np.random.default_rng(7)
    model = bn_model(rng, opset=17)
    model.graph.node.append(onnx.helper.make_node("BatchNormalization", ["y", "v", "B", "m", "s"], ["z"]))
    model.graph.output[0].name = "z"
    x = calibration_batches(sizes=(6, 3), shape=(4, 5, 5))
    out = calibrate_bn(model, x, mode=mode)
    onnx.checker.check_model(out)
    for name in "sBmv":  # the original tensors keep their values
        np.testing.assert_array_equal(stats(out, name), stats(model, name))
    p = {k: torch.from_numpy(stats(model, k).copy()) for k in "sBmv"}
    parts = [torch.from_numpy(b).double() for b in x]

    def moments(t):
        return t.mean(dim=(0, 2, 3)), t.var(dim=(0, 2, 3), unbiased=False)

    def bn(t, stats, scale, eps):
        return F.batch_norm(t, *stats, scale.double(), p["B"].double(), training=False, eps=eps)

    first = moments(torch.cat(parts))
    if mode == "sequential":  # the second BN sees the first on the population statistics
        hidden = bn(torch.cat(parts), first, p["s"], 1e-3)
    else:  # ... on each batch's own
        hidden = torch.cat([bn(b, moments(b), p["s"], 1e-3) for b in parts])
    expected = bn(bn(torch.cat(parts), first, p["s"], 1e-3), moments(hidden), p["v"], 1e-5)
    np.testing.assert_allclose(run(out, np.concatenate(x)), expected.numpy(), atol=1e-4, rtol=1e-4)


def test_predict_then_calibrate_pipeline():
    torch.manual_seed(2)
    module = TinyResNet()
    model, _ = untie_aliases(export(module, torch.randn(2, 3, 16, 16)))
    graph = convert(model)
    rng = np.random.default_rng(0)
    preds = {k: (rng.standard_normal(r.canonical_shape) * 0.3).astype(np.float32) for k, r in resolve_shared(graph).items()}
    batches = calibration_batches()
    out = calibrate_bn(write_predictions(model, graph, preds), batches, graph=graph)
    state = module.state_dict()
    state.update({k: torch.from_numpy(v) for k, v in preds.items()})
    module.load_state_dict(state)
    x = calibration_batches(seed=1, sizes=(4,))[0]
    np.testing.assert_allclose(run(out, x), torch_out(torch_calibrate(module, batches), x), atol=1e-4, rtol=1e-4)


def test_graph_restricts_calibration_to_its_bn_nodes(resnet):
    _, model = resnet
    full = convert(model)
    only_bn0 = Graph([n for n in full.nodes if n.primitive is not Primitive.BN or n.name == "bn0.weight"],
                     np.zeros((0, 2), np.int64))
    out = calibrate_bn(model, calibration_batches(), graph=only_bn0)
    assert not np.array_equal(stats(out, "bn0.running_var"), stats(model, "bn0.running_var"))
    for bn in ("bn1", "bn2", "down_bn"):
        np.testing.assert_array_equal(stats(out, f"{bn}.running_var"), stats(model, f"{bn}.running_var"))


def test_bn_on_the_graph_input():
    torch.manual_seed(3)
    module = randomise_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)))
    batches = calibration_batches()
    out = calibrate_bn(export(module, torch.randn(2, 3, 16, 16)), batches)
    data = np.concatenate(batches).astype(np.float64)
    np.testing.assert_allclose(stats(out, "0.running_mean"), data.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(stats(out, "0.running_var"), data.var(axis=(0, 2, 3)), rtol=1e-6)


def test_fp16_statistics_stay_fp16():
    torch.manual_seed(4)
    module = randomise_bn(TinyResNet())
    reference = torch_calibrate(module, calibration_batches())
    out = calibrate_bn(export(copy.deepcopy(module).half(), torch.randn(2, 3, 16, 16).half()), calibration_batches())
    var = stats(out, "down_bn.running_var")
    assert var.dtype == np.float16
    np.testing.assert_allclose(var, reference.down_bn.running_var.numpy(), rtol=3e-2)


def test_calibration_needs_data(resnet):
    with pytest.raises(GhnOnnxError, match="at least one batch"):
        calibrate_bn(resnet[1], [])


# -- batch statistics ----------------------------------------------------------------------------

def test_batch_stats_model_equals_torch_train_mode(resnet):
    module, model = resnet
    out = batch_stats_model(model)
    onnx.checker.check_model(out)
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)
    assert not any("running" in t.name for t in out.graph.initializer)
    x = calibration_batches(seed=5, sizes=(6,))[0]
    with torch.no_grad():
        expected = copy.deepcopy(module).train()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(out, x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("opset", [15, 18])
@pytest.mark.parametrize("rank", [2, 4])
def test_batch_stats_single_bn(opset, rank):
    rng = np.random.default_rng(opset + rank)
    model = bn_model(rng, rank=rank, opset=opset)
    x = (rng.standard_normal((7, 4) + (5,) * (rank - 2)) * 3 + 2).astype(np.float32)
    p = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    expected = F.batch_norm(torch.from_numpy(x), p["m"].clone(), p["v"].clone(), p["s"], p["B"], training=True, eps=1e-3)
    np.testing.assert_allclose(run(batch_stats_model(model), x), expected.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("opset", [13, 15, 18])  # explicit statistics before opset 14, training-mode BN from 14
@pytest.mark.parametrize("rank", [2, 4])
def test_statistics_model_outputs_what_each_bn_normalised_with(opset, rank):
    rng = np.random.default_rng(opset * rank)
    model = bn_model(rng, rank=rank, opset=opset)
    model.graph.node.append(onnx.helper.make_node("BatchNormalization", ["y", "s", "B", "m", "v"], ["z"], epsilon=1e-3))
    model.graph.output[0].name = "z"
    probing, probes = statistics_model(model, ["y", "z"])
    x = (rng.standard_normal((7, 4) + (5,) * (rank - 2)) * 3 + 2).astype(np.float32)
    sess = __import__("onnxruntime").InferenceSession(probing.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))
    p = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    axes = (0,) + tuple(range(2, rank))
    h = torch.from_numpy(x).double()
    for probe in probes:  # each BN on batch statistics, as in torch's training mode
        np.testing.assert_allclose(got[probe.mean].ravel(), h.mean(dim=axes).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[probe.var].ravel(), h.var(dim=axes, unbiased=False).numpy(), rtol=1e-5)
        assert tuple(got[probe.shape]) == tuple(h.shape)
        h = F.batch_norm(h, None, None, p["s"].double(), p["B"].double(), training=True, eps=1e-3)
    assert [o.name for o in probing.graph.output] == [n for q in probes for n in (q.mean, q.var, q.shape)]
    with pytest.raises(GhnOnnxError, match="no BatchNormalization with output"):
        statistics_model(model, ["x"])


def test_statistics_model_can_leave_the_bns_on_their_stored_statistics():
    rng = np.random.default_rng(3)
    model = bn_model(rng, opset=17)
    model.graph.node.append(onnx.helper.make_node("BatchNormalization", ["y", "s", "B", "m", "v"], ["z"], epsilon=1e-3))
    model.graph.output[0].name = "z"
    probing, probes = statistics_model(model, ["y", "z"], batch_statistics=False)
    x = (rng.standard_normal((6, 4, 5, 5)) * 3 + 2).astype(np.float32)
    sess = __import__("onnxruntime").InferenceSession(probing.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))
    hidden = run(bn_model(np.random.default_rng(3), opset=17), x).astype(np.float64)  # the first BN in eval mode
    np.testing.assert_allclose(got[probes[1].mean].ravel(), hidden.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[probes[1].var].ravel(), hidden.var(axis=(0, 2, 3)), rtol=1e-5)


# -- calibration data ----------------------------------------------------------------------------

def test_npy_uint8_nhwc_and_nchw(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 4, 5, 3), dtype=np.uint8)
    np.save(tmp_path / "nhwc.npy", images)
    np.save(tmp_path / "nchw.npy", images.transpose(0, 3, 1, 2))
    pick = np.random.default_rng(1).choice(10, 5, replace=False)
    expected = ((images[pick] / 255.0 - np.array(CIFAR10_MEAN)) / np.array(CIFAR10_STD)).transpose(0, 3, 1, 2)
    for name in ("nhwc.npy", "nchw.npy"):
        x = load_calibration_data(tmp_path / name, (1, 3, 4, 5), n=5, seed=1)
        assert x.shape == (5, 3, 4, 5) and x.dtype == np.float32
        np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)


def test_npz_float_is_taken_as_is(tmp_path):
    x = np.random.default_rng(0).standard_normal((6, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", images=x, labels=np.arange(6))
    out = load_calibration_data(tmp_path / "d.npz", (1, 4, 4), n=6, seed=0)
    np.testing.assert_array_equal(np.sort(out.ravel()), np.sort(x.ravel()))
    assert [b.shape[0] for b in iter_batches(out, 4)] == [4, 2]


def write_pngs(root: Path, size=(5, 4)) -> list[np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for i in range(6):
        img = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        path = root / "train" / ("cat" if i % 2 else "dog") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        images.append(img)
    return images


def test_image_folder_and_zip(tmp_path):
    images = write_pngs(tmp_path / "folder")
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as zf:
        for p in sorted((tmp_path / "folder").rglob("*.png")):
            zf.write(p, p.relative_to(tmp_path / "folder").as_posix())
    from_dir = load_calibration_data(tmp_path / "folder", (3, 4, 5), n=6, seed=3, mean=(0, 0, 0), std=(1, 1, 1))
    from_zip = load_calibration_data(tmp_path / "images.zip", (3, 4, 5), n=6, seed=3, mean=(0, 0, 0), std=(1, 1, 1))
    np.testing.assert_array_equal(from_dir, from_zip)
    got = sorted(tuple((x * 255).round().astype(np.uint8).transpose(1, 2, 0).ravel()) for x in from_dir)
    assert got == sorted(tuple(i.ravel()) for i in images)


def test_data_errors(tmp_path):
    write_pngs(tmp_path)
    with pytest.raises(GhnOnnxError, match="asked for 7"):
        load_calibration_data(tmp_path, (3, 4, 5), n=7, seed=0)
    with pytest.raises(GhnOnnxError, match="normalisation"):
        load_calibration_data(tmp_path, (1, 4, 5), n=2, seed=0)
    with pytest.raises(GhnOnnxError, match="fixed sizes"):
        load_calibration_data(tmp_path, ("N", 3, "H", "W"), n=2, seed=0)


def test_cifar_zip_subset_is_seeded(resnet, shared_dir):
    _, model = resnet
    cifar_zip = shared_dir / "data" / "cifar10-jpeg.zip"
    assert data_input(model)[0] == "x" and data_input(model)[2][1:] == (3, 16, 16)
    a = load_calibration_data(cifar_zip, (3, 32, 32), n=16, seed=0)
    b = load_calibration_data(cifar_zip, (3, 32, 32), n=16, seed=0)
    c = load_calibration_data(cifar_zip, (3, 32, 32), n=16, seed=1)
    assert a.shape == (16, 3, 32, 32)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert abs(float(a.mean())) < 1.0  # normalised


# -- calibration for any model: layout, size, normalisation, splits, fixed batches, no BN ---------

FRAMEWORKS = Path(__file__).resolve().parent / "fixtures" / "frameworks"


def write_split_pngs(root: Path, splits: dict[str, int], size=(32, 32)) -> dict[str, list[np.ndarray]]:
    """``splits[name]`` random RGB PNGs under ``root/<name>/<class>/``; the images by split."""
    from PIL import Image

    rng = np.random.default_rng(len(splits))
    out: dict[str, list[np.ndarray]] = {}
    for split, count in splits.items():
        for i in range(count):
            img = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            path = root / split / ("cat" if i % 2 else "dog") / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)
            out.setdefault(split, []).append(img)
    return out


def zip_folder(folder: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for p in sorted(folder.rglob("*.png")):
            zf.write(p, p.relative_to(folder).as_posix())
    return path


@pytest.mark.parametrize("fixture, layout, size", [("torch_cnn", "NCHW", (3, 16, 16)),
                                                   ("flax_cnn", "NHWC", (3, 16, 16)),
                                                   ("keras_cnn", "NHWC", (3, 16, 16))])
def test_input_spec_reads_layout_and_size(fixture, layout, size):
    spec = input_spec(onnx.load(FRAMEWORKS / f"{fixture}.onnx"))
    assert (spec.layout, (spec.channels, spec.height, spec.width), spec.batch) == (layout, size, None)
    assert spec.image_shape == ((3, 16, 16) if layout == "NCHW" else (16, 16, 3))


def test_input_spec_falls_back_on_the_shape():
    rng = np.random.default_rng(0)
    model = bn_model(rng)  # BN straight on an (N, 4, 5, 5) input: neither a Conv nor a Transpose reads it
    with pytest.raises(GhnOnnxError, match="NCHW or NHWC"):
        input_spec(model)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3
    assert input_spec(model).layout == "NCHW"


def test_calibration_takes_train_images_only(tmp_path):
    images = write_split_pngs(tmp_path / "data", {"train": 3, "test": 4}, size=(4, 4))
    archive = zip_folder(tmp_path / "data", tmp_path / "data.zip")
    want = sorted(i.tobytes() for i in images["train"])
    for source in (tmp_path / "data", archive):
        x = load_calibration_data(source, (3, 4, 4), n=3, seed=0, normalize=False)
        assert sorted(np.ascontiguousarray(i.transpose(1, 2, 0)).astype(np.uint8).tobytes() for i in x) == want
        with pytest.raises(GhnOnnxError, match="asked for 4 calibration images, found 3"):
            load_calibration_data(source, (3, 4, 4), n=4, seed=0)


def test_held_out_splits_alone_are_refused(tmp_path):
    write_split_pngs(tmp_path / "data", {"test": 2, "val": 2}, size=(4, 4))
    for source in (tmp_path / "data", zip_folder(tmp_path / "data", tmp_path / "data.zip")):
        with pytest.raises(GhnOnnxError, match="none under train/"):
            load_calibration_data(source, (3, 4, 4), n=1, seed=0)
    # the test folder named directly is the caller's choice: no split on the paths below it
    assert load_calibration_data(tmp_path / "data" / "test", (3, 4, 4), n=2, seed=0).shape == (2, 3, 4, 4)


def test_images_are_resized_and_laid_out_as_the_model_wants(tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    colour = np.array([10, 120, 250], np.uint8)
    Image.fromarray(np.broadcast_to(colour, (6, 8, 3)).copy()).save(tmp_path / "imgs" / "a.png")  # 8 wide, 6 high
    nhwc = load_calibration_data(tmp_path / "imgs", (4, 4, 3), n=1, normalize=False, layout="NHWC")
    nchw = load_calibration_data(tmp_path / "imgs", (3, 4, 4), n=1, normalize=False)
    assert nhwc.shape == (1, 4, 4, 3) and nchw.shape == (1, 3, 4, 4)
    np.testing.assert_array_equal(nhwc[0], np.broadcast_to(colour.astype(np.float32), (4, 4, 3)))
    np.testing.assert_array_equal(nchw[0], nhwc[0].transpose(2, 0, 1))
    u8 = np.broadcast_to(colour, (2, 8, 8, 3)).copy()
    np.save(tmp_path / "u8.npy", u8)
    got = load_calibration_data(tmp_path / "u8.npy", (3, 4, 4), n=2, mean=0.5, std=0.25)  # one value: every channel
    np.testing.assert_allclose(got[:, :, 0, 0], np.broadcast_to((colour / 255 - 0.5) / 0.25, (2, 3)), rtol=1e-6)


def test_float_arrays_are_taken_in_the_models_layout(tmp_path):
    x = np.random.default_rng(0).standard_normal((5, 16, 16, 3)).astype(np.float32)
    np.save(tmp_path / "nhwc.npy", x)
    model = onnx.load(FRAMEWORKS / "flax_cnn.onnx")
    batches = calibration_set(model, tmp_path / "nhwc.npy", 5, batch_size=2).batches
    assert [b.shape for b in batches] == [(2, 16, 16, 3), (2, 16, 16, 3), (1, 16, 16, 3)]
    assert sorted(np.concatenate(batches).ravel().tolist()) == sorted(x.ravel().tolist())
    with pytest.raises(GhnOnnxError, match=r"model's layout \(N, 3, 16, 16\) \(NCHW\)"):
        calibration_set(onnx.load(FRAMEWORKS / "torch_cnn.onnx"), tmp_path / "nhwc.npy", 5)


def conv_output_moments(model: onnx.ModelProto, name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name=name))
    sess = __import__("onnxruntime").InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run([name], {sess.get_inputs()[0].name: x})[0].astype(np.float64)
    return y.mean(axis=(0, 2, 3)), y.var(axis=(0, 2, 3))


def test_nhwc_export_calibrates_from_an_image_folder(tmp_path):
    """flax_cnn takes (B, 16, 16, 3); the folder holds 32x32 train/ and test/ images."""
    from ghn_onnx.cli import main

    write_split_pngs(tmp_path / "data", {"train": 6, "test": 3})
    src, out = FRAMEWORKS / "flax_cnn.onnx", tmp_path / "cal.onnx"
    res = CliRunner().invoke(main, ["calibrate", str(src), "-o", str(out), "--calibrate", str(tmp_path / "data"),
                                    "--calibration-images", "6", "--calibration-batch", "4", "--seed", "1",
                                    "--mean", "0.5", "--std", "0.25,0.25,0.25"])
    assert res.exit_code == 0, res.output
    assert "BN statistics from 6 images" in res.output
    x = load_calibration_data(tmp_path / "data", (16, 16, 3), 6, seed=1, mean=(0.5,), std=(0.25,), layout="NHWC")
    mean, var = conv_output_moments(onnx.load(src), "Conv_0", x)  # the first BN reads Conv_0
    calibrated = onnx.load(out)
    bn = next(n for n in calibrated.graph.node if n.op_type == "BatchNormalization")
    np.testing.assert_allclose(stats(calibrated, bn.input[3]), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats(calibrated, bn.input[4]), var, rtol=1e-5, atol=1e-6)


class FixedBatch(nn.Module):
    """conv-BN-relu, then a reshape to the traced batch size: its export only runs at batch 4."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).reshape(4, -1))


def test_fixed_batch_export_calibrates_at_its_own_batch_size(tmp_path):
    from ghn_onnx.cli import main

    torch.manual_seed(5)
    module = randomise_bn(FixedBatch()).eval()
    f = tmp_path / "fixed.onnx"
    torch.onnx.export(module, (torch.randn(4, 3, 8, 8),), str(f), dynamo=False, opset_version=17,
                      do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL, input_names=["x"])
    assert input_spec(onnx.load(f)).batch == 4
    np.save(tmp_path / "u8.npy", np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8))
    data = calibration_set(onnx.load(f), tmp_path / "u8.npy", 10, batch_size=64)
    assert [len(b) for b in data.batches] == [4, 4] and data.images == 8
    assert any("fixed batch size of 4" in n for n in data.notes) and any("rounded down to 8" in n for n in data.notes)
    out = tmp_path / "cal.onnx"
    res = CliRunner().invoke(main, ["calibrate", str(f), "-o", str(out), "--calibrate", str(tmp_path / "u8.npy"),
                                    "--calibration-images", "10"])
    assert res.exit_code == 0, res.output
    assert "BN statistics from 8 images" in res.stdout and "fixed batch size of 4" in res.stderr
    reference = torch_calibrate(module, data.batches)
    np.testing.assert_allclose(stats(onnx.load(out), "bn.running_var"), reference.bn.running_var.numpy(), rtol=1e-5)
    with pytest.raises(GhnOnnxError, match="at least 4 images"):
        calibration_set(onnx.load(f), tmp_path / "u8.npy", 3)


def test_data_the_model_cannot_take_is_a_one_line_error(resnet):
    with pytest.raises(GhnOnnxError, match=r"onnxruntime cannot run the model on the calibration batch \(x \(2, 4,"):
        calibrate_bn(resnet[1], [np.zeros((2, 4, 16, 16), np.float32)])  # 4 channels, the stem conv takes 3
    wrong = [np.zeros((2, 3, 5, 5), np.float32)]  # the BN right on the input has 4 channels
    with pytest.raises(GhnOnnxError, match="has 3 channels, its running statistics 4"):
        calibrate_bn(bn_model(np.random.default_rng(0)), wrong, mode="sequential")  # measured without a run
    with pytest.raises(GhnOnnxError, match=r"cannot run the model on the calibration batch \(x \(2, 3, 5, 5\)\)"):
        calibrate_bn(bn_model(np.random.default_rng(0)), wrong)


@pytest.mark.parametrize("fixture, status", [("torch_vit", "none"), ("torch_cnn_legacy_folded", "folded")])
def test_a_model_without_bn_is_not_calibrated(fixture, status, tmp_path):
    import ghn_onnx
    from ghn_onnx.pipeline import NO_BN_TO_CALIBRATE

    np.save(tmp_path / "u8.npy", np.zeros((4, 16, 16, 3), np.uint8))
    assert calibration_targets(onnx.load(FRAMEWORKS / f"{fixture}.onnx")) == []
    pred = ghn_onnx.predict(FRAMEWORKS / f"{fixture}.onnx", calibrate=tmp_path / "u8.npy", calibration_images=512)
    assert pred.bn_status == status  # 512 images are more than the file holds: it was never read
    assert {p.key: p.value for p in pred.model.metadata_props}["ghn_onnx.bn"] == status
    assert sum(NO_BN_TO_CALIBRATE in w for w in pred.warnings) == 1


def test_calibrate_command_on_a_model_without_bn(tmp_path):
    from ghn_onnx.cli import main

    src, out = FRAMEWORKS / "torch_vit.onnx", tmp_path / "out.onnx"
    res = CliRunner().invoke(main, ["calibrate", str(src), "-o", str(out), "--calibrate", str(tmp_path / "missing")])
    assert res.exit_code == 0, res.output
    assert "unchanged" in res.output and "nothing to calibrate" in res.output
    assert onnx.load(out).graph == onnx.load(src).graph


def test_predict_options_normalisation(tmp_path):
    import ghn_onnx
    from ghn_onnx.pipeline import PredictOptions

    np.save(tmp_path / "u8.npy", np.random.default_rng(2).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    src = FRAMEWORKS / "torch_cnn.onnx"
    ghn = ghn_onnx.load_ghn()
    raw = ghn_onnx.predict(src, ghn, calibrate=tmp_path / "u8.npy", calibration_images=8, no_normalize=True)
    plain = ghn_onnx.predict(src, ghn)
    x = load_calibration_data(tmp_path / "u8.npy", (3, 16, 16), 8, normalize=False)
    expected = calibrate_bn(plain.model, [x], graph=plain.graph)
    for t in (t for t in expected.graph.initializer if "running" in t.name):
        np.testing.assert_allclose(stats(raw.model, t.name), numpy_helper.to_array(t), rtol=1e-5)
    assert PredictOptions(mean=0.5, std=[0.2, 0.3, 0.4]).mean == (0.5,)
    with pytest.raises(GhnOnnxError, match="without mean and std"):
        PredictOptions(no_normalize=True, mean=(0.5,))


@pytest.mark.parametrize("args, message", [(["--mean", "a,b"], "--mean: expected comma-separated numbers"),
                                           (["--no-normalize", "--std", "0.2"], "without --mean and --std")])
def test_normalisation_flag_errors(args, message, tmp_path):
    from ghn_onnx.cli import main

    res = CliRunner().invoke(main, ["calibrate", str(FRAMEWORKS / "torch_cnn.onnx"), "-o", str(tmp_path / "o.onnx"),
                                    "--calibrate", str(tmp_path), *args])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def test_calibration_options_are_the_same_on_predict_and_calibrate():
    from ghn_onnx.cli import main

    def options(command: str) -> dict:
        return {p.opts[0]: (type(p.type), p.default) for p in main.commands[command].params
                if p.opts[0].startswith(("--calibrat", "--seed", "--mean", "--std", "--no-normalize")) and not p.hidden}

    shared = {"--calibrate", "--calibration-images", "--calibration-batch", "--calibration-mode", "--seed", "--mean",
              "--std", "--no-normalize"}
    assert set(options("predict")) == shared == set(options("calibrate"))
    assert options("calibrate") == options("predict")
    assert options("eval")["--calibration-images"] == options("predict")["--calibration-images"]


def test_old_option_names_still_work_with_one_warning(tmp_path):
    """--data / --images / --batch-size (calibrate) and --batch-size (predict): hidden for one release."""
    from ghn_onnx.cli import main

    np.save(tmp_path / "u8.npy", np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    src = FRAMEWORKS / "torch_cnn.onnx"
    new = CliRunner().invoke(main, ["calibrate", str(src), "-o", str(tmp_path / "new.onnx"), "--calibrate",
                                    str(tmp_path / "u8.npy"), "--calibration-images", "5", "--calibration-batch", "2"])
    old = CliRunner().invoke(main, ["calibrate", str(src), "-o", str(tmp_path / "old.onnx"), "--data",
                                    str(tmp_path / "u8.npy"), "--images", "5", "--batch-size", "2"])
    assert new.exit_code == 0 and old.exit_code == 0, (new.output, old.output)
    assert "deprecated" not in new.stderr
    for was, now in (("--data", "--calibrate"), ("--images", "--calibration-images"), ("--batch-size", "--calibration-batch")):
        assert old.stderr.count(f"warning: {was} is deprecated and goes in the next release: use {now}") == 1
    assert onnx.load(tmp_path / "old.onnx") == onnx.load(tmp_path / "new.onnx")
    for args, message in ((["--data", "x", "--calibrate", "x"], "--data is the old name of --calibrate: give --calibrate alone"),
                          ([], "missing option '--calibrate IMAGES'")):
        res = CliRunner().invoke(main, ["calibrate", str(src), "-o", str(tmp_path / "o.onnx"), *args])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    help_text = CliRunner().invoke(main, ["calibrate", "--help"]).output
    assert "--calibration-batch" in help_text and "--images" not in help_text and "--data" not in help_text
    res = CliRunner().invoke(main, ["predict", str(src), "-o", str(tmp_path / "p.onnx"), "--batch-size", "0"])
    assert res.exit_code == 2 and "--batch-size" in res.output  # the old name still checks its value


def test_calibrate_command_takes_the_mode(tmp_path):
    from ghn_onnx.cli import main

    np.save(tmp_path / "u8.npy", np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    src = FRAMEWORKS / "torch_cnn.onnx"
    outs = {}
    for mode in CALIBRATION_MODES:
        out = tmp_path / f"{mode}.onnx"
        res = CliRunner().invoke(main, ["calibrate", str(src), "-o", str(out), "--calibrate", str(tmp_path / "u8.npy"),
                                        "--calibration-images", "6", "--calibration-batch", "3",
                                        "--calibration-mode", mode])
        assert res.exit_code == 0, res.output
        outs[mode] = onnx.load(out)
    x = load_calibration_data(tmp_path / "u8.npy", (3, 16, 16), 6)
    model = onnx.load(src)
    for mode, got in outs.items():
        assert got == calibrate_bn(model, list(iter_batches(x, 3)), mode=mode)
    assert outs["one-pass"] != outs["sequential"]  # two batches, BNs below BNs: the modes differ


def test_calibration_data_that_is_not_a_regular_file_is_refused(tmp_path):
    """A FIFO would block on open and a device would never end: refused before reading."""
    import os

    from ghn_onnx.bn.images import load_calibration_data
    from ghn_onnx.errors import GhnOnnxError

    fifo = tmp_path / "images.zip"
    os.mkfifo(fifo)
    with pytest.raises(GhnOnnxError, match="FIFO"):
        load_calibration_data(fifo, (3, 32, 32), 4)
    with pytest.raises(GhnOnnxError, match="character device"):
        load_calibration_data("/dev/zero", (3, 32, 32), 4)


@pytest.mark.parametrize("mode", CALIBRATION_MODES)
def test_predict_calibrates_in_the_mode_asked(tmp_path, mode):
    from ghn_onnx.pipeline import PredictOptions, load_ghn, predict

    torch.manual_seed(3)
    model = export(TinyResNet(), torch.randn(2, 3, 16, 16))
    data = np.concatenate(calibration_batches())
    np.save(tmp_path / "calib.npy", data)
    ghn = load_ghn()
    plain = predict(model, ghn, PredictOptions(seed=0))
    pred = predict(model, ghn, PredictOptions(calibrate=tmp_path / "calib.npy", calibration_images=len(data),
                                              calibration_batch=8, calibration_mode=mode))
    expected = calibrate_bn(plain.model, PredictOptions(calibrate=tmp_path / "calib.npy",
                                                         calibration_images=len(data), calibration_batch=8)
                            .calibration_set(plain.model).batches, graph=plain.graph, mode=mode)
    got, want = stored_tensors(pred.model), stored_tensors(expected)
    stats = [k for k in want if "running" in k]
    assert stats and all(np.array_equal(numpy_helper.to_array(got[k]), numpy_helper.to_array(want[k])) for k in stats)


def test_predict_refuses_an_unknown_calibration_mode():
    from ghn_onnx.pipeline import PredictOptions

    with pytest.raises(GhnOnnxError, match="calibration_mode"):
        PredictOptions(calibration_mode="magic")
