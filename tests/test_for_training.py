"""``predict --for-training``: noise on tiled (repeated) rows, optional orthogonalisation, never
the classifier; deterministic; recorded in the metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.ghn.decode.rules import classifier_nodes
from ghn_onnx.pipeline import load_ghn, predict, predict_graphs, prepare
from ghn_onnx.torch import export
from ghn_onnx.writeback.for_training import ForTraining, for_training, nearest_orthogonal, repeated_rows


class Wide(nn.Module):
    """Wider than GHN-2's 64-channel block, so the decoder tiles its output rows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 128, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(128)
        self.conv2 = nn.Conv2d(128, 160, 3, padding=1)
        self.fc = nn.Linear(160, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x)).mean((2, 3))
        return self.fc(x)


@pytest.fixture(scope="module")
def wide():
    torch.manual_seed(0)
    model, graph = prepare(export(Wide(), torch.randn(2, 3, 16, 16)), "wide")
    return model, graph, predict_graphs(load_ghn(), [graph])[0]


def test_repeated_rows_are_exact_repeats_after_the_first():
    w = np.array([[1, 2], [3, 4], [1, 2], [1, 2.001], [3, 4]], dtype=np.float32)
    assert repeated_rows(w).tolist() == [2, 4]
    assert repeated_rows(np.eye(3, dtype=np.float32)).tolist() == []


def test_tiled_rows_get_noise_and_nothing_else_changes(wide):
    _, graph, pred = wide
    before = {k: v.copy() for k, v in pred.items()}
    out, report = for_training(graph, pred, ForTraining(noise=0.01, orthogonal_from=None, rescale=False))
    assert all(np.array_equal(pred[k], before[k]) for k in pred)  # inputs not modified
    cls_w, cls_b = classifier_nodes(graph)
    cls = {p.tensor for i in (cls_w, cls_b) if i is not None for p in graph.nodes[i].params}
    assert cls and all(np.array_equal(out[k], pred[k]) for k in cls)
    tiled = [k for k, v in pred.items() if v.ndim >= 2 and len(repeated_rows(v))]
    assert set(tiled) >= {"conv1.weight", "conv2.weight"}
    assert report.noised_tensors == len(tiled)
    assert report.noised_rows == sum(len(repeated_rows(pred[k])) for k in tiled)
    for k, v in pred.items():
        if k in tiled:
            rows = repeated_rows(v)
            assert len(repeated_rows(out[k])) == 0
            kept = np.setdiff1d(np.arange(len(v)), rows)
            assert np.array_equal(out[k][kept], v[kept])  # first copies stay as predicted
            delta = (out[k] - v)[rows]
            assert 0.5 < delta.std() / (0.01 * v.std()) < 1.5
        else:  # 1-D norms and biases, untiled weights, the classifier
            assert np.array_equal(out[k], v)


def test_deterministic_and_seeded_per_tensor(wide):
    _, graph, pred = wide
    noise_only = dict(orthogonal_from=None)
    a, _ = for_training(graph, pred, ForTraining(seed=3, **noise_only))
    b, _ = for_training(graph, dict(reversed(list(pred.items()))), ForTraining(seed=3, **noise_only))
    c, _ = for_training(graph, pred, ForTraining(seed=4, **noise_only))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv2.weight"], c["conv2.weight"])


def test_orthogonalisation_keeps_the_norm_and_spares_the_classifier(wide):
    _, graph, pred = wide
    out, report = for_training(graph, pred, ForTraining(noise=0.0, orthogonal_from=0.0, normalised_only=False, rescale=False))
    assert report.orthogonalised == 2 and report.noised_rows == 0
    for k in ("conv1.weight", "conv2.weight"):
        w = out[k].reshape(len(out[k]), -1).astype(np.float64)
        assert np.isclose(np.linalg.norm(w), np.linalg.norm(pred[k]), rtol=1e-5)
        s = np.linalg.svd(w, compute_uv=False)
        assert s.max() / s.min() < 1.0001  # all singular values equal: (semi-)orthogonal
    assert np.array_equal(out["fc.weight"], pred["fc.weight"])
    deeper, report = for_training(graph, pred, ForTraining(noise=0.0, orthogonal_from=0.5, normalised_only=False, rescale=False))
    assert report.orthogonalised == 1 and np.array_equal(deeper["conv1.weight"], pred["conv1.weight"])


def test_nearest_orthogonal_of_an_orthogonal_matrix_is_itself():
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((6, 6)))
    assert np.allclose(nearest_orthogonal((2 * q).astype(np.float32)), 2 * q, atol=1e-5)


