"""Reference weight files (``ghn_onnx.ghn.reference_formats``): the configuration read off key
names and shapes (GHN-2 / GHN-3, CIFAR-10 / ImageNet, T / S / L / XL), both layouts of GHN-3's
structural tables, ghn3's pickled bare state dicts read by a restricted unpickler, hostile
pickles refused before anything runs, and ``ghn-onnx convert-checkpoint`` on them. No network."""

from __future__ import annotations

import collections
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ghn_onnx.cli import main
from ghn_onnx.errors import CheckpointError
from ghn_onnx.ghn import GHNConfig, checkpoint, reference_formats
from ghn_onnx.ghn.reference_formats import (LINEAR_DECODER_WEIGHTS, STRUCTURAL_TABLES, expected_shapes,
                                            infer_config)


@pytest.fixture(scope="session")
def ghn3_dir(shared_dir: Path) -> Path:
    path = shared_dir / "reference" / "ghn3-parity"
    if not (path / "ghn3_random_T.npz").is_file():
        pytest.fail(f"GHN-3 parity fixtures not found at {path}: set GHN_ONNX_SHARED", pytrace=False)
    return path


def reference_layout(config: GHNConfig, top_level_tables: bool = True) -> dict[str, tuple[int, ...]]:
    """The key → shape of a reference state dict for ``config``: ghn3's (decoder Linears 2-D,
    structural tables at the top level) for a transformer, ppuda's otherwise."""
    shapes = expected_shapes(config)
    if config.hypernet != "transformer":
        return shapes
    out = {}
    for k, v in shapes.items():
        if k in LINEAR_DECODER_WEIGHTS:
            v = v[:2]
        if top_level_tables and k.removeprefix("gnn.0.") in STRUCTURAL_TABLES:
            k = k.removeprefix("gnn.0.")
        out[k] = v
    return out


def ghn3_state(ghn3_dir: Path, top_level_tables: bool) -> collections.OrderedDict:
    z = np.load(ghn3_dir / "ghn3_random_T.npz")
    state = collections.OrderedDict()
    for k in z.files:
        name = k.removeprefix("gnn.0.") if top_level_tables and k.removeprefix("gnn.0.") in STRUCTURAL_TABLES else k
        state[name] = torch.from_numpy(z[k].copy())
    return state


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- configuration from key names and shapes -------------------------------------------------------

GHN3 = dict(num_classes=1000, weight_norm=True, ve=True, layernorm=True, hypernet="transformer", rules="ghn3")


