"""A GGUF file's header checked against the file before gguf's reader is trusted with it.

gguf.GGUFReader believes every count and length it reads: an array "of arrays" with a count of
2^60, a string longer than the file, or a tensor whose data lies past the end make it loop,
allocate without bound or fail deep inside numpy. This walk reads the same structure (GGUF v2/v3:
magic, version, tensor and key counts, key/values, tensor infos) and bounds every count and
length by the bytes that are left, refuses nested arrays (llama.cpp's reader refuses them too)
and strings that are not UTF-8, and checks every tensor's type, shape and data range.
"""
from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from qconvert.errors import InputError

_SIZES = {GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
          GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4, GGUFValueType.BOOL: 1,
          GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8}
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32


class _Walk:
    def __init__(self, data, path: Path):
        self.data, self.at, self.path = data, 0, path

    def bad(self, what: str) -> InputError:
        return InputError(f"{self.path}: corrupt GGUF file: {what} (at byte {self.at})")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.at + n > len(self.data):
            raise self.bad(f"{what} needs {n} bytes, {len(self.data) - self.at} are left (truncated?)")
        raw = self.data[self.at:self.at + n]
        self.at += n
        return raw

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def skip(self, n: int, what: str) -> None:
        if n < 0 or self.at + n > len(self.data):
            raise self.bad(f"{what} needs {n} bytes, {len(self.data) - self.at} are left (truncated?)")
        self.at += n

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.bad(f"{what} is not UTF-8 text") from None

    def value(self, kind: int, key: str) -> object:
        if kind == GGUFValueType.STRING:
            return self.string(f"the value of {key!r}")
        if kind == GGUFValueType.ARRAY:
            sub, count = self.u32(f"the array type of {key!r}"), self.u64(f"the array length of {key!r}")
            if sub == GGUFValueType.ARRAY:
                raise self.bad(f"key {key!r} holds an array of arrays, which GGUF readers refuse")
            if sub == GGUFValueType.STRING:
                if count > (len(self.data) - self.at) // 8:
                    raise self.bad(f"key {key!r} claims {count} strings, more than the file can hold")
                for i in range(count):
                    self.string(f"item {i} of {key!r}")
                return None
            if sub not in _SIZES:
                raise self.bad(f"key {key!r} holds an array of unknown type {sub}")
            self.skip(count * _SIZES[GGUFValueType(sub)], f"the {count} items of {key!r}")
            return None
        if kind not in _SIZES:
            raise self.bad(f"key {key!r} has unknown value type {kind}")
        raw = self.take(_SIZES[GGUFValueType(kind)], f"the value of {key!r}")
        return int.from_bytes(raw, "little") if kind == GGUFValueType.UINT32 else None


def check_gguf_header(path: Path) -> None:
    """Raise InputError naming the first thing in the file's header that cannot be right."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise InputError(f"{path}: empty file, not GGUF")
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # only the header's pages are read
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    try:
        _check(_Walk(data, path))
    finally:
        data.close()


def _check(w: _Walk) -> None:
    data = w.data
    if bytes(w.take(4, "the magic")) != b"GGUF":
        raise w.bad("no GGUF magic")
    version = w.u32("the version")
    if version not in (2, 3):
        raise w.bad(f"version {version} (readers take 2 and 3)")
    n_tensors, n_kv = w.u64("the tensor count"), w.u64("the key count")
    if n_kv > len(data) // 13 or n_tensors > len(data) // 24:  # the smallest key/value, tensor info
        raise w.bad(f"{n_kv} keys and {n_tensors} tensors cannot fit in {len(data)} bytes")
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = w.string("a key")
        value = w.value(w.u32(f"the type of {key!r}"), key)
        if key == "general.alignment":
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise w.bad(f"general.alignment must be a power of two, got {value!r}")
            alignment = value
    infos = []
    for _ in range(n_tensors):
        name = w.string("a tensor name")
        n_dims = w.u32(f"the dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise w.bad(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
        dims = [w.u64(f"a dimension of tensor {name!r}") for _ in range(n_dims)]
        kind, offset = w.u32(f"the type of tensor {name!r}"), w.u64(f"the offset of tensor {name!r}")
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise w.bad(f"tensor {name!r} has unknown type {kind}") from None
        n = 1
        for d in dims:
            n *= d
        if n == 0 or dims[0] % block:
            raise w.bad(f"tensor {name!r} has shape {dims}, which {GGMLQuantizationType(kind).name} cannot hold")
        infos.append((name, offset, n // block * size))
    start = w.at + (-w.at) % alignment
    for name, offset, nbytes in infos:
        if offset % alignment or start + offset + nbytes > len(data):
            raise w.bad(f"tensor {name!r}: data at offset {offset} of {nbytes} bytes lies outside the "
                        f"{len(data) - start}-byte data section (or is not aligned to {alignment})")
