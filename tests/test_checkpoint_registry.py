"""Named checkpoints (ghn_onnx/ghn/registry.py): the registry's data, `ghn-onnx checkpoints`,
resolution offline and online, downloads checked and converted into a temporary cache.

No test touches the network: plain downloads are served from ``file://`` URLs (urllib's real
path), the hub client is replaced by a function that copies a local file, and every test runs
with ``GHN_ONNX_HOME`` in a temporary folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import urllib.error

import pytest
import torch
from click.testing import CliRunner

import ghn_onnx
from ghn_onnx.cli import main
from ghn_onnx.errors import CheckpointError
from ghn_onnx.ghn import checkpoint, registry
from ghn_onnx.ghn.config import GHNConfig
from ghn_onnx.ghn.model import GHN

TINY = GHNConfig(hid=8, max_shape=(8, 8, 3, 3), num_classes=10)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty cache, downloads allowed, and downloaders that fail the test if called."""
    home = tmp_path / "home"
    monkeypatch.setenv("GHN_ONNX_HOME", str(home))
    for var in registry.OFFLINE_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    """A small GHN-2 in ppuda's training-checkpoint format (``state_dict`` + ``config``) and its sha256."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ref") / "tiny_ghn2.pt"
    torch.save({"state_dict": GHN(TINY).state_dict(), "config": {"weight_norm": True, "ve": True,
                                                                   "layernorm": True}}, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def add_entry(monkeypatch, **fields) -> registry.NamedCheckpoint:
    entry = registry.NamedCheckpoint(**{"name": "tiny", "family": "GHN-2", "variant": "tiny", "dataset": "none",
                                        "parameters": 0, "licence": "MIT", "config": TINY, **fields})
    monkeypatch.setitem(registry.CHECKPOINTS, entry.name, entry)
    return entry


def no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(registry, "download_url", refuse)
    monkeypatch.setattr(registry, "download_hub", refuse)
    monkeypatch.setattr(registry, "hub_sha256", refuse)


# -- the registry's data -------------------------------------------------------------------------

@pytest.mark.parametrize("entry", registry.REGISTRY, ids=lambda e: e.name)
def test_each_entry_is_consistent(entry):
    """The parameter count is the published one and that of a GHN with the entry's
    configuration (built on the meta device); a download source unless shipped."""
    assert sum(math.prod(s) for s in checkpoint.expected_shapes(entry.config).values()) == entry.parameters
    assert entry.shipped or (entry.hub is None) != (entry.url is None)
    assert entry.source.startswith("https://") or entry.shipped
    assert entry.sha256 is None or len(entry.sha256) == 64


def test_names_and_the_shipped_checkpoint():
    assert len(registry.CHECKPOINTS) == len(registry.REGISTRY)
    assert [e.name for e in registry.REGISTRY if e.shipped] == [registry.SHIPPED]
    shipped = registry.CHECKPOINTS[registry.SHIPPED]
    assert checkpoint.load(registry.cached_path(shipped)).config == shipped.config
    assert registry.resolve(None) == registry.resolve(registry.SHIPPED) == checkpoint.default_checkpoint()
    hub = {e.name: e.hub for e in registry.REGISTRY if e.hub}
    assert hub["ghn3-t"] == ("SamsungSAILMontreal/ghn3", "ghn3tm8.pt")
    assert hub["ghn3-xl"] == ("SamsungSAILMontreal/ghn3", "ghn3xlm16.pt")


def test_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("GHN_ONNX_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert registry.cache_home() == tmp_path / "ghn-onnx"
    monkeypatch.setenv("GHN_ONNX_HOME", str(tmp_path / "h"))
    assert registry.cached_path(registry.CHECKPOINTS["ghn3-t"]) == tmp_path / "h" / "checkpoints" / "ghn3-t.safetensors"


# -- listing -------------------------------------------------------------------------------------

def test_checkpoints_command_text_and_json(home, monkeypatch):
    no_downloads(monkeypatch)
    res = CliRunner().invoke(main, ["checkpoints"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split() == ["name", "GHN", "data", "set", "parameters", "licence", "status"]
    for entry in registry.REGISTRY:
        row = next(line for line in lines if line.startswith(entry.name + " "))
        assert row.endswith("shipped" if entry.shipped else "not cached")
        assert f"{entry.parameters:,}" in row
    assert "https://huggingface.co/SamsungSAILMontreal/ghn3/resolve/main/ghn3tm8.pt" in res.output
    assert str(home / "checkpoints") in res.output

    res = CliRunner().invoke(main, ["checkpoints", "--json"])
    assert res.exit_code == 0
    rows = json.loads(res.output)
    assert [r["name"] for r in rows] == [e.name for e in registry.REGISTRY]
    shipped = next(r for r in rows if r["shipped"])
    assert shipped["sha256"] == checkpoint.file_sha256(checkpoint.default_checkpoint())
    assert all(r["cached"] is None and r["sha256"] is None for r in rows if not r["shipped"])
    assert rows[3]["licence"] == "MIT" and rows[3]["family"] == "GHN-3" and rows[3]["parameters"] == 6_906_632


# -- offline -------------------------------------------------------------------------------------

@pytest.mark.parametrize("switch", ["GHN_ONNX_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_names_the_file_and_the_command(home, monkeypatch, switch):
    no_downloads(monkeypatch)
    monkeypatch.setenv(switch, "1")
    target = home / "checkpoints" / "ghn3-t.safetensors"
    with pytest.raises(CheckpointError) as info:
        registry.resolve("ghn3-t")
    message = str(info.value)
    assert "\n" not in message and f"{switch}=1" in message
    assert "download ghn3tm8.pt from https://huggingface.co/SamsungSAILMontreal/ghn3/resolve/main/ghn3tm8.pt" in message
    assert f"ghn-onnx convert-checkpoint ghn3tm8.pt -o {target}" in message
    assert not target.exists()


def test_offline_cli_is_one_line_exit_2(home, monkeypatch):
    no_downloads(monkeypatch)
    monkeypatch.setenv("GHN_ONNX_OFFLINE", "1")
    res = CliRunner().invoke(main, ["predict", "tests/fixtures/frameworks/torch_cnn.onnx", "-o",
                                    str(home.parent / "out.onnx"), "--checkpoint", "ppuda-ghn2-imagenet"])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and res.output.startswith("Error: ppuda-ghn2-imagenet: not in the cache")
    assert "https://github.com/facebookresearch/ppuda/raw/main/checkpoints/ghn2_imagenet.pt" in res.output


def test_offline_instructions_work(home, monkeypatch, reference_file, tmp_path):
    """The command the offline message gives puts the file where the name resolves to."""
    no_downloads(monkeypatch)
    monkeypatch.setenv("GHN_ONNX_OFFLINE", "1")
    entry = add_entry(monkeypatch, url="https://example.invalid/tiny_ghn2.pt")
    with pytest.raises(CheckpointError) as info:
        registry.resolve("tiny")
    command = str(info.value).split("run `", 1)[1].rstrip("`")
    mkdir, convert = command.split(" && ")
    registry.cached_path(entry).parent.mkdir(parents=True)  # what `mkdir -p` does
    assert mkdir == f"mkdir -p {registry.cached_path(entry).parent}"
    args = convert.split()[1:]
    args[1] = str(reference_file[0])  # the downloaded file
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert registry.resolve("tiny") == registry.cached_path(entry)
    assert ghn_onnx.load_ghn("tiny").config == TINY


def test_a_cached_file_of_another_ghn_is_refused(home, monkeypatch):
    no_downloads(monkeypatch)
    entry = add_entry(monkeypatch, url="https://example.invalid/tiny_ghn2.pt")
    target = registry.cached_path(entry)
    target.parent.mkdir(parents=True)
    checkpoint.save(GHN(dataclasses.replace(TINY, num_classes=5)), target)
    with pytest.raises(CheckpointError, match="holds a GHN with .*num_classes=5.*remove it"):
        registry.resolve("tiny")


# -- downloads -----------------------------------------------------------------------------------

def test_url_download_checked_converted_cached_once(home, monkeypatch, reference_file):
    path, sha = reference_file
    entry = add_entry(monkeypatch, url=path.as_uri(), sha256=sha)
    messages = []
    got = registry.resolve("tiny", log=messages.append, progress=False)
    assert got == registry.cached_path(entry) == home / "checkpoints" / "tiny.safetensors"
    assert checkpoint.load(got).config == TINY
    assert messages[0] == f"downloading tiny_ghn2.pt from {path.as_uri()}"
    assert sha in messages[1]
    assert list((home / "downloads").iterdir()) == []  # the raw download is removed
    from safetensors import safe_open

    with safe_open(str(got), framework="pt") as f:
        meta = f.metadata()
    assert meta["source_sha256"] == sha and meta["name"] == "tiny" and meta["converted_from"] == "tiny_ghn2.pt"
    # the same weights as the reference file
    state = torch.load(path, weights_only=True)["state_dict"]
    loaded = checkpoint.load(got).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    no_downloads(monkeypatch)  # cached: no second download
    assert registry.resolve("tiny") == got


def test_wrong_sha256_caches_nothing(home, monkeypatch, reference_file):
    path, sha = reference_file
    entry = add_entry(monkeypatch, url=path.as_uri(), sha256="0" * 64)
    with pytest.raises(CheckpointError, match=f"has sha256 {sha}, expected 0{{64}} \\(from the registry\\): a corrupt"):
        registry.resolve("tiny")  # with its progress bar
    assert not registry.cached_path(entry).exists()
    assert list((home / "downloads").iterdir()) == []


def fake_hub(monkeypatch, path, recorded_sha256):
    """huggingface_hub's download and file listing, served from ``path``; the calls made."""
    import huggingface_hub
    from huggingface_hub.hf_api import BlobLfsInfo

    calls = []

    def fake_hf_hub_download(repo_id, filename, revision, local_dir):
        calls.append(("download", repo_id, filename, revision))
        out = local_dir / filename
        out.write_bytes(path.read_bytes())
        return str(out)

    def fake_get_paths_info(self, repo_id, paths, revision=None):
        calls.append(("info", repo_id, tuple(paths), revision))
        lfs = BlobLfsInfo(size=path.stat().st_size, sha256=recorded_sha256, pointer_size=130)
        return [types.SimpleNamespace(path=paths[0], lfs=lfs)]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "get_paths_info", fake_get_paths_info)
    monkeypatch.setattr(registry, "download_url", lambda *a, **k: pytest.fail("not a URL entry"))
    return calls