@pytest.mark.parametrize("config, name", [
    (GHNConfig(), "GHN-2-CIFAR-10"),
    (GHNConfig(max_shape=(64, 64, 16, 16), num_classes=1000), "GHN-2-ImageNet"),
    (GHNConfig(ve=False, layernorm=False), "GHN-2-CIFAR-10"),  # GHN-1's switches
    (GHNConfig(max_shape=(64, 64, 16, 16), hid=64, layers=3, heads=8, **GHN3), "GHN-3-T"),
    (GHNConfig(max_shape=(128, 128, 16, 16), hid=128, layers=5, heads=16, **GHN3), "GHN-3-S"),
    (GHNConfig(max_shape=(256, 256, 16, 16), hid=256, layers=12, heads=16, **GHN3), "GHN-3-L"),
    (GHNConfig(max_shape=(384, 384, 16, 16), hid=384, layers=24, heads=16, **GHN3), "GHN-3-XL"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_configuration_is_read_off_the_shapes(config, name):
    for top in (True, False):
        inferred = infer_config(reference_layout(config, top))
        assert inferred.describe() == name and inferred.config == config


def test_a_state_dict_that_is_no_ghn_is_refused():
    shapes = expected_shapes(GHNConfig())
    with pytest.raises(CheckpointError, match="expected a GHN-2 or GHN-3 state dict with 'embed.weight'"):
        infer_config({k: v for k, v in shapes.items() if k != "embed.weight"})
    no_gnn = {k: v for k, v in shapes.items() if not k.startswith("gnn.")}
    with pytest.raises(CheckpointError, match=r"gated GNN \(gnn.gru.\*\) or transformer layers"):
        infer_config(no_gnn)
    odd = dict(shapes, **{"decoder.conv.2.weight": (4000, 256, 1, 1)})
    with pytest.raises(CheckpointError, match="decoder.conv.2 rows out·out"):
        infer_config(odd)


def test_fixture_files_infer_their_family(ghn3_dir, parity_dir):
    cases = [(parity_dir / "ghn2_random_cifar10.npz", "GHN-2-CIFAR-10", 1_620_764),
             (ghn3_dir / "ghn2-imagenet" / "ghn2_random_imagenet.npz", "GHN-2-ImageNet", 2_319_720),
             (ghn3_dir / "ghn3_random_T.npz", "GHN-3-T", 6_906_632)]
    for path, name, n_params in cases:
        ghn, inferred = reference_formats.load(path)
        assert inferred.describe() == name
        assert sum(p.numel() for p in ghn.parameters()) == n_params
    ghn2 = checkpoint.load_reference(parity_dir / "ghn2_random_cifar10.npz")
    assert same_weights(reference_formats.load(parity_dir / "ghn2_random_cifar10.npz")[0], ghn2)


# -- GHN-3's layouts and file formats ------------------------------------------------------------

@pytest.mark.parametrize("protocol", [2, 4])
def test_both_table_layouts_and_pickles_load_the_same_weights(ghn3_dir, tmp_path, protocol):
    """ghn3's released files: a pickle (joblib without compression is one) of a bare state dict,
    structural tables at the top level; the fixture's ``.npz`` keeps them in layer 0."""
    from_npz, _ = reference_formats.load(ghn3_dir / "ghn3_random_T.npz")
    for top in (True, False):
        path = tmp_path / f"ghn3_{top}.pt"
        path.write_bytes(pickle.dumps(ghn3_state(ghn3_dir, top), protocol=protocol))
        ghn, inferred = reference_formats.load(path)
        assert inferred.describe() == "GHN-3-T" and same_weights(ghn, from_npz)


def test_torch_zip_files_load_too(ghn3_dir, tmp_path):
    from_npz, _ = reference_formats.load(ghn3_dir / "ghn3_random_T.npz")
    bare, training = tmp_path / "bare.pt", tmp_path / "training.pt"
    torch.save(ghn3_state(ghn3_dir, True), bare)
    torch.save({"state_dict": ghn3_state(ghn3_dir, False), "epoch": 3,
                "config": {"hid": 64, "layers": 3, "heads": 8, "is_ghn2": False, "layernorm": True}}, training)
    for path in (bare, training):
        ghn, inferred = reference_formats.load(path)
        assert inferred.describe() == "GHN-3-T" and same_weights(ghn, from_npz)


def test_tables_in_both_places_are_refused(ghn3_dir, tmp_path):
    state = ghn3_state(ghn3_dir, False)
    state["input_dist_embed.weight"] = state["gnn.0.input_dist_embed.weight"].clone()
    path = tmp_path / "both.pt"
    path.write_bytes(pickle.dumps(state, protocol=4))
    with pytest.raises(CheckpointError, match="gnn.0.input_dist_embed.weight twice"):
        reference_formats.load(path)


def test_overrides_are_checked_against_the_weights(ghn3_dir):
    with pytest.raises(CheckpointError, match="has shape"):
        reference_formats.load(ghn3_dir / "ghn3_random_T.npz", {"num_classes": 10})
    ghn, _ = reference_formats.load(ghn3_dir / "ghn3_random_T.npz", {"weight_norm": False})
    assert ghn.config.weight_norm is False


# -- hostile files -----------------------------------------------------------------------------------

class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("wrap", ["bare", "in-a-state-dict", "in-a-training-dict"])
def test_a_pickle_that_would_run_a_command_is_refused_and_never_runs(tmp_path, wrap):
    marker = tmp_path / "pwned"
    evil = _Evil(marker)
    blob = {"bare": evil, "in-a-state-dict": collections.OrderedDict(w=torch.zeros(2), x=evil),
            "in-a-training-dict": {"state_dict": evil, "config": {"hid": 32}}}[wrap]
    path = tmp_path / "ghn3.pt"
    path.write_bytes(pickle.dumps(blob, protocol=4))
    with pytest.raises(CheckpointError, match=r"asks for (posix|os|nt)\.system.*refused \(nothing was run\)"):
        reference_formats.load(path)
    assert not marker.exists()
    res = CliRunner().invoke(main, ["convert-checkpoint", str(path), "-o", str(tmp_path / "g.safetensors")])
    assert res.exit_code == 2 and "refused" in res.output and not marker.exists()
    assert not (tmp_path / "g.safetensors").exists()


def test_other_globals_are_refused(tmp_path):
    path = tmp_path / "eval.pt"
    path.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")  # protocol 0: builtins.eval('1+1')
    with pytest.raises(CheckpointError, match="builtins.eval"):
        reference_formats.load(path)


def test_a_storage_holding_a_hostile_pickle_is_refused(tmp_path):
    """Storages are the bytes of a ``torch.save``, read with ``weights_only=True``."""
    import io

    marker = tmp_path / "pwned"
    inner = io.BytesIO()
    torch.save(_Evil(marker), inner, _use_new_zipfile_serialization=False)

    class Storage:
        def __reduce__(self):
            import torch.storage
            return (torch.storage._load_from_bytes, (inner.getvalue(),))

    path = tmp_path / "storage.pt"
    path.write_bytes(pickle.dumps(collections.OrderedDict(w=Storage()), protocol=4))
    with pytest.raises(CheckpointError, match="a storage cannot be read"):
        reference_formats.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [(b"\x1f\x8b\x08\x00rest", "compressed"), (b"\x80\x04garbage", "pickle"),
                                              (b"", "pickle")])
def test_unreadable_files_are_refused(tmp_path, content, message):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        reference_formats.load(path)


def test_npz_headers_are_checked_before_arrays_are_read(tmp_path):
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10 ** 6, 10 ** 6)})
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("embed.weight.npy", header.getvalue() + b"\x00" * 1024)
    with pytest.raises(CheckpointError, match="declares"):
        reference_formats.load(path)


