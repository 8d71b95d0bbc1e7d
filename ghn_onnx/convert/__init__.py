"""ONNX → GHN graph: read a model from any exporter into the GHN's 15-primitive vocabulary."""

from ghn_onnx.convert.onnx_to_graph import convert, convert_file

__all__ = ["convert", "convert_file"]