def test_hub_download_through_hf_hub_download(home, monkeypatch, reference_file):
    path, sha = reference_file
    calls = fake_hub(monkeypatch, path, sha)
    entry = add_entry(monkeypatch, hub=("someone/ghns", "tiny.pt"), revision="v1")
    assert entry.source == "https://huggingface.co/someone/ghns/resolve/v1/tiny.pt"
    assert ghn_onnx.load_ghn("tiny").config == TINY  # the Python API resolves names the same way
    # no sha256 in the registry: the one the hub records for the file is checked
    assert calls == [("info", "someone/ghns", ("tiny.pt",), "v1"), ("download", "someone/ghns", "tiny.pt", "v1")]
    assert not (home / "downloads" / "tiny.pt").exists()


def test_hub_download_with_another_sha256_than_the_hub_records(home, monkeypatch, reference_file):
    path, sha = reference_file
    fake_hub(monkeypatch, path, "f" * 64)
    entry = add_entry(monkeypatch, hub=("someone/ghns", "tiny.pt"))
    with pytest.raises(CheckpointError, match=f"has sha256 {sha}, expected f{{64}} \\(from the hub\\): a corrupt"):
        registry.resolve("tiny")
    assert not registry.cached_path(entry).exists() and not (home / "downloads" / "tiny.pt").exists()


def test_a_download_of_another_ghn_caches_nothing(home, monkeypatch, reference_file):
    path, _ = reference_file
    entry = add_entry(monkeypatch, url=path.as_uri(), config=dataclasses.replace(TINY, num_classes=1000))
    with pytest.raises(CheckpointError, match="tiny_ghn2.pt is a GHN-2-10 classes, s=3 with .*expected .*not cached"):
        registry.resolve("tiny", progress=False)
    assert not registry.cached_path(entry).exists()


def test_a_failed_download_says_what_to_fetch(home, monkeypatch):
    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(registry, "download_url", unreachable)
    res = CliRunner().invoke(main, ["eval", "--checkpoint", "ppuda-ghn2-cifar10", "--data", "nowhere"])
    assert res.exit_code == 2
    progress, error = res.output.splitlines()
    assert progress.startswith("downloading ghn2_cifar10.pt from https://github.com/facebookresearch/ppuda/")
    assert error.startswith("Error: ppuda-ghn2-cifar10: download failed (<urlopen error [Errno -3]")
    assert "download ghn2_cifar10.pt from https://github.com/facebookresearch/ppuda/raw/main/checkpoints/" in error
    assert not (home / "checkpoints" / "ppuda-ghn2-cifar10.safetensors").exists()


# -- paths stay paths ----------------------------------------------------------------------------