# -- the command ---------------------------------------------------------------------------------

def test_convert_checkpoint_infers_ghn3_and_the_result_predicts_the_same(ghn3_dir, tmp_path):
    ref = tmp_path / "ghn3tm8.pt"
    ref.write_bytes(pickle.dumps(ghn3_state(ghn3_dir, True), protocol=4))
    out = tmp_path / "ghn3.safetensors"
    res = CliRunner().invoke(main, ["convert-checkpoint", str(ref), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "GHN-3-T" in res.output and "hypernet='transformer'" in res.output
    ghn = checkpoint.load(out)
    assert ghn.config.rules == "ghn3" and ghn.config.layers == 3 and ghn.config.heads == 8
    assert same_weights(ghn, reference_formats.load(ghn3_dir / "ghn3_random_T.npz")[0])


def test_convert_checkpoint_infers_ghn2_imagenet(ghn3_dir, tmp_path):
    out = tmp_path / "in.safetensors"
    res = CliRunner().invoke(main, ["convert-checkpoint", str(ghn3_dir / "ghn2-imagenet" / "ghn2_random_imagenet.npz"),
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "GHN-2-ImageNet" in res.output
    assert checkpoint.load(out).config == GHNConfig(max_shape=(64, 64, 16, 16), num_classes=1000)


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_plain_containers_unpickle(protocol):
    blob = {"list": [1, 2], "tuple": (3,), "set": {4}, "frozen": frozenset([5]), "bytes": b"\x00\xff"}
    assert reference_formats.read_pickle(pickle.dumps(blob, protocol=protocol), "x") == blob
