"""``ghn_onnx.torch.init_``: a PyTorch module's parameters predicted and copied back in place.

For each model the module's own forward after ``init_`` must equal onnxruntime on the predicted
ONNX model (1e-4 of the output's scale, BN calibrated or kept alike), every predicted tensor must
land in its parameter, and the report must account for every parameter. The models span the
families torchvision and timm hold: residual, inverted residual, squeeze-excite with hardswish or
SiLU, channel shuffle, dense concatenation, fire modules without BN, ConvNeXt (LayerNorm, layer
scale), ViT, MLP-Mixer and PoolFormer (bias-free LayerNorm, StarReLU)."""

from __future__ import annotations

import copy
import io
import warnings
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import timm
import torchvision
from onnx import numpy_helper
from torchvision.models.vision_transformer import VisionTransformer

import ghn_onnx
from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.examples.export_resnet18 import cifar_resnet18
from ghn_onnx.onnx_io.storage import stored_tensors
from ghn_onnx.torch import Match, copy_prediction, init_, match_parameters
from ghn_onnx.writeback.write import resolve_shared
from test_calibration import torch_calibrate
from writeback_models import TinyResNet

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def ghn():
    return ghn_onnx.load_ghn()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A tiny CIFAR-like zip: 8 training images and 2 test images, 32x32 PNG."""
    from PIL import Image

    path = tmp_path_factory.mktemp("images") / "tiny.zip"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as zf:
        for split, n in (("train", 8), ("test", 2)):
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
                zf.writestr(f"{split}/c{i % 2}/{i}.png", buf.getvalue())
    return path


def tiny_vit() -> nn.Module:
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=10)


def onnx_forward(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def torch_forward(module: nn.Module, x: np.ndarray) -> np.ndarray:
    was = module.training
    module.eval()
    with torch.no_grad():
        y = module(torch.from_numpy(x)).numpy()
    module.train(was)
    return y


def check_report(module: nn.Module, report) -> None:
    """Every predicted tensor assigned, every parameter accounted for, values as in the ONNX."""
    pred = report.prediction
    assert {m.tensor for m in report.predicted.values()} == set(resolve_shared(pred.graph))
    assert len(report.predicted) == pred.predicted_tensors
    assert set(report.predicted) | set(report.kept) == {n for n, _ in module.named_parameters()}
    assert not set(report.predicted) & set(report.kept)
    stored = stored_tensors(pred.model)
    params = dict(module.named_parameters())
    for name, m in report.predicted.items():
        value = numpy_helper.to_array(stored[m.tensor])
        np.testing.assert_array_equal(params[name].detach().cpu().numpy(), value.T if m.transposed else value)


def assert_same_outputs(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal to 1e-4 of the output's scale: a calibrated network on noise can have logits in the
    thousands (8 calibration images), where float32 differences are relative."""
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(expected).max())))


def torchvision_model(name: str):
    return lambda: getattr(torchvision.models, name)(num_classes=10)


def small_densenet() -> nn.Module:
    """torchvision's DenseNet-BC (bottlenecks, transitions, BN on every concatenation), 4 blocks
    of 2 layers: densenet121's structure at a tenth of its export time."""
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, num_classes=10)


def small_convnext() -> nn.Module:
    """torchvision's ConvNeXt (7x7 depthwise convs, LayerNorm on NCHW via permutes, layer scale),
    three stages of two blocks."""
    from torchvision.models.convnext import CNBlockConfig

    return torchvision.models.ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, 64, 2), CNBlockConfig(64, None, 2)],
                                       num_classes=10)


def tiny_mixer() -> nn.Module:
    return timm.models.mlp_mixer.MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=32)


def tiny_poolformer() -> nn.Module:
    """timm's MetaFormer defaults (PoolFormer v2): pooling token mixer, bias-free LayerNorm,
    StarReLU (a learnt scale and bias), layer and residual scales."""
    return timm.models.metaformer.MetaFormer(num_classes=10, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))


# (name, module factory, calibrate with the tiny zip?, parameter name suffixes expected to keep their init)
MODELS = [("resnet18", cifar_resnet18, True, set()),
          ("mobilenet_v2", torchvision_model("mobilenet_v2"), False, set()),
          ("vit", tiny_vit, False, {"class_token"}),
          ("squeezenet1_1", torchvision_model("squeezenet1_1"), False, set()),
          ("shufflenet_v2_x0_5", torchvision_model("shufflenet_v2_x0_5"), True, set()),
          ("mobilenet_v3_small", torchvision_model("mobilenet_v3_small"), True, set()),
          ("efficientnet_b0", torchvision_model("efficientnet_b0"), False, set()),  # calibrating: +10 s
          ("densenet", small_densenet, True, set()),
          ("convnext", small_convnext, False, {"layer_scale"}),
          ("timm_mixer", tiny_mixer, False, set()),
          ("timm_poolformer", tiny_poolformer, False, {"act.scale", "act.bias", "res_scale1.scale",
                                                       "res_scale2.scale"})]


