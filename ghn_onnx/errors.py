"""The project's own error types: every user-facing failure is one of these, so the CLI can print
one clear line and exit with code 2 (bad input) or 1 (:class:`OutputError`) instead of a traceback."""


class GhnOnnxError(Exception):
    """Base class for errors a user can act on (bad input, bad checkpoint, unsupported model)."""


class ModelLoadError(GhnOnnxError):
    """The ONNX file cannot be read: missing, not a regular file, not ONNX, truncated, missing
    external data, or a graph that breaks the spec (cycles, two producers of one tensor)."""


class UnsupportedModelError(GhnOnnxError):
    """The model is valid ONNX but outside what a GHN can predict (quantized, control flow, ...)."""


class CheckpointError(GhnOnnxError):
    """A GHN checkpoint is missing, corrupt, or does not match the expected configuration."""


class OutputError(GhnOnnxError):
    """An output could not be written where it was asked for (permission denied, read-only file
    system, disk full): the input was fine, so the CLI exits with code 1, not 2."""
