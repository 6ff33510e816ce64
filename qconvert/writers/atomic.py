"""Outputs are written under a temporary name beside their final path, fsynced, then renamed.
A failure or an interruption removes the temporary file: nothing half-written is left."""
from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

from qconvert.errors import OutputError


def output_error(path: Path, e: OSError) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"{path}: disk full while writing (no space left on device)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{path}: not writable ({e.strerror})")
    return OutputError(f"{path}: cannot write: {e.strerror or e}")


class AtomicFile:
    """A binary file that appears at `path` only when `commit()` succeeds; sha256 as written."""

    def __init__(self, path: Path, force: bool):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        self.sha256 = hashlib.sha256()
        self.size = 0
        if path.exists() and not force:
            raise OutputError(f"{path}: already exists (use --force to overwrite)")
        if path.is_dir():
            raise OutputError(f"{path}: is a directory")
        try:
            self._f = open(self.tmp, "wb")
        except OSError as e:
            raise output_error(path, e) from None

    def write(self, data: bytes | memoryview) -> None:
        try:
            self._f.write(data)
        except OSError as e:
            raise output_error(self.path, e) from None
        self.sha256.update(data)
        self.size += len(data) if isinstance(data, bytes) else data.nbytes

    def commit(self) -> None:
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise output_error(self.path, e) from None

    def abort(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass
