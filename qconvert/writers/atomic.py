"""Outputs are written under a temporary name beside their final path, fsynced, then renamed.
A failure or an interruption removes the temporary file: nothing half-written is left, and the
temporary files of runs that died without cleaning up (SIGKILL, power loss) are removed by the
next run that writes the same output. Without --force the final rename never replaces a file
that appeared while this run was writing (another run writing the same output); with --force
only what qconvert itself writes is replaced: a GGUF file (or an empty one).

Writing and hashing run on a background thread (both release the GIL), so the disk works while
the next chunk is quantized; a bounded queue keeps memory to a few chunks.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import queue
import re
import shutil
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qconvert.errors import OutputError

_DONE = object()


def output_error(path: Path, e: OSError) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"{path}: disk full while writing (no space left on device)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{path}: not writable ({e.strerror})")
    return OutputError(f"{path}: cannot write: {e.strerror or e}")


def temporary(path: Path, what: str) -> Path:
    """This run's temporary name beside `path`: .NAME.PID.partial (or .old)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{what}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


_TEMPORARY = re.compile(r"\.(.+)\.(\d+)\.(partial|old)")  # what temporary() names: output, pid, kind


def remove_stale(path: Path) -> None:
    """Remove the temporary outputs beside `path` whose run no longer exists."""
    _remove_stale(path.parent, path.name)


def remove_stale_in(directory: Path) -> None:
    """Remove every temporary output in `directory` whose run no longer exists."""
    _remove_stale(directory, None)


def _remove_stale(directory: Path, name: str | None) -> None:
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for entry in names:
        m = _TEMPORARY.fullmatch(entry)
        if m and name in (None, m.group(1)) and int(m.group(2)) != os.getpid() and not _alive(int(m.group(2))):
            stale = directory / entry
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                try:
                    stale.unlink()
                except OSError:
                    pass


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_RENAMEAT2 = _renameat2()


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; FileExistsError when `dst` exists, even if it appeared a moment ago
    (renameat2 with RENAME_NOREPLACE; where that is missing, a hard link for a file)."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        e = ctypes.get_errno()
        if e == errno.EEXIST:
            raise FileExistsError(e, os.strerror(e), str(dst))
        if e not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: the file system cannot do it
            raise OSError(e, os.strerror(e), str(dst))
    if src.is_dir():
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "File exists", str(dst))
        os.rename(src, dst)
        return
    os.link(src, dst)  # fails when dst exists
    os.unlink(src)


def make_dirs(d: Path) -> list[Path]:
    """mkdir -p; returns the directories it created, deepest first (remove_dirs takes them back)."""
    created = []
    p = d
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        remove_dirs(created)
        raise OutputError(f"{d}: cannot create output directory ({e.strerror})") from None
    return created


def remove_dirs(created: list[Path]) -> None:
    """Remove directories a failed run created, as long as they are empty."""
    for d in created:
        try:
            d.rmdir()
        except OSError:
            return


GGUF_MAGIC = b"GGUF"


def check_replaceable_file(path: Path, force: bool) -> None:
    """An existing output file: refused without --force; with it, only a GGUF file (what
    qconvert writes) or an empty file is replaced, never anything else under that name."""
    if not os.path.lexists(path):
        return
    if not force:
        raise OutputError(f"{path}: already exists (use --force to overwrite)")
    if path.is_dir():
        raise OutputError(f"{path}: is a directory")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise OutputError(f"{path}: exists and cannot be read ({e.strerror}); not replacing it") from None
    if head not in (b"", GGUF_MAGIC):
        raise OutputError(f"{path}: exists and is not a GGUF file; --force replaces only files qconvert writes")


class AtomicFile:
    """A binary file that appears at `path` only when `commit()` succeeds; sha256 as written."""

    def __init__(self, path: Path, force: bool):
        self.path = path
        self.force = force
        self.tmp = temporary(path, "partial")
        self.sha256 = hashlib.sha256()
        self.size = 0
        check_replaceable_file(path, force)
        remove_stale(path)
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

    @contextmanager
    def _or_abort(self) -> Iterator[None]:
        """A failure inside removes the temporary file and becomes the output error it is."""
        try:
            yield
        except FileExistsError:
            self.abort()
            raise OutputError(f"{self.path}: appeared while this run was writing it (another run?); left as it "
                              "is (use --force to overwrite)") from None
        except OSError as e:
            self.abort()
            raise output_error(self.path, e) from None
        except OutputError:
            self.abort()
            raise

    def complete(self) -> None:
        """Everything written and on disk, still under the temporary name."""
        self._stop()
        with self._or_abort():
            self._check()
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def commit(self) -> None:
        """complete(), then the file appears at its path (never over one that appeared meanwhile,
        unless forced)."""
        if not self._f.closed:
            self.complete()
        with self._or_abort():
            if self.force:
                check_replaceable_file(self.path, force=True)
                os.replace(self.tmp, self.path)
            else:
                rename_noreplace(self.tmp, self.path)

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