def test_paths_and_unknown_names(home, monkeypatch, tmp_path):
    no_downloads(monkeypatch)
    assert registry.resolve(tmp_path / "missing.safetensors") == tmp_path / "missing.safetensors"
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        ghn_onnx.load_ghn(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint has that name .*ghn3-t"):
        registry.resolve("ghn4-xxl")
    local = tmp_path / "ghn3-t"  # a file named like a checkpoint is the file
    local.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert registry.resolve("ghn3-t") == local.relative_to(tmp_path)


def test_an_unwritable_cache_is_exit_1(monkeypatch, tmp_path, reference_file):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("GHN_ONNX_HOME", str(blocker / "home"))  # under a regular file: cannot be created
    add_entry(monkeypatch, url=reference_file[0].as_uri())
    no_downloads(monkeypatch)
    res = CliRunner().invoke(main, ["predict", "tests/fixtures/frameworks/torch_cnn.onnx", "-o",
                                    str(tmp_path / "out.onnx"), "--checkpoint", "tiny"])
    assert res.exit_code == 1
    assert res.output.startswith(f"Error: {blocker / 'home'}: cannot create the checkpoint cache")
    assert "GHN_ONNX_HOME" in res.output and not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("name, weights", [
    ("ppuda-ghn2-cifar10", "reference/ghn2-parity/ghn2_random_cifar10.npz"),
    ("ppuda-ghn2-imagenet", "reference/ghn3-parity/ghn2-imagenet/ghn2_random_imagenet.npz"),
    ("ghn3-t", "reference/ghn3-parity/ghn3_random_T.npz"),
])
def test_reference_weights_convert_to_the_registry_configuration(name, weights, home, monkeypatch, shared_dir):
    """Each family's reference weights (the parity fixtures: the released files' key names and
    shapes, random values), fetched as the registry fetches them, convert to the configuration
    the registry holds for that family: the check a real download goes through."""
    source = shared_dir / weights
    entry = dataclasses.replace(registry.CHECKPOINTS[name], hub=None, url=source.as_uri(),
                                sha256=hashlib.sha256(source.read_bytes()).hexdigest())
    monkeypatch.setitem(registry.CHECKPOINTS, name, entry)
    got = registry.resolve(name, progress=False)
    assert got == home / "checkpoints" / f"{name}.safetensors"
    assert checkpoint.read_config(got) == registry.config_of(name) == entry.config
