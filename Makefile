# make demo: export a CIFAR ResNet-18 and inspect it; make test: run the test suite.
# Both create .venv on first use; the stamp file keeps later runs from reinstalling
# (it is redone when pyproject.toml changes).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test

demo: $(STAMP)
	$(BIN)/python -m ghn_onnx.examples.export_resnet18 out/resnet18.onnx
	$(BIN)/ghn-onnx inspect out/resnet18.onnx --svg out/resnet18.svg

test: $(STAMP)
	$(BIN)/python -m pytest -q

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e '.[dev]'
	touch $@
