"""Small runnable examples (``python -m ghn_onnx.examples.<name> --help``)."""
