"""ghn-onnx: graph hypernetworks that predict the parameters of ONNX models."""

__version__ = "0.1.0"
