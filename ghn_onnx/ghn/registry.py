"""Named checkpoints: the public GHNs by name, the cache they are converted into, and how a name
resolves (``--checkpoint NAME``, ``ghn_onnx.load_ghn(NAME)``, ``ghn-onnx checkpoints``).

* :data:`REGISTRY`: one table of :class:`NamedCheckpoint` rows, the data of what exists: the
  checkpoint shipped in the package and the reference implementations' released files (ghn3's on
  the Hugging Face hub, ppuda's in its GitHub repository). Each row holds the configuration its
  file must convert to, so a download that converts to anything else is refused even where no
  sha256 is published (none is, for these files: ``sha256`` stays ``None`` rather than a guess;
  a hub file is checked against the sha256 the hub records for it).
* The cache: ``$GHN_ONNX_HOME`` (default ``$XDG_CACHE_HOME/ghn-onnx``, else
  ``~/.cache/ghn-onnx``) holds ``checkpoints/<name>.safetensors``, our converted file. The raw
  download goes to ``downloads/`` under a temporary name and is removed once converted: the
  safetensors file holds the same weights (ghn3-XL's raw file is 2.5 GB), and records the raw
  file's sha256 (``source_sha256``) in its metadata.
* :func:`resolve`: ``None`` → the shipped file; an existing file → itself; a name → the cached
  file, else (online) download, check the sha256 where one is published, convert once, cache;
  offline (``GHN_ONNX_OFFLINE=1``, ``HF_HUB_OFFLINE=1``, ``offline=True``) or on a failed
  download, one :class:`~ghn_onnx.errors.CheckpointError` line naming the file to fetch, where
  from, and the ``ghn-onnx convert-checkpoint`` command that puts it in the cache.

Downloads: hub files through ``huggingface_hub.hf_hub_download`` (the optional ``hub`` extra,
imported only when a hub file is fetched); plain URLs through :mod:`urllib` with a tqdm progress
bar, into a temporary file. :func:`download_url`, :func:`download_hub` and :func:`hub_sha256`
(the sha256 the hub records for a file) are the only functions that touch the network (tests
replace them).
"""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ghn_onnx.errors import CheckpointError, OutputError
from ghn_onnx.ghn import checkpoint
from ghn_onnx.ghn.config import GHNConfig

#: Environment switches that keep every download off.
OFFLINE_VARIABLES = ("GHN_ONNX_OFFLINE", "HF_HUB_OFFLINE")
#: How long a plain download may wait for the server, in seconds.
URL_TIMEOUT_S = 60


@dataclass(frozen=True)
class NamedCheckpoint:
    """One named GHN: what it is, where its file comes from, what it must convert to.

    Attributes:
        name: what ``--checkpoint`` takes.
        family, variant: ``"GHN-2"`` / ``"GHN-3"`` and its size or data set (as
            :class:`~ghn_onnx.ghn.reference_formats.Inferred` names them).
        dataset: what it was trained on.
        parameters: its parameter count (published, and equal to a GHN of ``config``: tested).
        licence: as stated by the repository that distributes the file.
        config: the configuration the file must convert to.
        hub: ``(repo_id, filename)`` on the Hugging Face hub, or ``None``.
        url: a plain download URL, or ``None``.
        revision: the hub revision (branch, tag or commit).
        sha256: of the file as distributed, where published; ``None`` otherwise.
        shipped: inside the package (no download, no cache).
    """

    name: str
    family: str
    variant: str
    dataset: str
    parameters: int
    licence: str
    config: GHNConfig
    hub: tuple[str, str] | None = None
    url: str | None = None
    revision: str = "main"
    sha256: str | None = None
    shipped: bool = False

    @property
    def file_name(self) -> str:
        """The distributed file's name (what to fetch)."""
        if self.hub is not None:
            return self.hub[1]
        if self.url is not None:
            return self.url.rsplit("/", 1)[-1]
        return f"{self.name}.safetensors"

    @property
    def source(self) -> str:
        """Where the file comes from, as a URL a browser or ``curl`` can fetch."""
        if self.hub is not None:
            return f"https://huggingface.co/{self.hub[0]}/resolve/{self.revision}/{self.hub[1]}"
        return self.url or "shipped in the package"


_GHN3 = dict(family="GHN-3", dataset="ImageNet", licence="MIT", revision="main")
_GHN3_CONFIG = dict(num_classes=1000, hypernet="transformer", rules="ghn3", ve=True, layernorm=True)
_HUB = "SamsungSAILMontreal/ghn3"
_PPUDA = "https://github.com/facebookresearch/ppuda/raw/main/checkpoints/"

