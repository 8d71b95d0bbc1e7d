"""ONNX → GHN graph: read a model from any exporter into the GHN's 15-primitive vocabulary."""

from ghn_onnx.converters.loading import check_supported, load_model
from ghn_onnx.converters.onnx_to_graph import convert, convert_file

__all__ = ["convert", "convert_file", "load_model", "check_supported"]
