"""Safetensors files read from their header, memory-mapped, one tensor at a time.

The header is checked against the file before anything is trusted: its length, its JSON, every
dtype, every shape against its byte range, every byte range against the file size.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

from qconvert.errors import InputError

# safetensors dtype -> (numpy dtype used to view the bytes, element size)
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # no numpy bfloat16: kept as raw bits, widened by `to_float`
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    "F8_E4M3": np.dtype("u1"),  # no numpy float8: raw bits, decoded through torch (quant/fp8.py)
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers
_PAGE = mmap.PAGESIZE


@dataclass
class TensorRef:
    """Where one tensor's bytes live; nothing is read until `array()` is called."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: "SafetensorsFile"
    begin: int  # absolute file offset
    nbytes: int

    def array(self) -> np.ndarray:
        """The tensor as a read-only numpy view into the mapped file (BF16 as uint16 bits)."""
        return self.file.view(self)

    def release(self) -> None:
        """Drop this tensor's pages from our resident memory (the page cache keeps them)."""
        self.file.release(self.begin, self.nbytes)


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self.tensors: dict[str, TensorRef] = {}
        self.metadata: dict[str, str] = {}
        self._read_header()

    def _bad(self, what: str) -> InputError:
        return InputError(f"{self.path}: corrupt safetensors file: {what}")

    def _read_header(self) -> None:
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise self._bad(f"file is {size} bytes, too short for a header")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise self._bad(f"header length {n} runs past the end of the {size}-byte file (truncated?)")
                if n > MAX_HEADER:
                    raise self._bad(f"header length {n} is beyond the {MAX_HEADER}-byte limit safetensors sets")
                raw = f.read(n)
        except OSError as e:
            raise InputError(f"{self.path}: cannot read: {e.strerror or e}") from None
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._bad(f"header is not valid JSON ({e})") from None
        except RecursionError:
            raise self._bad("header JSON is nested too deeply") from None
        if not isinstance(header, dict):
            raise self._bad("header must be a JSON object")
        data_start = 8 + n
        data_size = size - data_start
        meta = header.pop("__metadata__", None) or {}
        self.metadata = meta if isinstance(meta, dict) else {}
        for name, entry in header.items():
            self.tensors[name] = self._entry(name, entry, data_start, data_size)

    def _entry(self, name: str, entry: object, data_start: int, data_size: int) -> TensorRef:
        if not isinstance(entry, dict):
            raise self._bad(f"tensor {name!r}: entry must be an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise self._bad(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise self._bad(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise self._bad(f"tensor {name!r}: data_offsets must be [begin, end], got {offsets!r}")
        begin, end = offsets
        expected = prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise self._bad(f"tensor {name!r}: shape {shape} of {dtype} needs {expected} bytes, header gives {end - begin}")
        if begin < 0 or end > data_size:
            raise self._bad(f"tensor {name!r}: bytes {begin}..{end} lie past the end of the data "
                            f"({data_size} bytes; file truncated?)")
        return TensorRef(name, dtype, tuple(shape), self, data_start + begin, expected)

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
                self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise InputError(f"{self.path}: cannot map: {e}") from None
        return self._map

    def view(self, t: TensorRef) -> np.ndarray:
        m = self._mapped()
        arr = np.frombuffer(m, dtype=DTYPES[t.dtype], count=prod(t.shape), offset=t.begin)
        return arr.reshape(t.shape)

    def release(self, begin: int, nbytes: int) -> None:
        if self._map is None or nbytes == 0:
            return
        start = begin - begin % _PAGE
        end = begin + nbytes
        end = min(end + (-end) % _PAGE, len(self._map))
        try:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (AttributeError, OSError, ValueError):
            pass  # not every platform can drop pages; memory is then just higher

    def close(self) -> None:
        # numpy views may still reference the map; closing would raise BufferError then
        try:
            if self._map is not None:
                self._map.close()
        except BufferError:
            return
        if self._fd is not None:
            os.close(self._fd)
        self._map = self._fd = None
