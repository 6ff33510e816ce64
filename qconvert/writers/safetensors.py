"""Sharded safetensors written as a stream, into a directory that appears only when complete.

Every tensor's name, dtype and shape are known from the plan, so each shard's header is written
first and the tensors follow in plan order as they are produced (a quantized layer at a time).
Shards are `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`, or a single
`model.safetensors`, as transformers saves them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from qconvert.errors import OutputError
from qconvert.layouts import Entry
from qconvert.writers.atomic import make_dirs, output_error, remove_dirs, remove_stale, rename_noreplace, temporary

SHARD_NAME = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
INDEX_NAME = "model.safetensors.index.json"

DTYPES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.int32): "I32",
          np.dtype(np.int64): "I64", np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8",
          np.dtype(np.uint16): "BF16"}  # BF16 travels as its uint16 bits
RAW_BITS = {"BF16": np.dtype(np.uint16), "F8_E4M3": np.dtype(np.uint8)}  # dtypes numpy has not: their bits
def foreign_file(directory: Path, method: str, own_files: set[str]) -> str | None:
    """Why `directory` is not a previous qconvert output of `method` (quant_method), or None:
    its config.json must name qconvert as the quantizer and `method` as the method, and every
    entry must be a file that qconvert writes there (shards, index, `own_files`)."""
    for entry in sorted(os.listdir(directory)):
        p = directory / entry
        if p.is_symlink() or not p.is_file() or not (SHARD_NAME.fullmatch(entry) or entry == INDEX_NAME
                                                     or entry in own_files):
            return f"it holds {entry!r}, which qconvert does not write"
    try:
        cfg = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        # optimum-quanto's has none: its quanto_qmap.json names the quantized modules
        q = {"quant_method": "quanto"} if "quantization_config" not in cfg and (directory / "quanto_qmap.json").is_file() \
            else cfg["quantization_config"]
        found = q["quant_method"]
        # bitsandbytes', HQQ's and quanto's configs have no room for it: the shards' metadata names the quantizer
        quantizer = q["meta"]["quantizer"] if "meta" in q else [shard_quantizer(directory)]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return "its config.json does not name qconvert as the quantizer"
    if not (isinstance(quantizer, list) and any(str(x).startswith(("qconvert:", "qconvert ")) for x in quantizer)):
        return "its config.json does not name qconvert as the quantizer"
    if found != method:
        return f"it is a qconvert {str(found).upper()} output, not {method.upper()}"
    return None


def shard_quantizer(directory: Path) -> str:
    """The `quantizer` in the safetensors metadata of a directory's first shard ("" if none)."""
    first = directory / "model.safetensors"
    if not first.is_file():
        first = next(iter(sorted(directory.glob("model-00001-of-*.safetensors"))), first)
    with open(first, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= 100_000_000:
            return ""
        header = json.loads(f.read(n))
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return str(meta.get("quantizer", "")) if isinstance(meta, dict) else ""


def check_replaceable_dir(path: Path, force: bool, method: str, own_files: set[str]) -> None:
    """An existing output directory: refused without --force; with it, replaced only when empty
    or a previous qconvert output of the same method (never a model directory, never `-o .`)."""
    if not os.path.lexists(path):
        return
    if not force:
        raise OutputError(f"{path}: already exists (use --force to overwrite)")
    if not path.is_dir():
        raise OutputError(f"{path}: exists and is not a directory")
    why = foreign_file(path, method, own_files) if os.listdir(path) else None
    if why is not None:
        raise OutputError(f"{path}: --force replaces only a previous qconvert {method.upper()} output, and {why}; "
                          "choose another -o")


class AtomicDir:
    """A directory built under a temporary name beside `path`, renamed into place on commit().
    Without `force` an existing `path` is never replaced (not even one that appears meanwhile);
    with it only a directory check_replaceable_dir accepts, checked again just before."""

    def __init__(self, path: Path, force: bool, method: str, own_files: set[str]):
        self.path, self.force, self.method, self.own_files = path, force, method, own_files
        check_replaceable_dir(path, force, method, own_files)
        self.tmp = temporary(path, "partial")
        self.created = make_dirs(path.parent)  # removed again by abort() when still empty
        try:
            remove_stale(path)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        except OSError as e:
            raise output_error(path, e) from None

    def commit(self) -> None:
        old = temporary(self.path, "old")
        try:
            for f in self.tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            if self.force and os.path.lexists(self.path):
                check_replaceable_dir(self.path, True, self.method, self.own_files)
                os.replace(self.path, old)
            rename_noreplace(self.tmp, self.path)
        except FileExistsError:
            self.abort()
            raise OutputError(f"{self.path}: appeared while this run was writing it (another run?); left as it "
                              "is (use --force to overwrite)") from None
        except OutputError:
            self.abort()
            raise
        except OSError as e:
            self.abort()
            raise output_error(self.path, e) from None
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        remove_dirs(self.created)


def shard(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


class ShardedWriter:
    """Write `entries` in order into shards of at most `max_bytes` (a larger tensor gets its own)."""

    def __init__(self, directory: Path, entries: list[Entry], max_bytes: int, metadata: dict[str, str]):
        self.dir = directory
        self.shards = shard(entries, max_bytes)
        n = len(self.shards)
        self.names = (["model.safetensors"] if n == 1 else
                      [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.metadata = metadata
        self.order = [(s, e) for s, es in enumerate(self.shards) for e in es]
        self.pos = 0
        self._f = None
        self._shard = -1
        # shards whose header is rewritten on closing: their last entries' shapes were bounds
        self.late = {s for s, es in enumerate(self.shards) if any(not e.exact for e in es)}
        for es in self.shards:
            first = next((i for i, e in enumerate(es) if not e.exact), len(es))
            if any(e.exact for e in es[first:]):
                raise RuntimeError(f"safetensors writer: {es[first].name} has no exact shape and does not end its shard")

    def _header(self, s: int) -> bytes:
        header: dict = {"__metadata__": self.metadata}
        off = 0
        for e in self.shards[s]:
            header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
            off += e.nbytes
        return json.dumps(header, separators=(",", ":")).encode()

    def _open(self, s: int) -> None:
        """The shard's header first. Entries whose shape is a bound (Entry.exact false) end the
        shard: their header is written with the bounds, which can only be longer, and rewritten
        with the shapes written, padded with spaces to the same length, when the shard closes."""
        self._close()
        raw = self._header(s)
        raw += b" " * (-len(raw) % 8)
        path = self.dir / self.names[s]
        try:
            self._f = open(path, "wb")
            self._f.write(len(raw).to_bytes(8, "little") + raw)
        except OSError as e:
            raise output_error(path, e) from None
        self._shard = s
        self._reserved = len(raw)

    def _close(self) -> None:
        if self._f is not None:
            s = self._shard
            try:
                if s in self.late:
                    raw = self._header(s)
                    self._f.seek(8)
                    self._f.write(raw + b" " * (self._reserved - len(raw)))
                self._f.close()
            except OSError as e:
                raise output_error(self.dir / self.names[s], e) from None
            finally:
                self._f = None

    def write(self, name: str, a: np.ndarray) -> None:
        s, e = self.order[self.pos]
        if name != e.name:
            raise RuntimeError(f"safetensors writer: expected {e.name}, got {name}")
        a = np.asarray(a)
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)  # (which makes a 0-d array 1-d: those are contiguous)
        fits = tuple(a.shape) == e.shape if e.exact else (a.ndim == len(e.shape) and a.nbytes <= e.nbytes)
        if (DTYPES.get(a.dtype) != e.dtype and RAW_BITS.get(e.dtype) != a.dtype) or not fits:
            raise RuntimeError(f"safetensors writer: {name} is {a.dtype} {a.shape}, planned {e.dtype} {e.shape}")
        if not e.exact:  # its shape is known now
            e.shape, e.exact = tuple(a.shape), True
        if s != self._shard:
            self._open(s)
        try:
            self._f.write(a.data)
        except OSError as err:
            raise output_error(self.dir / self.names[s], err) from None
        self.pos += 1

    def finish(self) -> None:
        if self.pos != len(self.order):
            raise RuntimeError(f"safetensors writer: {len(self.order) - self.pos} tensors not written")
        self._close()
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": sum(e.nbytes for _, e in self.order)},
                     "weight_map": {e.name: self.names[s] for s, e in self.order}}
            (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        self._close()
