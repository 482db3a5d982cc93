"""Local directory backend: one file per object, atomic and durable stores.

`store` writes a temporary file in the target directory, fsyncs it, renames it over the
name and fsyncs the directory, so a crash leaves the old object or the new one, never a
torn one. Temporary files start with ".tmp-" and are invisible to `list`.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from appliance.repository.backend import (
    BackendPermanent,
    ObjectInfo,
    ObjectNotFound,
    check_name,
    classify_oserror,
)

_TMP = ".tmp-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBackend:
    """Objects as files below `root` (created with mode 0700)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def create(self) -> None:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            if any(self.root.iterdir()):
                raise BackendPermanent(f"{self.root}: directory is not empty")
            _fsync_dir(self.root.parent)
        except OSError as err:
            raise classify_oserror(err, str(self.root)) from err

    def open(self) -> None:
        if not self.root.is_dir():
            raise ObjectNotFound(f"{self.root}: no such repository directory")

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            with open(self._path(name), "rb") as f:
                if offset:
                    f.seek(offset)
                return f.read() if length is None else f.read(length)
        except OSError as err:
            raise classify_oserror(err, name) from err

    def _mkdirs(self, directory: Path) -> None:
        # Create missing parents one by one and fsync each parent, so the new directory
        # entry is durable before an object inside it is reported stored.
        missing = []
        d = directory
        while not d.is_dir():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                d.mkdir(mode=0o700)
            except FileExistsError:
                continue
            _fsync_dir(d.parent)

    def store(self, name: str, data: bytes | memoryview) -> None:
        path = self._path(name)
        tmp = path.parent / f"{_TMP}{secrets.token_hex(8)}"
        try:
            self._mkdirs(path.parent)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data).cast("B")
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as err:
            try:
                tmp.unlink()
            except OSError:
                pass  # best effort: a leftover temp file is invisible and harmless
            raise classify_oserror(err, name) from err

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            path.unlink()
            _fsync_dir(path.parent)
        except OSError as err:
            raise classify_oserror(err, name) from err

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        out = []
        try:
            for dirpath, dirnames, filenames in os.walk(self.root):
                rel = os.path.relpath(dirpath, self.root)
                base = "" if rel == "." else rel.replace(os.sep, "/") + "/"
                for fn in filenames:
                    if fn.startswith(_TMP):
                        continue
                    name = base + fn
                    if name.startswith(prefix):
                        out.append(ObjectInfo(name, os.stat(os.path.join(dirpath, fn)).st_size))
        except OSError as err:
            raise classify_oserror(err, f"list {prefix!r}") from err
        return iter(out)

    def info(self, name: str) -> ObjectInfo:
        try:
            return ObjectInfo(name, self._path(name).stat().st_size)
        except OSError as err:
            raise classify_oserror(err, name) from err
