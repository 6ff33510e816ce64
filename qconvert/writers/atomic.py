"""Outputs are written under a temporary name beside their final path, fsynced, then renamed.
A failure or an interruption removes the temporary file: nothing half-written is left.

Writing and hashing run on a background thread (both release the GIL), so the disk works while
the next chunk is quantized; a bounded queue keeps memory to a few chunks.
"""
from __future__ import annotations

import errno
import hashlib
import os
import queue
import threading
from pathlib import Path

from qconvert.errors import OutputError

_DONE = object()


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
        self._error: OSError | None = None
        self._q: queue.Queue = queue.Queue(maxsize=4)
        self._thread = threading.Thread(target=self._drain, name=f"write {path.name}", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            item = self._q.get()
            if item is _DONE:
                return
            if self._error is None:
                try:
                    self._f.write(item)
                    self.sha256.update(item)
                except OSError as e:
                    self._error = e

    def _check(self) -> None:
        if self._error is not None:
            raise output_error(self.path, self._error)

    def write(self, data: bytes | memoryview) -> None:
        self._check()
        self._q.put(data)
        self.size += len(data) if isinstance(data, bytes) else data.nbytes

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._q.put(_DONE)
            self._thread.join()

    def commit(self) -> None:
        self._stop()
        try:
            self._check()
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise output_error(self.path, e) from None
        except OutputError:
            self.abort()
            raise

    def abort(self) -> None:
        self._error = self._error or OSError(errno.ECANCELED, "aborted")
        self._stop()
        try:
            self._f.close()
        except OSError:
            pass
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass
