"""``ghn-onnx inspect`` on real exports: text and JSON reports, drawings, version and help."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner
from conftest import PARITY_MODELS, file_digest
from onnx_builders import conv_model, save

from ghn_onnx import __version__
from ghn_onnx.cli import main
from ghn_onnx.graph.primitives import Primitive


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("name", PARITY_MODELS)
def test_inspect_fixture_json(parity_dir, name):
    path = parity_dir / f"{name}.onnx"
    ref = json.loads((parity_dir / f"{name}.graph.json").read_text())
    expected = json.loads((parity_dir / "config.json").read_text())["models"][name]
    result = invoke("inspect", str(path), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report["primitives"]) == [p.label for p in Primitive]
    assert report["graph"]["nodes"] == expected["nodes"] == sum(report["primitives"].values())
    assert report["graph"]["edges"] == len(ref["edges"])
    assert report["graph"]["edges_with_virtual"] == ref["n_edges_with_virtual"]
    params = report["parameters"]
    # The reference predicts exactly these tensors; BN statistics are never among them.
    assert params["predicted"] == {"tensors": expected["tensors"], "elements": expected["params"]}
    groups = ("predicted", "statistics", "unsupported", "other")
    assert sum(params[g]["elements"] for g in groups) == params["stored_float"]["elements"]
    assert sum(params[g]["tensors"] for g in groups) == params["stored_float"]["tensors"]
    assert report["warnings"] == [] and report["unsupported"] == {} and report["bn_folded"] is False


def test_inspect_text_report(parity_dir):
    result = invoke("inspect", str(parity_dir / "resnet18.onnx"))
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith("resnet18.onnx: 52 nodes, 59 edges, ")
    assert "  conv           21" in out and "  bn             20" in out
    assert "calibrated, not predicted" in out
    assert "100.00% of stored float elements, statistics excluded" in out
    assert out.rstrip().endswith("warnings\n  (none)")


def test_inspect_draws_png_and_svg(tmp_path, parity_dir):
    model = parity_dir / "deepnets_6.onnx"
    before = file_digest(model)
    png, svg = tmp_path / "g.png", tmp_path / "g.svg"
    result = invoke("inspect", str(model), "--json", "--png", str(png), "--svg", str(svg))
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)  # the "wrote" lines go to stderr, so stdout stays JSON
    assert f"wrote {png}" in result.stderr and f"wrote {svg}" in result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in svg.read_bytes()[:1000]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "g.svg"]  # no temporary files left
    assert file_digest(model) == before


def test_missing_matplotlib_is_one_line(tmp_path, monkeypatch):
    # A None entry makes its import fail; submodules too, as earlier tests may have loaded them.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] or ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    path = save(conv_model(), tmp_path / "m.onnx")
    result = invoke("inspect", str(path), "--svg", str(tmp_path / "g.svg"))
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last == "Error: drawing needs matplotlib: pip install 'ghn-onnx[viz]'"
    assert "Traceback" not in result.output
    assert not (tmp_path / "g.svg").exists()


def test_image_path_in_a_missing_folder_is_bad_usage(tmp_path):
    """A folder that does not exist is the caller's mistake (exit 2, README), found before work."""
    path = save(conv_model(), tmp_path / "m.onnx")
    result = invoke("inspect", str(path), "--png", str(tmp_path / "no" / "such" / "dir" / "g.png"))
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [result.output.strip().splitlines()[-1]]
    assert result.output.strip().startswith("Error: ") and "does not exist" in result.output


def test_unwritable_image_path_is_one_line(tmp_path):
    """What the file system refuses is an output that cannot be written (exit 1)."""
    path = save(conv_model(), tmp_path / "m.onnx")
    result = invoke("inspect", str(path), "--png", "/proc/ghn_onnx_test.png")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("Error: ")
    assert "Traceback" not in result.output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"ghn-onnx, version {__version__}"


def test_help_documents_exit_codes():
    for args in ([], ["inspect"]):
        result = invoke(*args, "--help")
        assert result.exit_code == 0
        assert "Exit codes: 0 ok" in result.output


@pytest.mark.slow
def test_inspect_dynamo_export_warns_bn_folded(dynamo_resnet18):
    before = file_digest(dynamo_resnet18)
    result = invoke("inspect", str(dynamo_resnet18), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["bn_folded"] is True
    assert any(w.startswith("BN appears folded") for w in report["warnings"])
    assert report["primitives"]["bn"] == 0 and report["primitives"]["conv"] == 21
    assert report["parameters"]["coverage_of_stored_float"] == 1.0
    assert file_digest(dynamo_resnet18) == before
    text = invoke("inspect", str(dynamo_resnet18))
    assert "BN appears folded" in text.output