@pytest.mark.parametrize("options", [dict(noise=-1.0), dict(noise=float("nan")), dict(orthogonal_from=1.5)])
def test_bad_options_are_one_line_errors(options):
    with pytest.raises(GhnOnnxError):
        ForTraining(**options)


def test_predict_records_it_in_the_metadata_and_is_reproducible(wide):
    model = wide[0]
    a = predict(model, load_ghn(), for_training=ForTraining(seed=1))
    b = predict(model, load_ghn(), for_training=ForTraining(seed=1))
    plain = predict(model, load_ghn())
    meta = {p.key: p.value for p in a.model.metadata_props}
    record = json.loads(meta["ghn_onnx.for_training"])
    assert record["seed"] == 1 and record["noise"] == 0.01 and record["orthogonal_from"] == 0.0
    assert record["orthogonalised"] == 1 and record["normalised_only"] is True  # conv1 (BN after it), not conv2
    assert "ghn_onnx.for_training" not in {p.key for p in plain.model.metadata_props}
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert a.model.SerializeToString() != plain.model.SerializeToString()


def test_cli_for_training_writes_the_record(tmp_path):
    from click.testing import CliRunner

    from ghn_onnx.cli import main
    import onnx

    src = "tests/fixtures/frameworks/torch_cnn.onnx"
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["predict", src, "-o", str(out), "--for-training", "--noise", "0.05",
                                       "--noise-seed", "7"])
    assert result.exit_code == 0, result.output
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    record = json.loads(meta["ghn_onnx.for_training"])
    assert (record["noise"], record["seed"], record["orthogonal_from"]) == (0.05, 7, 0.0)


@pytest.mark.parametrize("args", [["--noise", "0.1"], ["--no-orthogonal"], ["--rescale"], ["--perturb", "0.5"],
                                  ["--for-training", "--noise", "-1"], ["--for-training", "--perturb", "2"],
                                  ["--for-training", "--orthogonal-from", "2"],
                                  ["--for-training", "--orthogonal-from", "0.5", "--no-orthogonal"]])
def test_cli_for_training_usage_errors_are_one_line(tmp_path, args):
    from click.testing import CliRunner

    from ghn_onnx.cli import main

    result = CliRunner().invoke(main, ["predict", "tests/fixtures/frameworks/torch_cnn.onnx", "-o",
                                       str(tmp_path / "o.onnx"), *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_the_default_orthogonalises_normalised_layers_and_leaves_no_copies(wide):
    """conv1 feeds bn1 and is orthogonalised; conv2 feeds a ReLU and the pooling, so it keeps its
    predicted spectrum and only gets noise on its copies."""
    _, graph, pred = wide
    out, report = for_training(graph, pred)
    first_copies = np.setdiff1d(np.arange(len(pred["conv2.weight"])), repeated_rows(pred["conv2.weight"]))
    assert report.orthogonalised == 1
    assert np.array_equal(out["conv2.weight"][first_copies], pred["conv2.weight"][first_copies])
    # conv1 (128 x 27) is tall: its polar factor keeps the copies (its rows are combinations of
    # the weight's), and the noise separates them, as it does conv2's.
    assert report.noised_tensors == 2 and report.noised_rows == (len(repeated_rows(pred["conv1.weight"]))
                                                                 + len(repeated_rows(pred["conv2.weight"])))
    assert all(len(repeated_rows(out[k])) == 0 for k in ("conv1.weight", "conv2.weight"))
    assert np.array_equal(out["fc.weight"], pred["fc.weight"])


def test_cli_no_orthogonal_is_noise_only(tmp_path):
    from click.testing import CliRunner

    from ghn_onnx.cli import main
    import onnx

    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["predict", "tests/fixtures/frameworks/torch_cnn.onnx", "-o", str(out),
                                       "--for-training", "--no-orthogonal"])
    assert result.exit_code == 0, result.output
    record = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["ghn_onnx.for_training"])
    assert record["orthogonal_from"] is None and record["orthogonalised"] == 0


def test_cli_rescale_and_perturb_reach_the_record(tmp_path):
    from click.testing import CliRunner

    from ghn_onnx.cli import main
    import onnx

    records = []
    for i, flags in enumerate([[], ["--no-rescale", "--perturb", "0.25"]]):
        out = tmp_path / f"out{i}.onnx"
        result = CliRunner().invoke(main, ["predict", "tests/fixtures/frameworks/torch_cnn.onnx", "-o", str(out),
                                           "--for-training", *flags])
        assert result.exit_code == 0, result.output
        records.append(json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}
                                  ["ghn_onnx.for_training"]))
    assert (records[0]["rescale"], records[0]["perturb"]) == (True, 0.0) and records[0]["rescaled"] > 0
    assert (records[1]["rescale"], records[1]["perturb"], records[1]["rescaled"]) == (False, 0.25, 0)
    assert records[1]["perturbed"] > 0


