"""torchvision networks adjusted for 32x32 CIFAR images, and their ONNX export.

The adjustments are the GHN-2 reference's (``ppuda/utils/utils.py::adjust_net``, also what the
parity fixtures ``resnet18.onnx`` / ``mobilenet_v2.onnx`` contain):

- ResNet: the 7x7 stride-2 stem becomes 3x3 stride 1 padding 1 (its weight is the centre of the
  initialised 7x7 kernel), and the max-pool is removed. Feature maps 32 → 32, 16, 8, 4.
- MobileNetV2: every convolution in ``features[:5]`` gets stride 1: the stem conv
  (``features.0``) and the depthwise convs of the first two stride-2 blocks (``features.2``,
  ``features.4``). Strides 2 remain at ``features.7`` and ``features.14``: 32 → 16 → 8 before the
  pooled head (torchvision at 224 px goes 224 → 7, a 32x reduction; this is 4x).
- EfficientNet-B0 (no reference adjustment; the same rule, to the ResNets' 8x): every convolution
  in ``features[:3]`` gets stride 1: the stem (``features.0``) and the depthwise conv of the first
  stride-2 block (``features.2``). Strides 2 remain at ``features.3``, ``.4`` and ``.6``: 32 → 4.
- ViT-Tiny (``vit_tiny``): torchvision's ``VisionTransformer`` with DeiT-Tiny's dimensions (12
  layers, 3 heads, width 192, MLP 768) and 4x4 patches, so a 32x32 image is 64 tokens plus the
  class token (at 224 px with 16x16 patches it is 196: the same order). torchvision has no
  preset of this size; the patch size is the usual choice for ViTs trained on CIFAR.

Every model has a 10-class head and PyTorch's / torchvision's default initialisation.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable

import onnx
import torch
from torch import nn

from ghn_onnx.errors import GhnOnnxError

#: Export settings shared with the GHN's own training graphs (TorchScript exporter, BN kept).
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def _adjust_first_conv(conv: nn.Conv2d, size: int = 3) -> None:
    """Shrink a stem conv to ``size x size``, stride 1, keeping the centre of its kernel."""
    k = conv.weight.shape[-1]
    lo = (k - size) // 2
    with torch.no_grad():
        conv.weight = nn.Parameter(conv.weight[:, :, lo:lo + size, lo:lo + size].clone())
    conv.kernel_size, conv.stride, conv.padding = (size, size), (1, 1), (size // 2, size // 2)


def _cifar_resnet(factory: Callable[..., nn.Module]) -> Callable[[int], nn.Module]:
    def build(num_classes: int = 10) -> nn.Module:
        net = factory(num_classes=num_classes)
        _adjust_first_conv(net.conv1)
        net.maxpool = nn.Identity()
        return net
    return build


def _unit_strides(blocks: nn.Module) -> None:
    """Stride 1 for every convolution in ``blocks`` (the early downsampling a 32x32 input cannot spare)."""
    for m in blocks.modules():
        if isinstance(m, nn.Conv2d):
            m.stride = (1, 1)


def _cifar_mobilenet_v2(num_classes: int = 10) -> nn.Module:
    import torchvision

    net = torchvision.models.mobilenet_v2(num_classes=num_classes)
    _unit_strides(net.features[:5])
    return net


def _cifar_efficientnet_b0(num_classes: int = 10) -> nn.Module:
    import torchvision

    net = torchvision.models.efficientnet_b0(num_classes=num_classes)
    _unit_strides(net.features[:3])
    return net


def _cifar_vit_tiny(num_classes: int = 10) -> nn.Module:
    import torchvision

    return torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=12, num_heads=3,
                                                hidden_dim=192, mlp_dim=768, num_classes=num_classes)


def _registry() -> dict[str, Callable[[int], nn.Module]]:
    try:
        import torchvision
    except ImportError:  # pragma: no cover - a dev dependency
        raise GhnOnnxError("torchvision models need torchvision: pip install torchvision") from None
    return {
        "resnet18": _cifar_resnet(torchvision.models.resnet18),
        "resnet50": _cifar_resnet(torchvision.models.resnet50),
        "mobilenet_v2": _cifar_mobilenet_v2,
        "efficientnet_b0": _cifar_efficientnet_b0,
        "vit_tiny": _cifar_vit_tiny,
    }


#: The torchvision models the evaluation knows (registry keys).
TORCHVISION_MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "vit_tiny")


def cifar_model(name: str, num_classes: int = 10, seed: int | None = None) -> nn.Module:
    """A freshly initialised torchvision ``name`` adjusted for 32x32 (see the module docstring).

    Raises:
        GhnOnnxError: ``name`` is not one of :data:`TORCHVISION_MODELS`.
    """
    if name not in TORCHVISION_MODELS:
        raise GhnOnnxError(f"Expected a torchvision model from {', '.join(TORCHVISION_MODELS)} (got {name!r})")
    if seed is not None:
        torch.manual_seed(seed)
    return _registry()[name](num_classes)


def export_model(net: nn.Module) -> onnx.ModelProto:
    """TorchScript export with BatchNorm kept: opset 17, eval mode, no constant folding, input
    ``input`` ``(batch, 3, 32, 32)`` with a dynamic batch axis, output ``logits``. Initializer
    names are the PyTorch parameter names (exporter aliases are untied by the prediction)."""
    buf = io.BytesIO()
    was_training = net.training
    net.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tracing is one batch-1 pass; two threads on a busy CPU are slower
    try:
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), buf, dynamo=False, opset_version=OPSET,
                              training=torch.onnx.TrainingMode.EVAL, do_constant_folding=False,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    finally:
        torch.set_num_threads(threads)
        net.train(was_training)
    return onnx.load_from_string(buf.getvalue())


def parameters_from_onnx(model: onnx.ModelProto, net: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of ``net`` read back from ``model``'s initializers of the same name (a
    TorchScript export of ``net`` whose aliases are untied, e.g. a predicted model).

    Raises:
        GhnOnnxError: a parameter is missing from the model or has another shape.
    """
    from onnx import numpy_helper

    stored = {t.name: t for t in model.graph.initializer}
    out: dict[str, torch.Tensor] = {}
    for name, p in net.named_parameters():
        if name not in stored:
            raise GhnOnnxError(f"Expected initializer {name!r} in the ONNX model (it has {len(stored)} initializers)")
        value = torch.from_numpy(numpy_helper.to_array(stored[name]).copy()).float()
        if value.shape != p.shape:
            raise GhnOnnxError(f"{name!r}: expected shape {tuple(p.shape)} (got {tuple(value.shape)})")
        out[name] = value
    return out