#: Every named checkpoint. GHN-3's four sizes (GHN2_FACTS §7; hub files and their MIT licence as
#: the hub repository and ghn3's README state them); ppuda's two GHN-2s (its README's "Available
#: GHNs", MIT; its GHN-1 and MLP files are left out: they need weight normalisation off, which a
#: reference file cannot show); the checkpoint this package ships, trained here (RESULTS.md).
REGISTRY: tuple[NamedCheckpoint, ...] = (
    NamedCheckpoint("ghn2_cifar10", "GHN-2", "CIFAR-10", "CIFAR-10 (trained by this project)", 1_620_764, "MIT",
                    GHNConfig(), shipped=True),
    NamedCheckpoint("ppuda-ghn2-cifar10", "GHN-2", "CIFAR-10", "CIFAR-10", 1_620_764, "MIT",
                    GHNConfig(), url=_PPUDA + "ghn2_cifar10.pt"),
    NamedCheckpoint("ppuda-ghn2-imagenet", "GHN-2", "ImageNet", "ImageNet", 2_319_720, "MIT",
                    GHNConfig(max_shape=(64, 64, 16, 16), num_classes=1000), url=_PPUDA + "ghn2_imagenet.pt"),
    NamedCheckpoint("ghn3-t", variant="T", parameters=6_906_632, hub=(_HUB, "ghn3tm8.pt"),
                    config=GHNConfig(max_shape=(64, 64, 16, 16), hid=64, layers=3, heads=8, **_GHN3_CONFIG), **_GHN3),
    NamedCheckpoint("ghn3-s", variant="S", parameters=35_810_368, hub=(_HUB, "ghn3sm8.pt"),
                    config=GHNConfig(max_shape=(128, 128, 16, 16), hid=128, layers=5, heads=16, **_GHN3_CONFIG),
                    **_GHN3),
    NamedCheckpoint("ghn3-l", variant="L", parameters=214_668_960, hub=(_HUB, "ghn3lm8.pt"),
                    config=GHNConfig(max_shape=(256, 256, 16, 16), hid=256, layers=12, heads=16, **_GHN3_CONFIG),
                    **_GHN3),
    NamedCheckpoint("ghn3-xl", variant="XL", parameters=654_365_184, hub=(_HUB, "ghn3xlm16.pt"),
                    config=GHNConfig(max_shape=(384, 384, 16, 16), hid=384, layers=24, heads=16, **_GHN3_CONFIG),
                    **_GHN3),
)

#: The registry by name.
CHECKPOINTS: dict[str, NamedCheckpoint] = {c.name: c for c in REGISTRY}
#: The name of the checkpoint shipped in the package (``--checkpoint`` default).
SHIPPED = next(c.name for c in REGISTRY if c.shipped)


# -- the cache -----------------------------------------------------------------------------------

def cache_home() -> Path:
    """``$GHN_ONNX_HOME``, else ``$XDG_CACHE_HOME/ghn-onnx``, else ``~/.cache/ghn-onnx``."""
    home = os.environ.get("GHN_ONNX_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ghn-onnx"


def cached_path(entry: NamedCheckpoint, home: Path | None = None) -> Path:
    """Where ``entry``'s converted file lives: the package's own file for the shipped one."""
    if entry.shipped:
        shipped = checkpoint.default_checkpoint()
        if shipped is None:
            raise CheckpointError("no trained checkpoint ships with this version yet: pass a checkpoint "
                                  "(--checkpoint GHN.safetensors; see `ghn-onnx train` and "
                                  "`ghn-onnx convert-checkpoint`)")
        return shipped
    return (home or cache_home()) / "checkpoints" / f"{entry.name}.safetensors"


def offline_switch(offline: bool | None = None) -> str | None:
    """Why downloads are off (``"offline=True"``, ``"GHN_ONNX_OFFLINE=1"``, ``"HF_HUB_OFFLINE=1"``),
    or ``None`` when they are allowed."""
    if offline:
        return "offline=True"
    for var in OFFLINE_VARIABLES:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]}"
    return None


def how_to_fetch(entry: NamedCheckpoint, home: Path | None = None) -> str:
    """What to download, from where, and the command that converts it into the cache."""
    target = cached_path(entry, home)
    return (f"download {entry.file_name} from {entry.source}, then run `mkdir -p {target.parent} && "
            f"ghn-onnx convert-checkpoint {entry.file_name} -o {target}`")


# -- resolution ----------------------------------------------------------------------------------