@pytest.mark.parametrize("name, factory, calibrated, kept", MODELS, ids=[m[0] for m in MODELS])
def test_module_forward_equals_the_predicted_onnx(name, factory, calibrated, kept, ghn, images):
    torch.manual_seed(0)
    module = factory().train()
    before = copy.deepcopy(module.state_dict())
    options = {"calibrate": images, "calibration_images": 8, "calibration_batch": 4} if calibrated else {}
    report = init_(module, torch.randn(2, 3, 32, 32), checkpoint=ghn, **options)
    assert module.training and all(m.training for m in module.modules())  # mode kept
    check_report(module, report)
    assert {next((k for k in kept if n.endswith("." + k) or n == k), n) for n in report.kept} == kept
    assert all("no GHN node predicts it" in why for why in report.kept.values())
    for p in report.predicted:
        assert not torch.equal(module.state_dict()[p], before[p]) or before[p].abs().sum() == 0
    bns = [n for n, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)]
    # no folded-BN guess (SqueezeNet has no BN); an op with no primitive is the one warning there may be
    assert all(w.startswith("parameters of ops with no GHN primitive") for w in report.warnings)
    assert bool(report.warnings) == bool(kept - {"class_token"})
    if calibrated:
        assert report.bn_status == "calibrated:8"
        assert sorted(report.statistics) == sorted(f"{b}.{s}" for b in bns for s in ("running_mean", "running_var"))
        assert not torch.equal(module.state_dict()[f"{bns[0]}.running_var"], before[f"{bns[0]}.running_var"])
    else:
        assert report.statistics == [] and report.bn_status == ("uncalibrated" if bns else "none")
        for b in bns:  # the module's own statistics, as in the ONNX model
            assert torch.equal(module.state_dict()[f"{b}.running_var"], before[f"{b}.running_var"])
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32), dtype=np.float32)
    assert_same_outputs(torch_forward(module, x), onnx_forward(report.prediction.model, x))
    assert report.format().startswith(f"predicted {len(report.predicted)} of "
                                      f"{len(report.predicted) + len(report.kept)} parameters")


def test_calibration_on_a_tensor_matches_torch(ghn):
    """calibrate= a tensor of inputs: the statistics are what torch measures on the predicted module."""
    torch.manual_seed(1)
    module = TinyResNet()
    data = torch.randn(10, 3, 16, 16)
    report = init_(module, torch.randn(2, 3, 16, 16), checkpoint=ghn, calibrate=data, calibration_batch=4)
    assert report.bn_status == "calibrated:10" and len(report.statistics) == 8
    reference = torch_calibrate(module, [data.numpy()[i:i + 4] for i in range(0, 10, 4)])  # init_'s batches
    for name, value in reference.state_dict().items():
        if "running" in name:
            np.testing.assert_allclose(module.state_dict()[name].numpy(), value.numpy(), rtol=1e-5, atol=1e-6)


def test_calibrate_sets_the_statistics_alone(images):
    """calibrate_: the module's own parameters, BN statistics as init_ measures them."""
    torch.manual_seed(1)
    module = TinyResNet()
    params = copy.deepcopy(dict(module.named_parameters()))
    data = torch.randn(10, 3, 16, 16)
    names = ghn_onnx.torch.calibrate_(module, torch.randn(2, 3, 16, 16), data, calibration_batch=4)
    assert len(names) == 8 and all(torch.equal(p, params[n]) for n, p in module.named_parameters())
    reference = torch_calibrate(module, [data.numpy()[i:i + 4] for i in range(0, 10, 4)])
    for name in names:
        np.testing.assert_allclose(module.state_dict()[name].numpy(), reference.state_dict()[name].numpy(),
                                   rtol=1e-5, atol=1e-6)
    assert ghn_onnx.torch.calibrate_(module, torch.randn(2, 3, 16, 16), images, calibration_images=8) == names
    assert ghn_onnx.torch.calibrate_(TwoLinears(), torch.randn(2, 6), images) == []  # no BN: nothing to set
    with pytest.raises(TypeError, match="unknown option"):
        ghn_onnx.torch.calibrate_(module, torch.randn(2, 3, 16, 16), data, steps=3)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_device_and_dtype_are_kept(device, ghn):
    torch.manual_seed(2)
    module = TinyResNet().to(device=device, dtype=torch.float64)
    report = init_(module, torch.randn(2, 3, 16, 16, device=device, dtype=torch.float64), checkpoint=ghn)
    assert {(p.device.type, p.dtype) for p in module.parameters()} == {(device, torch.float64)}
    stored = stored_tensors(report.prediction.model)
    for name, p in module.named_parameters():
        expected = numpy_helper.to_array(stored[report.predicted[name].tensor]).astype(np.float64)
        np.testing.assert_array_equal(p.detach().cpu().numpy(), expected)


class TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def folded_export(module: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    """Constant folding on: each Linear on a 3-D input becomes MatMul with a transposed
    initializer named ``onnx::MatMul_<n>``, not after its parameter."""
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), f, dynamo=False, do_constant_folding=True, opset_version=17)
    return onnx.load_from_string(f.getvalue())


