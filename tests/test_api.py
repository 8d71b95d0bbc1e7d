"""The public Python API (``ghn_onnx.load_ghn / predict / predict_files / inspect``): its
documented examples run, it shares the CLI's code and outputs, and importing it is cheap."""

from __future__ import annotations

import doctest
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

import ghn_onnx
from ghn_onnx import pipeline
from ghn_onnx.cli import main
from ghn_onnx.errors import CheckpointError, GhnOnnxError
from ghn_onnx.ghn import GHN, GHNConfig, checkpoint
from ghn_onnx.report import inspection

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path("tests") / "fixtures" / "frameworks" / "torch_cnn.onnx"  # as the examples name it


@pytest.fixture
def checkout(tmp_path, monkeypatch) -> Path:
    """A folder laid out like a checkout's root for what the examples read, as the working
    directory (the examples write their outputs there)."""
    (tmp_path / FIXTURE).parent.mkdir(parents=True)
    shutil.copy(REPO / FIXTURE, tmp_path / FIXTURE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def readme_api_section() -> str:
    readme = (REPO / "README.md").read_text()
    return readme.split("## Python API", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("module", [ghn_onnx, pipeline, inspection], ids=lambda m: m.__name__)
def test_docstring_examples_run(module, checkout):
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, module.__name__) if t.examples]
    assert tests, f"{module.__name__} has no examples"
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed (see the output above)"


def test_readme_example_runs(checkout):
    text = readme_api_section()
    test = doctest.DocTestParser().get_doctest(text, {}, "README.md: Python API", "README.md", 0)
    assert len(test.examples) >= 4
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
    assert (checkout / "torch_cnn_ghn.onnx").is_file()


def test_import_is_cheap_and_lazy():
    code = ("import sys, ghn_onnx; heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'ghn_onnx.pipeline') "
            "if m in sys.modules]; assert not heavy, heavy; "
            "assert ghn_onnx.predict is __import__('ghn_onnx.pipeline').pipeline.predict; "
            "assert {'predict', 'load_ghn', 'inspect', '__version__'} <= set(dir(ghn_onnx))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ghn_onnx.nope  # noqa: B018


def test_api_and_cli_write_the_same_bytes(checkout):
    res = CliRunner().invoke(main, ["predict", str(FIXTURE), "-o", "cli.onnx", "--json"])
    assert res.exit_code == 0, res.output
    [pred] = ghn_onnx.predict_files([FIXTURE], ["api.onnx"])
    assert (checkout / "api.onnx").read_bytes() == (checkout / "cli.onnx").read_bytes()
    summaries = [json.loads(res.output)[0], pred.summary()]
    for s in summaries:
        del s["seconds"], s["output"]
    assert summaries[0] == summaries[1]
    assert pred.model.SerializeToString() == (checkout / "api.onnx").read_bytes()


def test_predict_takes_a_model_or_a_path_and_options_or_keywords(checkout):
    ghn = ghn_onnx.load_ghn()
    from_path = ghn_onnx.predict(FIXTURE, ghn, ghn_onnx.PredictOptions(metadata={"run": "a"}))
    from_model = ghn_onnx.predict(onnx.load(FIXTURE), ghn, metadata={"run": "a"}, name="torch_cnn.onnx")
    assert from_path.model.SerializeToString() == from_model.model.SerializeToString()
    meta = {p.key: p.value for p in from_path.model.metadata_props}
    assert meta["ghn_onnx.run"] == "a" and "ghn_onnx.checkpoint_sha256" not in meta  # a GHN given: not stamped
    assert ghn_onnx.predict(onnx.load(FIXTURE), ghn).name == "model"
    with pytest.raises(TypeError, match="unknown option.*calibrate_images"):
        ghn_onnx.predict(FIXTURE, ghn, calibrate_images=4)


def test_calibration_option_returns_the_status(checkout):
    import numpy as np

    np.save("calib.npy", np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8))
    pred = ghn_onnx.predict(FIXTURE, calibrate="calib.npy", calibration_images=8, calibration_batch=4)
    assert pred.bn_status == "calibrated:8"
    assert {p.key: p.value for p in pred.model.metadata_props}["ghn_onnx.bn"] == "calibrated:8"


def test_options_are_frozen_values():
    opts = ghn_onnx.PredictOptions(metadata={"a": "1"})
    with pytest.raises(AttributeError):
        opts.seed = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        opts.metadata["b"] = "2"  # type: ignore[index]
    assert hash(opts) == hash(ghn_onnx.PredictOptions(metadata={"a": "2"}))  # metadata is not hashed


def test_a_ghn_on_another_device_is_refused():
    ghn = GHN(GHNConfig()).eval()
    with pytest.raises(GhnOnnxError, match="Expected the GHN on cuda"):
        ghn_onnx.predict(REPO / FIXTURE, ghn, device="cuda")


