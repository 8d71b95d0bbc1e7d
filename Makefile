# make demo: export a CIFAR ResNet-18, predict its parameters with the shipped GHN, calibrate BN,
# evaluate against random init (CIFAR-10 from $GHN_ONNX_DATA or ../shared/data); make test: tests.
# Both create .venv on first use; the stamp file keeps later runs from reinstalling
# (it is redone when pyproject.toml changes).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test

demo: $(STAMP)
	$(BIN)/python -m ghn_onnx.examples.demo --out out
	$(BIN)/ghn-onnx inspect out/resnet18.onnx --svg out/resnet18.svg

test: $(STAMP)
	$(BIN)/python -m pytest -q

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e '.[dev]'
	touch $@