def test_normalised_weights_follow_biases_and_weights_to_a_norm():
    """A weight counts as normalised when everything its output reaches before any other node is
    a bias, a further weight, or a BN / LN; a fork where one branch is not normalised is not."""
    from ghn_onnx.graph.graph import Graph, Node
    from ghn_onnx.graph.primitives import Primitive as P
    from ghn_onnx.writeback.for_training import normalised_weights

    kinds = [P.INPUT, P.CONV, P.BN, P.CONV, P.BIAS, P.CONV, P.LN, P.CONV, P.SUM, P.CONV, P.BN, P.SUM]
    edges = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (2, 9), (9, 10), (9, 11), (10, 11)]
    g = Graph([Node(k, f"n{i}") for i, k in enumerate(kinds)], edges)
    # 1 -> BN; 3 -> bias -> 5 -> LN; 5 -> LN; 7 -> sum; 9 -> BN and -> sum (a fork)
    assert normalised_weights(g) == {1, 3, 5}


def test_rescale_restores_the_init_norm_and_keeps_what_batch_statistics_compute(wide):
    """conv1 feeds bn1: rescaled with its bias to E‖W_init‖ = sqrt(numel / (3 fan_in)), and the
    network in train mode (batch statistics) computes the same; conv2 (ReLU after it) and the
    classifier are not touched."""
    _, graph, pred = wide
    out, report = for_training(graph, pred, ForTraining(noise=0.0, orthogonal_from=None, rescale=True))
    w = pred["conv1.weight"]
    factor = np.sqrt(w.size / (3 * np.prod(w.shape[1:]))) / np.linalg.norm(w)
    assert report.rescaled == 1 and abs(factor - 1) > 0.05  # the prediction is not at the init's norm
    np.testing.assert_allclose(out["conv1.weight"], w * factor, rtol=1e-6)
    np.testing.assert_allclose(out["conv1.bias"], pred["conv1.bias"] * factor, rtol=1e-6)
    assert all(np.array_equal(out[k], pred[k]) for k in pred if not k.startswith("conv1."))
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    logits = []
    for values in (pred, out):
        torch.manual_seed(0)
        net = Wide().train()
        net.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in values.items()},
                            strict=False)
        with torch.no_grad():
            logits.append(net(x))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
    record = json.loads(report.metadata()["for_training"])
    assert record["rescale"] is True and record["rescaled"] == 1


def test_perturb_mixes_in_a_seeded_default_init_draw_at_the_weight_norm(wide):
    """perturb=p: W <- (1-p) W + p R, R a draw of W's default init scaled to ‖W‖, seeded per
    tensor; the classifier, norms and biases stay as predicted."""
    _, graph, pred = wide
    post = ForTraining(noise=0.0, orthogonal_from=None, perturb=0.5, rescale=False)
    out, report = for_training(graph, pred, post)
    again, _ = for_training(graph, pred, post)
    other, _ = for_training(graph, pred, ForTraining(noise=0.0, orthogonal_from=None, perturb=0.5, seed=1, rescale=False))
    assert report.perturbed == 2  # conv1, conv2; not fc
    for k in ("conv1.weight", "conv2.weight"):
        w, r = pred[k], (out[k] - 0.5 * pred[k]) / 0.5
        np.testing.assert_allclose(np.linalg.norm(r), np.linalg.norm(w), rtol=1e-4)
        bound = np.sqrt(3) * np.linalg.norm(w) / np.sqrt(w.size)  # a uniform draw at that norm
        assert np.abs(r).max() <= bound * 1.05 and abs(np.corrcoef(r.ravel(), w.ravel())[0, 1]) < 0.1
        assert np.array_equal(out[k], again[k]) and not np.array_equal(out[k], other[k])
    assert all(np.array_equal(out[k], pred[k]) for k in pred if k not in ("conv1.weight", "conv2.weight"))


@pytest.mark.parametrize("perturb", [-0.1, 1.5, float("nan")])
def test_perturb_out_of_range_is_refused(perturb):
    with pytest.raises(GhnOnnxError):
        ForTraining(perturb=perturb)