def test_transposed_initializers_are_matched_by_value(ghn):
    torch.manual_seed(3)
    module, x = TwoLinears(), torch.randn(2, 4, 6)
    exported = folded_export(module, x)
    renamed = sorted(t.name for t in exported.graph.initializer if t.name.startswith("onnx::MatMul"))
    assert len(renamed) == 2
    matches = match_parameters(exported, module, [t.name for t in exported.graph.initializer])
    assert sorted((m.parameter, m.transposed) for m in matches) == [
        ("fc1.bias", False), ("fc1.weight", True), ("fc2.bias", False), ("fc2.weight", True)]
    report = copy_prediction(module, ghn_onnx.predict(exported, ghn), exported)
    check_report(module, report)
    xs = np.random.default_rng(3).standard_normal((2, 4, 6), dtype=np.float32)
    np.testing.assert_allclose(torch_forward(module, xs), onnx_forward(report.prediction.model, xs),
                               rtol=1e-4, atol=1e-4)


def test_unmatched_predictions_are_errors_and_nothing_is_copied(ghn):
    torch.manual_seed(4)
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU())
    before = copy.deepcopy(module.state_dict())
    # the export's BN scale and shift are constants: the GHN predicts them, no parameter can take them
    with pytest.raises(GhnOnnxError, match=r"2 predicted tensor\(s\) cannot be copied into Sequential: .*constant"):
        init_(module, torch.randn(2, 3, 8, 8), checkpoint=ghn)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_a_layernorm_without_bias_is_predicted_without_one(ghn):
    """The exporter feeds a bias-free LayerNorm a constant zero bias: init_ drops it (the same
    function), so the GHN predicts the scale alone instead of a bias no parameter can take."""
    torch.manual_seed(6)
    module = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8, bias=False), nn.GELU(), nn.Linear(8, 3))
    report = init_(module, torch.randn(2, 6), checkpoint=ghn)
    check_report(module, report)
    assert set(report.predicted) == {"0.weight", "0.bias", "1.weight", "3.weight", "3.bias"} and report.kept == {}
    ln = next(n for n in report.prediction.model.graph.node if n.op_type == "LayerNormalization")
    assert list(ln.input[1:]) == ["1.weight"]
    x = np.random.default_rng(6).standard_normal((4, 6), dtype=np.float32)
    assert_same_outputs(torch_forward(module, x), onnx_forward(report.prediction.model, x))


def test_match_parameters_refusals():
    torch.manual_seed(5)
    module = TwoLinears()
    exported = folded_export(module, torch.randn(2, 4, 6))
    other = TwoLinears()  # same shapes, other values: no parameter holds the exported weights
    with pytest.raises(GhnOnnxError, match="none by value"):
        match_parameters(exported, other, [t.name for t in exported.graph.initializer])
    twin = copy.deepcopy(module)
    twin.extra = nn.Linear(6, 5)
    twin.extra.load_state_dict(module.fc1.state_dict())
    with pytest.raises(GhnOnnxError, match=r"fc1.weight, extra.weight by value \(ambiguous\)"):
        match_parameters(exported, twin, [t.name for t in exported.graph.initializer])
    shrunk = TwoLinears()
    shrunk.fc1.bias = nn.Parameter(torch.zeros(4))
    with pytest.raises(GhnOnnxError, match=r"'fc1.bias' is stored with shape \(5,\), the parameter has \(4,\)"):
        match_parameters(exported, shrunk, ["fc1.bias"])


def test_tied_weights_are_predicted_once(ghn):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    module = Tied()
    report = init_(module, torch.randn(2, 6), checkpoint=ghn)
    assert set(report.predicted) == {"a.weight", "a.bias", "b.bias"} and report.kept == {}
    assert module.b.weight is module.a.weight
    check_report(module, report)


def test_options_that_do_not_apply_are_refused(ghn):
    with pytest.raises(TypeError, match="unfold_bn"):
        init_(TinyResNet(), torch.randn(1, 3, 16, 16), checkpoint=ghn, unfold_bn=True)
    with pytest.raises(TypeError, match="unknown option"):
        init_(TinyResNet(), torch.randn(1, 3, 16, 16), checkpoint=ghn, calibration_imgs=3)


def test_the_package_exposes_the_submodule():
    assert ghn_onnx.torch.init_ is init_ and Match.__module__ == "ghn_onnx.torch"


def test_readme_example_and_docstring_run():
    import doctest
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## Back into your framework\n", 1)[1].split("\n## ", 1)[0]
    text = section.split("\n### PyTorch\n", 1)[1].split("\n### ", 1)[0]
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(parser.get_doctest(text, {}, "README.md: Back into your framework: PyTorch", "README.md", 0))
    runner.run(parser.get_doctest(ghn_onnx.torch.__doc__, {}, "ghn_onnx.torch", "ghn_onnx/torch.py", 0))
    result = runner.summarize(verbose=False)
    assert result.attempted >= 8 and result.failed == 0
