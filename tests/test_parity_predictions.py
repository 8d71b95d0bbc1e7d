"""Predictions match the reference GHN-2 (ppuda) for the same weights, model by model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import PARITY_MODELS
from ghn_onnx.convert import convert_file
from ghn_onnx.ghn import checkpoint


@pytest.fixture(scope="module")
def reference_ghn(parity_dir):
    return checkpoint.load_reference(parity_dir / "ghn2_random_cifar10.npz")


def _check(pred: dict[str, torch.Tensor], expected) -> list[str]:
    names = sorted({k.split("::")[0] for k in expected.files})
    problems = []
    if set(pred) != set(names):
        problems.append(f"tensors differ: extra {sorted(set(pred) - set(names))[:3]}, "
                        f"missing {sorted(set(names) - set(pred))[:3]}")
    for name in names:
        if name not in pred:
            continue
        v = pred[name].detach().numpy()
        if tuple(v.shape) != tuple(expected[f"{name}::shape"]):
            problems.append(f"{name}: shape {v.shape} != {tuple(expected[f'{name}::shape'])}")
            continue
        norm = float(expected[f"{name}::norm"])
        if abs(float(np.linalg.norm(v)) - norm) > 1e-4 * max(norm, 1e-12):
            problems.append(f"{name}: norm {np.linalg.norm(v)} != {norm}")
        flat = v.ravel()
        if f"{name}::index" in expected.files:
            flat = flat[expected[f"{name}::index"]]
        diff = float(np.abs(flat - expected[f"{name}::values"].ravel()).max())
        if diff > 1e-4:
            problems.append(f"{name}: values differ by {diff}")
    return problems


@pytest.mark.parametrize("name", PARITY_MODELS)
def test_prediction_matches_reference(name, parity_dir, reference_ghn):
    graph = convert_file(parity_dir / f"{name}.onnx")
    expected = np.load(parity_dir / f"{name}.expected.npz")
    with torch.no_grad():
        fast = reference_ghn([graph])[0]
    assert _check(fast, expected) == []


@pytest.mark.parametrize("name", ["resnet18", "deepnets_9"])
def test_sequential_reference_matches_too(name, parity_dir, reference_ghn):
    graph = convert_file(parity_dir / f"{name}.onnx")
    with torch.no_grad():
        seq = reference_ghn([graph], sequential=True)[0]
    assert _check(seq, np.load(parity_dir / f"{name}.expected.npz")) == []


def test_batched_prediction_equals_single(parity_dir, reference_ghn):
    """Graphs of different sizes in one batch get exactly what they get alone (the GHN-3 dense
    batching bug of GHN2_FACTS §7 would break this)."""
    graphs = [convert_file(parity_dir / f"{n}.onnx") for n in ("deepnets_17", "resnet18", "deepnets_6")]
    with torch.no_grad():
        together = reference_ghn(graphs)
        alone = [reference_ghn([g])[0] for g in graphs]
    for a, b in zip(together, alone):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_level_path_with_autograd_matches_and_has_gradients(parity_dir, reference_ghn):
    """The training path (level-by-level PyTorch sweep, autograd on) computes the same values."""
    graph = convert_file(parity_dir / "deepnets_6.onnx")
    pred = reference_ghn([graph])[0]
    assert _check({k: v.detach() for k, v in pred.items()}, np.load(parity_dir / "deepnets_6.expected.npz")) == []
    loss = sum(v.square().sum() for v in pred.values())
    loss.backward()
    assert reference_ghn.gnn.gru.weight_ih.grad is not None
    assert torch.isfinite(reference_ghn.gnn.gru.weight_ih.grad).all()
    reference_ghn.zero_grad()
