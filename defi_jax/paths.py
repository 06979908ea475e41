"""One file layer for local paths and object-store URIs (``gs://bucket/...``), on :mod:`etils.epath`.

Everything the project writes outside Orbax (``config.json``, ``metrics.jsonl``, TensorBoard events, sample
GIFs) goes through here, so a workdir may be a local folder or a bucket. epath reads and writes ``gs://``
through ``tf.io.gfile`` when TensorFlow is installed, else through fsspec (``gcsfs``).

Writes are atomic: a local file is written under a temporary name in the same folder and renamed over the
target, so a reader (or a run killed mid-write) never sees half a file; an object-store object only appears
once its upload completes, so it is written directly (a rename there is a copy plus a delete).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import IO

from etils import epath

_SCHEME_SEP = "://"


def is_remote(path: str | os.PathLike) -> bool:
    """True for URIs such as ``gs://bucket/dir``, False for local paths."""
    return _SCHEME_SEP in os.fspath(path)


def abspath(path: str | os.PathLike) -> str:
    """A local path made absolute (``~`` expanded); a URI unchanged. Orbax needs absolute paths."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def join(path: str | os.PathLike, *parts: str) -> str:
    """``os.path.join`` that also joins URIs with ``/``."""
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.join(path, *parts)
    return "/".join([path.rstrip("/"), *(p.strip("/") for p in parts)])


def _p(path: str | os.PathLike) -> epath.Path:
    return epath.Path(path)


def exists(path: str | os.PathLike) -> bool:
    return _p(path).exists()


def isdir(path: str | os.PathLike) -> bool:
    return _p(path).is_dir()


def makedirs(path: str | os.PathLike) -> None:
    """Creates ``path`` and its parents; a no-op where it exists (and on object stores, which have none)."""
    _p(path).mkdir(parents=True, exist_ok=True)


def listdir(path: str | os.PathLike) -> list[str]:
    """The names (not paths) in folder ``path``, sorted."""
    return sorted(p.name for p in _p(path).iterdir())


def remove(path: str | os.PathLike, missing_ok: bool = False) -> None:
    _p(path).unlink(missing_ok=missing_ok)


def open(path: str | os.PathLike, mode: str = "r") -> IO:  # noqa: A001  (mirrors the builtin)
    """A file object on ``path``; ``mode`` is one of r, w, a (+ b). Object stores cannot append."""
    return _p(path).open(mode)


def read_bytes(path: str | os.PathLike) -> bytes:
    return _p(path).read_bytes()


def read_text(path: str | os.PathLike) -> str:
    return _p(path).read_text()


@contextlib.contextmanager
def _atomic_writer(path: str | os.PathLike):
    """A binary file object that lands at ``path`` only when the block ends normally (see the module
    docstring); creates the parent folder."""
    path = os.fspath(path)
    parent = os.path.dirname(path) if not is_remote(path) else path.rsplit("/", 1)[0]
    if parent:
        makedirs(parent)
    if is_remote(path):
        with open(path, "wb") as f:
            yield f
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (see the module docstring); creates the parent folder."""
    with _atomic_writer(path) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def copy(src: str | os.PathLike, dst: str | os.PathLike, chunk_bytes: int = 64 * 2**20) -> None:
    """Copies one file, across backends too (e.g. a local staging file to ``gs://``), streamed in chunks (a
    weight shard is never held whole in memory); atomic like writes."""
    import shutil

    with open(src, "rb") as f, _atomic_writer(dst) as g:
        shutil.copyfileobj(f, g, chunk_bytes)


def rmtree(path: str | os.PathLike, missing_ok: bool = False) -> None:
    """Removes folder ``path`` and everything under it (every object under the prefix on an object store)."""
    p = _p(path)
    if not p.exists():
        if missing_ok:
            return
        raise FileNotFoundError(f"{os.fspath(path)}: no such folder")
    p.rmtree()


def upload_tree(local_dir: str | os.PathLike, dest: str | os.PathLike, *, last: tuple[str, ...] = ()) -> list[str]:
    """Copies every file under the local folder ``local_dir`` to ``dest`` (a URI or a local folder), each file
    atomically; the top-level files named in ``last`` go after all the others, so a reader that finds one of
    them (a manifest, a summary) finds the whole folder. Files already under ``dest`` and not in ``local_dir``
    are left alone. Returns the relative paths copied, in order."""
    local_dir = os.fspath(local_dir)
    rels = sorted(os.path.relpath(os.path.join(d, f), local_dir)
                  for d, _, files in os.walk(local_dir) for f in files)
    rels = [r for r in rels if r not in last] + [r for r in last if r in rels]
    for rel in rels:
        copy(os.path.join(local_dir, rel), join(dest, *rel.split(os.sep)))
    return rels


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, *, last: tuple[str, ...] = ("manifest.json", "config.json")):
    """Yields a temporary local folder to fill; when the block ends normally it replaces ``final``, when it
    raises it is removed and ``final`` is left as it was.

    A local ``final`` gets the folder renamed into place (never half-written); an old folder there is first
    renamed aside and removed only once the new one is in place (put back if the block fails between the two
    renames), so even a process killed at any point leaves a complete folder: the new one at ``final``, or the
    old one there or aside as ``<staging folder>.old``. An object-store ``final``
    (``gs://...``) gets the old objects under it removed and the folder uploaded file by file, the top-level
    files named in ``last`` after the others: a reader that finds the manifest finds a complete folder."""
    import shutil
    import tempfile

    if is_remote(final):
        tmp = tempfile.mkdtemp(prefix="defi_jax_staged_")
        try:
            yield tmp
            rmtree(final, missing_ok=True)
            upload_tree(tmp, final, last=last)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    final = os.path.abspath(os.fspath(final))
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=os.path.dirname(final))
    old = f"{tmp}.old"
    try:
        yield tmp
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if os.path.exists(old) and not os.path.exists(final):   # failed between the two renames: put it back
            os.replace(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
