"""ghn-onnx: graph hypernetworks that predict the parameters of ONNX models.

The Python API; the ``ghn-onnx`` commands run the same code (:mod:`ghn_onnx.pipeline`):

* :func:`load_ghn` ``(name_or_path=None, device="cpu") -> GHN``: the shipped checkpoint, a
  ``.safetensors`` file, or a name that ``ghn-onnx checkpoints`` lists (fetched into the cache);
* :func:`predict` ``(model, ghn=None, options=None, **options) -> Prediction``: one model (an
  ``onnx.ModelProto`` or a path), nothing written;
* :func:`predict_files` ``(inputs, outputs, ghn=None, options=None, **options) -> list[Prediction]``:
  file to file, all inputs in one GHN batch, outputs written atomically;
* :func:`inspect` ``(model) -> Report``: what a GHN would see and predict of a model;
* :func:`explain` ``(model, data=None, **options) -> Explanation``: per predicted layer, how the
  prediction compares with PyTorch's default init and how much accuracy it carries;
* :class:`PredictOptions`: BN calibration, ``unfold_bn``, device, metadata, as one frozen dataclass;
* :func:`ghn_onnx.torch.init_` ``(module, example_input, **options) -> Report``: predict a PyTorch
  module's parameters and copy them into it, in place.
* :func:`ghn_onnx.keras.init_` ``(model, **options) -> Report``: predict a Keras 3 model's
  weights (torch backend) and assign them, in place.
* :func:`ghn_onnx.flax.init` ``(module, variables, example_input, **options) -> variables``: new
  variables for a Flax (linen or nnx) model, predicted through jax2onnx.

Example, from a checkout's root (``predict`` loads the shipped checkpoint when given no GHN)::

    >>> import ghn_onnx
    >>> result = ghn_onnx.predict("tests/fixtures/frameworks/torch_cnn.onnx")
    >>> result.predicted_tensors, result.predicted_elements, result.bn_status
    (14, 1006, 'uncalibrated')
    >>> ghn_onnx.inspect("tests/fixtures/frameworks/torch_cnn.onnx").coverage_excluding_statistics
    1.0

Importing the package is cheap: the API loads torch and onnx on first use (PEP 562).
"""

from ghn_onnx.errors import CheckpointError, GhnOnnxError, ModelLoadError, UnsupportedModelError
from ghn_onnx.version import __version__

_PIPELINE = frozenset({"load_ghn", "predict", "predict_files", "PredictOptions", "Prediction"})
_REPORT = frozenset({"inspect", "Report"})
_EXPLAIN = frozenset({"explain", "Explanation"})

__all__ = sorted({"__version__", "GHN", "GhnOnnxError", "ModelLoadError", "UnsupportedModelError",
                  "CheckpointError"} | _PIPELINE | _REPORT | _EXPLAIN)


def __getattr__(name: str):
    """The API's names, imported on first access (they need torch and onnx)."""
    if name in _PIPELINE:
        from ghn_onnx import pipeline as module
    elif name in _REPORT:
        from ghn_onnx.report import inspection as module
    elif name in _EXPLAIN:
        from ghn_onnx.report import explain as module
    elif name == "GHN":
        from ghn_onnx.ghn import model as module
    elif name in ("torch", "keras", "flax"):  # the submodule itself: ghn_onnx.torch.init_(module, example_input)
        import importlib

        return importlib.import_module(f"ghn_onnx.{name}")
    else:
        raise AttributeError(f"module 'ghn_onnx' has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value  # later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
