"""Shared fixtures: where the read-only shared data lives, and models the tests export."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The parity fixtures, by the names in <shared>/reference/ghn2-parity/config.json (a test checks
# that the two lists agree, so a new fixture cannot be missed).
PARITY_MODELS = ("resnet18", "mobilenet_v2", "deepnets_1", "deepnets_6", "deepnets_9", "deepnets_11",
                 "deepnets_17")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data folder: $GHN_ONNX_SHARED, else ``<repo>/../shared``.

    Missing data fails the tests instead of skipping them, so a CI run without the data cannot
    pass by running nothing.
    """
    path = Path(os.environ.get("GHN_ONNX_SHARED") or REPO.parent / "shared")
    if not (path / "reference" / "ghn2-parity").is_dir():
        pytest.fail(f"shared data not found at {path} (expected reference/ghn2-parity inside): "
                    "set GHN_ONNX_SHARED to the shared data folder", pytrace=False)
    return path


@pytest.fixture(scope="session")
def parity_dir(shared_dir: Path) -> Path:
    return shared_dir / "reference" / "ghn2-parity"


@pytest.fixture(scope="session")
def dynamo_resnet18(tmp_path_factory) -> Path:
    """torchvision ResNet-18 (10 classes, 32x32 input) from the dynamo exporter, weights in an
    external data file; the exporter folds BatchNorm into the convolutions."""
    import torch
    import torchvision

    path = tmp_path_factory.mktemp("dynamo") / "resnet18.onnx"
    model = torchvision.models.resnet18(num_classes=10).eval()
    torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=True, external_data=True,
                      verbose=False)
    return path


def file_digest(path: Path) -> str | None:
    """sha256 of a file's bytes, None if there is no such file."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
