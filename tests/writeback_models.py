"""Small models for the write-back and calibration tests: PyTorch modules exported with the
TorchScript exporter (BN kept), and hand-built ONNX graphs for layouts PyTorch does not export."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper


class TinyResNet(nn.Module):
    """Stem conv-BN, one residual block, a strided conv-BN, global pooling, linear head.

    BN levels (BNs on the longest path above): bn0 0, block.bn1 1, block.bn2 2, down_bn 3.
    """

    def __init__(self, c: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(2 * c)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.conv0(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(y)))
        x = torch.relu(self.down_bn(self.down(x)))
        return self.fc(x.mean(dim=(2, 3)))


def randomise_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN distinct values, so the exporter does not merge equal tensors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module


def export(module: nn.Module, example: torch.Tensor, opset: int = 17) -> onnx.ModelProto:
    """TorchScript export with BN kept and a dynamic batch dimension."""
    f = io.BytesIO()
    torch.onnx.export(module.eval(), (example,), f, dynamo=False, opset_version=opset,
                      do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL,
                      input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return onnx.load_from_string(f.getvalue())


def run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    src = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="hand")
    onnx.checker.check_model(model)
    return model


def matmul_model(rng: np.random.Generator, d_in: int = 6, d_hidden: int = 5, d_out: int = 3) -> onnx.ModelProto:
    """``relu(x @ W1 + b1) @ W2`` with ``W`` stored ``(in, out)`` as MatMul wants it."""
    w1 = numpy_helper.from_array(rng.standard_normal((d_in, d_hidden)).astype(np.float32), "W1")
    b1 = numpy_helper.from_array(rng.standard_normal(d_hidden).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((d_hidden, d_out)).astype(np.float32), "W2")
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d_in])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d_out])], [w1, b1, w2])


def transpose_matmul_model(rng: np.random.Generator, d_in: int = 6, d_out: int = 4) -> onnx.ModelProto:
    """``x @ Transpose(W)`` with ``W`` stored ``(out, in)`` (a PyTorch weight, transposed in-graph)."""
    w = numpy_helper.from_array(rng.standard_normal((d_out, d_in)).astype(np.float32), "W")
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Wt"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d_in])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d_out])], [w])


def bf16_conv_model(rng: np.random.Generator, c_in: int = 3, c_out: int = 4) -> onnx.ModelProto:
    """Conv whose weight (a Constant node) and bias (an initializer) are stored as bfloat16 and
    cast to float32 in the graph (onnxruntime's CPU kernels do not compute in bf16)."""
    import ml_dtypes

    w = rng.standard_normal((c_out, c_in, 3, 3)).astype(ml_dtypes.bfloat16)
    b = numpy_helper.from_array(rng.standard_normal(c_out).astype(ml_dtypes.bfloat16), "b")
    nodes = [helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "W_value")),
             helper.make_node("Cast", ["W"], ["Wf"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
             helper.make_node("Conv", ["x", "Wf", "bf"], ["y"], pads=[1, 1, 1, 1])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c_out, 8, 8])], [b])


def bn_model(rng: np.random.Generator, c: int = 4, rank: int = 4, opset: int = 18) -> onnx.ModelProto:
    """A single BatchNormalization with random scale, bias and running statistics."""
    arrays = {"s": rng.random(c) + 0.5, "B": rng.standard_normal(c), "m": rng.standard_normal(c),
              "v": rng.random(c) + 0.5}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()]
    shape = ["N", c] + [5] * (rank - 2)
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "B", "m", "v"], ["y"], epsilon=1e-3)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits, opset)
