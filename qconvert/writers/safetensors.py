"""Sharded safetensors written as a stream, into a directory that appears only when complete.

Every tensor's name, dtype and shape are known from the plan, so each shard's header is written
first and the tensors follow in plan order as they are produced (a quantized layer at a time).
Shards are `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`, or a single
`model.safetensors`, as transformers saves them.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

from qconvert.errors import OutputError
from qconvert.writers.atomic import output_error

DTYPES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.int32): "I32",
          np.dtype(np.int64): "I64", np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8",
          np.dtype(np.uint16): "BF16"}  # BF16 travels as its uint16 bits
SIZES = {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I64": 8, "U8": 1, "I8": 1}


@dataclass
class Entry:
    name: str
    dtype: str  # safetensors spelling
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * SIZES[self.dtype]


class AtomicDir:
    """A directory built under a temporary name beside `path`, renamed into place on commit()."""

    def __init__(self, path: Path, force: bool):
        self.path = path
        if path.exists() and not force:
            raise OutputError(f"{path}: already exists (use --force to overwrite)")
        if path.exists() and not path.is_dir():
            raise OutputError(f"{path}: exists and is not a directory")
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        except OSError as e:
            raise output_error(path, e) from None

    def commit(self) -> None:
        old = self.path.with_name(f".{self.path.name}.{os.getpid()}.old")
        try:
            for f in self.tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            if self.path.exists():
                os.replace(self.path, old)
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise output_error(self.path, e) from None
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


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
        self.total = sum(e.nbytes for e in entries)

    def _open(self, s: int) -> None:
        self._close()
        header: dict = {"__metadata__": self.metadata}
        off = 0
        for e in self.shards[s]:
            header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
            off += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        path = self.dir / self.names[s]
        try:
            self._f = open(path, "wb")
            self._f.write(len(raw).to_bytes(8, "little") + raw)
        except OSError as e:
            raise output_error(path, e) from None
        self._shard = s

    def _close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def write(self, name: str, a: np.ndarray) -> None:
        s, e = self.order[self.pos]
        if name != e.name:
            raise RuntimeError(f"safetensors writer: expected {e.name}, got {name}")
        a = np.ascontiguousarray(a)
        if DTYPES.get(a.dtype) not in (e.dtype, "BF16" if e.dtype == "BF16" else None) or tuple(a.shape) != e.shape:
            raise RuntimeError(f"safetensors writer: {name} is {a.dtype} {a.shape}, planned {e.dtype} {e.shape}")
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
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {e.name: self.names[s] for s, e in self.order}}
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        self._close()
