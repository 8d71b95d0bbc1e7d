"""The calibration modes (:func:`ghn_onnx.bn.calibration.calibrate_bn` says what each measures), in a
module of their own so that the command line lists them without importing onnx."""

from __future__ import annotations

from typing import Literal

CalibrationMode = Literal["one-pass", "two-pass", "sequential"]
#: How :func:`~ghn_onnx.bn.calibration.calibrate_bn` may measure; the first is the default.
CALIBRATION_MODES: tuple[str, ...] = ("one-pass", "two-pass", "sequential")
