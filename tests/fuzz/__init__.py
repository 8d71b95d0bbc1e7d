"""Hostile-input fuzzing of the ``ghn-onnx`` CLI: a corpus builder (:mod:`.corpus`), a runner that
executes each case in its own process with a timeout and a memory cap (:mod:`.runner`), and the
test that classifies the runs (``tests/test_fuzz.py``)."""