def resolve(name_or_path: str | os.PathLike | None = None, *, offline: bool | None = None,
            home: Path | None = None, log: Callable[[str], None] | None = None, progress: bool = True) -> Path:
    """The checkpoint file for ``name_or_path``: ``None`` the shipped one; an existing file (or
    anything with a folder or a suffix: a path) itself; a :data:`CHECKPOINTS` name its cached file,
    fetched and converted first if need be (:func:`fetch`).

    Raises:
        CheckpointError: an unknown name; a name not cached while downloads are off or fail; a
            download whose sha256 or configuration is not the registry's (nothing is cached).
        OutputError: the cache cannot be written.
    """
    if name_or_path is None:
        return cached_path(CHECKPOINTS[SHIPPED])
    text = os.fspath(name_or_path)
    path = Path(text)
    if text in CHECKPOINTS and not path.exists():
        entry = CHECKPOINTS[text]
        cached = cached_path(entry, home)
        if entry.shipped:
            return cached
        if cached.is_file():
            return _checked(entry, cached)
        return fetch(entry, home=home, offline=offline, log=log, progress=progress)
    if path.exists() or path.suffix or os.sep in text or (os.altsep and os.altsep in text):
        return path
    raise CheckpointError(f"{text}: no such checkpoint file, and no checkpoint has that name (names: "
                          f"{', '.join(CHECKPOINTS)}; `ghn-onnx checkpoints` lists them)")


def _checked(entry: NamedCheckpoint, path: Path) -> Path:
    """``path`` if its header holds ``entry``'s configuration (a file converted by hand into the
    cache could be another GHN); an unreadable file is left to :func:`checkpoint.load` to report."""
    try:
        config = checkpoint.read_config(path)
    except CheckpointError:
        return path
    if config != entry.config:
        raise CheckpointError(f"{path}: the cached {entry.name} holds a GHN with {config}, expected "
                              f"{entry.config}: remove it, then {how_to_fetch(entry, path.parents[1])}")
    return path


def config_of(name_or_path: str | os.PathLike | None = None) -> GHNConfig:
    """The configuration ``name_or_path`` resolves to, without downloading anything: a name's from
    the registry, a file's from its header (``inspect`` needs only the class count)."""
    if name_or_path is None or os.fspath(name_or_path) in CHECKPOINTS and not Path(name_or_path).exists():
        return CHECKPOINTS[SHIPPED if name_or_path is None else os.fspath(name_or_path)].config
    return checkpoint.read_config(resolve(name_or_path))


def fetch(entry: NamedCheckpoint, *, home: Path | None = None, offline: bool | None = None,
          log: Callable[[str], None] | None = None, progress: bool = True) -> Path:
    """Download ``entry``'s file, check it, convert it and cache the result; the cached path.

    The sha256 of the download is compared with the registry's where one is published, else, for
    a hub file, with the one the hub records for it (its LFS object's); the converted
    configuration always is. Either mismatch is an error and nothing is cached. The raw
    download is removed afterwards (its sha256 is kept in the converted file's metadata)."""
    from ghn_onnx.ghn import reference_formats

    home = home or cache_home()
    target = cached_path(entry, home)
    switch = offline_switch(offline)
    if switch is not None:
        raise CheckpointError(f"{entry.name}: not in the cache ({target}) and downloads are off ({switch}): "
                              f"{how_to_fetch(entry, home)}")
    downloads = home / "downloads"
    try:
        downloads.mkdir(parents=True, exist_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{home}: cannot create the checkpoint cache ({exc.strerror or exc}); set "
                          "GHN_ONNX_HOME to a writable folder") from None
    say = log or (lambda message: None)
    say(f"downloading {entry.file_name} from {entry.source}")
    expected, by = entry.sha256, "the registry"
    try:
        if expected is None and entry.hub is not None:
            expected, by = hub_sha256(entry), "the hub"
        raw = (download_hub(entry, downloads) if entry.hub is not None
               else download_url(entry.url, downloads, entry.file_name, progress))
    except CheckpointError:
        raise
    except Exception as exc:  # urllib, http.client and the hub client raise many types
        raise CheckpointError(f"{entry.name}: download failed ({checkpoint.first_line(exc)}): "
                              f"{how_to_fetch(entry, home)}") from None
    try:
        digest = checkpoint.file_sha256(raw)
        if expected is not None and digest != expected.lower():
            raise CheckpointError(f"{entry.name}: {entry.file_name} has sha256 {digest}, expected {expected} "
                                  f"(from {by}): a corrupt or changed download, not cached")
        ghn, found = reference_formats.load(raw)
        if ghn.config != entry.config:
            raise CheckpointError(f"{entry.name}: {entry.file_name} is a {found.describe()} with {ghn.config}, "
                                  f"expected {entry.config}: not cached")
        checkpoint.save(ghn, target, extra={"name": entry.name, "converted_from": entry.file_name,
                                            "source": entry.source, "source_sha256": digest})
    finally:
        _remove(raw)
    say(f"converted {entry.file_name} ({found.describe()}, sha256 {digest}) -> {target}")
    return target


