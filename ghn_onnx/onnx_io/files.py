"""Files the tool reads and writes: regular files only, reads bounded before they start, outputs
that are never one of the inputs.

A FIFO given as a model blocks ``open``; a device (``/dev/zero``, or a link to it) reads without
end; an output "over" ``/dev/null`` would, as root, replace the device with a regular file. So a
path is checked for what it *is* before it is opened, reads go through the descriptor that was
checked (opened non-blocking), and their size is capped before the first byte is read.

Outputs: an existing output must be a regular file (or a symbolic link, which is replaced, never
written through) and must not be one of the inputs, under any name: the same path, a symbolic
link to it, or a hard link (same device and inode).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterable

from ghn_onnx.errors import GhnOnnxError, OutputError

# What a path that is not a regular file is, in words.
KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))
READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
CHUNK = 1 << 24  # bytes per read call


def kind(mode: int) -> str:
    """``"a FIFO"``, ``"a character device"``, ...: what a ``st_mode`` that is not a regular file is."""
    return next((name for test, name in KINDS if test(mode)), "not a regular file")


def regular_file_stat(path: str | os.PathLike, error: type[GhnOnnxError], what: str) -> os.stat_result:
    """``os.stat(path)`` (links followed) of a regular file, else ``error`` saying what it is."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path}: is a directory, expected {what}")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: is {kind(st.st_mode)}, not a regular file (expected {what})")
    return st


def open_regular_file(path: str | os.PathLike, error: type[GhnOnnxError], what: str) -> tuple[int, os.stat_result]:
    """A read-only descriptor of the regular file at ``path`` and its ``fstat`` (the caller closes
    it); anything else is refused with ``error`` before it is opened."""
    regular_file_stat(path, error, what)
    try:
        fd = os.open(path, READ_FLAGS)  # non-blocking: a FIFO swapped in since the stat cannot block
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)  # the file opened is the one checked
    except OSError as exc:
        os.close(fd)
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise error(f"{path}: is {kind(st.st_mode)}, not a regular file (expected {what})")
    return fd, st


def read_regular_file(path: str | os.PathLike, max_bytes: int, error: type[GhnOnnxError], what: str,
                      limit_reason: str) -> bytes:
    """The bytes of the regular file at ``path``, refusing anything else before opening it.

    Args:
        path: the file (symbolic links are followed; what they point to must be a regular file).
        max_bytes: a larger file is refused before any byte is read, and a file that grows past
            it while being read is refused too.
        error: the error type to raise.
        what: what the file should be, for messages (``"an .onnx file"``).
        limit_reason: ``max_bytes`` and why, for the message (``"the 2 GiB an ONNX file can hold"``).
    """
    fd, st = open_regular_file(path, error, what)
    try:
        if st.st_size > max_bytes:
            raise error(f"{path}: {st.st_size:,} bytes, more than {limit_reason}")
        chunks, total = [], 0
        # The first read asks for the whole file: one call, and a single chunk is returned by
        # the join below without a second copy (16 MB reads and their join cost 3x the read).
        first = True
        while True:
            want = max_bytes + 1 - total
            chunk = os.read(fd, min(st.st_size, want) if first and st.st_size else min(CHUNK, want))
            first = False
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise error(f"{path}: grew past {max_bytes:,} bytes while being read")
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    except MemoryError:
        raise error(f"{path}: not enough memory to read it ({st.st_size:,} bytes)") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def check_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output path the tool must not replace; return it as a :class:`Path`.

    Refused with :class:`GhnOnnxError` (bad usage): an empty name or one that names a folder
    (``""``, ``"."``, ``"dir/"``); any of ``inputs``, under any name (the same path, a symbolic
    or a hard link to it); a folder that does not exist; an existing entry that is not a regular
    file (a device, FIFO, socket or folder, directly or through a symbolic link). An entry the
    tool may not even look at gives :class:`OutputError`.
    """
    text = os.fspath(path)
    out = Path(text)
    if not text or out.name in ("", ".", "..") or text.endswith(os.sep):
        raise GhnOnnxError(f"{text!r}: not a file name (expected the path of a file to write)")
    target = _stat_or_none(out)
    for src in inputs:
        src_stat = _stat_or_none(Path(src))
        if out.resolve() == Path(src).resolve() or (target and src_stat and same_file(target, src_stat)):
            raise GhnOnnxError(f"{out}: refusing to overwrite the input model's files (it is {src}, or a link "
                               "to it); choose another output path")
    if not out.parent.is_dir():
        raise GhnOnnxError(f"{out}: directory {out.parent} does not exist")
    try:
        entry = os.lstat(out)
    except FileNotFoundError:
        return out
    except OSError as exc:
        raise OutputError(f"{out}: cannot write ({exc.strerror or exc})") from None
    if target is None:  # a dangling symbolic link: replacing it touches nothing else
        return out
    if not stat.S_ISREG(target.st_mode):
        via = " (through a symbolic link)" if stat.S_ISLNK(entry.st_mode) else ""
        raise GhnOnnxError(f"{out}: is {kind(target.st_mode)}{via}, not a regular file; outputs are "
                           "written as new regular files, choose another output path")
    return out


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None
