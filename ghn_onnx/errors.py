"""The project's own error types: every user-facing failure is one of these, so the CLI can print
one clear line and exit with code 2 instead of a traceback."""


class GhnOnnxError(Exception):
    """Base class for errors a user can act on (bad input, bad checkpoint, unsupported model)."""


class ModelLoadError(GhnOnnxError):
    """The ONNX file cannot be read: missing, not ONNX, truncated, or missing external data."""


class UnsupportedModelError(GhnOnnxError):
    """The model is valid ONNX but outside what a GHN can predict (quantized, control flow, ...)."""


class CheckpointError(GhnOnnxError):
    """A GHN checkpoint is missing, corrupt, or does not match the expected configuration."""