# -- downloads (the only network access) -----------------------------------------------------------

def download_url(url: str, folder: Path, file_name: str, progress: bool = True) -> Path:
    """``url`` streamed into a new temporary file in ``folder`` (named like ``file_name``, so its
    suffix says its format), with a tqdm progress bar on stderr; the file's path."""
    from tqdm import tqdm

    stem, suffix = os.path.splitext(file_name)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{stem}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=file_name, disable=not progress) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except BaseException:
        _remove(Path(tmp))
        raise
    return Path(tmp)


def download_hub(entry: NamedCheckpoint, folder: Path) -> Path:
    """``entry``'s hub file through ``huggingface_hub.hf_hub_download`` (its own progress bar),
    into ``folder``; the file's path."""
    repo_id, file_name = entry.hub
    hub = _hub_client(entry)
    return Path(hub.hf_hub_download(repo_id=repo_id, filename=file_name, revision=entry.revision, local_dir=folder))


def hub_sha256(entry: NamedCheckpoint) -> str | None:
    """The sha256 the hub records for ``entry``'s file (its LFS object), ``None`` if it records none."""
    repo_id, file_name = entry.hub
    infos = _hub_client(entry).HfApi().get_paths_info(repo_id, [file_name], revision=entry.revision)
    lfs = getattr(infos[0], "lfs", None) if infos else None
    return getattr(lfs, "sha256", None) or (lfs.get("sha256") if isinstance(lfs, dict) else None)


def _hub_client(entry: NamedCheckpoint) -> Any:
    """The ``huggingface_hub`` module (the optional ``hub`` extra), imported when first needed."""
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(f"{entry.name}: downloading from the Hugging Face hub needs huggingface_hub "
                              f"(pip install 'ghn-onnx[hub]'), or {how_to_fetch(entry)}") from None
    return huggingface_hub


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# -- listing ---------------------------------------------------------------------------------------

def listing(home: Path | None = None) -> list[dict[str, Any]]:
    """Every named checkpoint with its cache state, in registry order (``ghn-onnx checkpoints
    --json``): the shipped file's sha256 is computed, a cached file's ``source_sha256`` read from
    its metadata; nothing is downloaded."""
    rows = []
    for entry in REGISTRY:
        try:
            path = cached_path(entry, home)
        except CheckpointError:
            path = None
        present = path is not None and path.is_file()
        rows.append({
            "name": entry.name,
            "family": entry.family,
            "variant": entry.variant,
            "dataset": entry.dataset,
            "parameters": entry.parameters,
            "licence": entry.licence,
            "source": entry.source,
            "file": entry.file_name,
            "sha256": checkpoint.file_sha256(path) if entry.shipped and present else entry.sha256,
            "shipped": entry.shipped,
            "cached": str(path) if present else None,
            "cached_source_sha256": _source_sha256(path) if present and not entry.shipped else None,
            "path": str(path) if path is not None else None,
        })
    return rows


def _source_sha256(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("source_sha256")
    except Exception:  # an unreadable cached file is reported when it is loaded, not here
        return None


def format_listing(rows: list[dict[str, Any]], home: Path | None = None) -> str:
    """The text of ``ghn-onnx checkpoints``: one row per checkpoint, then where each comes from."""
    header = ("name", "GHN", "data set", "parameters", "licence", "status")
    table = [header] + [(r["name"], f"{r['family']}-{r['variant']}", r["dataset"].split(" (")[0],
                         f"{r['parameters']:,}", r["licence"],
                         "shipped" if r["shipped"] else "cached" if r["cached"] else "not cached") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i != 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             .rstrip() for row in table]
    lines += ["", "sources"]
    for r in rows:
        sha = r["sha256"] or "not published"
        lines.append(f"  {r['name']}: {r['path'] if r['shipped'] else r['source']} (sha256 {sha})")
    lines += ["", f"cache: {(home or cache_home()) / 'checkpoints'} ($GHN_ONNX_HOME); a name not cached is "
                  "downloaded and converted on first use, unless GHN_ONNX_OFFLINE=1 or HF_HUB_OFFLINE=1"]
    return "\n".join(lines)