def test_load_ghn_by_name_and_errors(tmp_path):
    shipped = checkpoint.default_checkpoint()
    assert pipeline.resolve_checkpoint("ghn2_cifar10") == shipped
    assert ghn_onnx.load_ghn("ghn2_cifar10").config == ghn_onnx.load_ghn(shipped).config
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        ghn_onnx.load_ghn(tmp_path / "missing.safetensors")


def test_inspect_takes_a_model_or_a_path():
    a = ghn_onnx.inspect(REPO / FIXTURE)
    b = ghn_onnx.inspect(onnx.load(REPO / FIXTURE), name="torch_cnn.onnx")
    assert a.to_json() == b.to_json() and a.model == "torch_cnn.onnx"


# -- checkpoints written before GHNConfig lost its single-valued fields ------------------------

def _old_checkpoint(path: Path, **legacy) -> Path:
    """A checkpoint as earlier versions wrote it: ``hypernet`` and ``decoder`` in its config."""
    ghn = GHN(GHNConfig())
    config = {**json.loads(GHNConfig().to_json()), **legacy}
    save_file({k: v.contiguous() for k, v in ghn.state_dict().items()}, str(path),
              metadata={"format": checkpoint.FORMAT, "config": json.dumps(config, sort_keys=True)})
    return path


def test_shipped_checkpoint_is_a_default_ghn2_and_loads():
    """The shipped file is a GHN-2 of the default configuration; configurations written with the
    keys of older releases are held to the same rule by the run-folder test below."""
    from safetensors import safe_open

    with safe_open(str(checkpoint.default_checkpoint()), framework="pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])
    assert config["hypernet"] == "gatedgnn" and int(meta["trained_steps"]) > 0
    assert ghn_onnx.load_ghn().config == GHNConfig.from_dict(config) == GHNConfig()
    assert json.loads(GHNConfig().to_json())["hypernet"] == "gatedgnn"  # a field again (GHN-3's transformer)


def test_run_folder_checkpoint_with_legacy_keys_loads_and_resaves(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ghn = checkpoint.load(_old_checkpoint(run / "ghn.safetensors", hypernet="gatedgnn", decoder="conv"))
    checkpoint.save(ghn, run / "again.safetensors")
    assert checkpoint.load(run / "again.safetensors").config == ghn.config == GHNConfig()


@pytest.mark.parametrize("legacy, message", [({"hypernet": "mlp"}, "hypernet: expected one of gatedgnn, transformer"),
                                             ({"decoder": "mlp"}, "'decoder': only 'conv'")])
def test_other_legacy_values_are_refused(tmp_path, legacy, message):
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(_old_checkpoint(tmp_path / "ghn.safetensors", **legacy))
    with pytest.raises(CheckpointError, match="unknown GHN config keys: depth"):
        GHNConfig.from_dict({"depth": 3})


def test_the_old_calibration_batch_name_still_works_with_a_warning(tmp_path):
    """``batch_size`` was ``calibration_batch``'s name: taken, with a DeprecationWarning; both
    at once is an error (which one would win is not obvious)."""
    from ghn_onnx.pipeline import renamed_options

    with pytest.warns(DeprecationWarning, match="batch_size is now calibration_batch"):
        assert renamed_options({"batch_size": 4, "seed": 1}, "predict") == {"calibration_batch": 4, "seed": 1}
    with pytest.raises(TypeError, match="give calibration_batch only"):
        renamed_options({"batch_size": 4, "calibration_batch": 4}, "predict")
    with pytest.warns(DeprecationWarning):
        old = ghn_onnx.predict(FIXTURE, seed=0, batch_size=4)
    assert old.model == ghn_onnx.predict(FIXTURE, seed=0, calibration_batch=4).model


def test_predictions_come_back_in_one_copy_equal_to_one_copy_each():
    """The GPU route (one flat copy back, then views) gives the arrays the per-tensor route gives,
    shapes and values, for several graphs' predictions at once (checked here on CPU tensors)."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    preds = [{"a.weight": torch.randn(4, 3, 3, 3, generator=gen), "a.bias": torch.randn(4, generator=gen)},
             {}, {"fc.weight": torch.randn(10, 7, generator=gen)}]
    one = pipeline.host_arrays(preds, batched=True)
    each = pipeline.host_arrays(preds, batched=False)
    assert [list(p) for p in one] == [list(p) for p in each] == [["a.weight", "a.bias"], [], ["fc.weight"]]
    for p, q in zip(one, each):
        for k in p:
            assert p[k].shape == q[k].shape and p[k].dtype == q[k].dtype and (p[k] == q[k]).all()
    mixed = [{"a": torch.ones(2), "b": torch.ones(2, dtype=torch.float64)}]  # one dtype per copy: per tensor
    assert pipeline.host_arrays(mixed, batched=True)[0]["b"].dtype == np.float64
