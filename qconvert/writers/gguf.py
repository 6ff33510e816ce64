"""GGUF v3 writer: a small state machine that streams tensor data after a planned header.

    NEW --open()--> DATA --(begin_tensor, write*, end_tensor)*--> DATA --finish()--> COMPLETE --commit()--> DONE
                      \\------------------------ abort() ------------------------------------------> ABORTED

The header (key/values and every tensor's name, shape, type and offset) is written first, from
the plan; then tensor data is appended in plan order as it is produced, each tensor padded to
the alignment. Calling out of order raises, naming the expected and the actual state.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from gguf import GGUFValueType as VT
from gguf.gguf_writer import GGUFValue

from qconvert.writers.atomic import AtomicFile

GGUF_MAGIC = 0x46554747  # "GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32

_SCALAR = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
           VT.FLOAT32: "<f", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d", VT.BOOL: "<?"}
_NUMPY = {VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2", VT.UINT32: "<u4", VT.INT32: "<i4",
          VT.FLOAT32: "<f4", VT.UINT64: "<u8", VT.INT64: "<i8", VT.FLOAT64: "<f8", VT.BOOL: "?"}


def _string(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(b)) + b


def _element_type(v: Any) -> VT:
    if isinstance(v, (str, bytes, bytearray)):
        return VT.STRING
    if isinstance(v, bool):
        return VT.BOOL
    if isinstance(v, float):
        return VT.FLOAT32
    if isinstance(v, int):
        return VT.INT32
    if isinstance(v, (list, tuple)):
        return VT.ARRAY
    raise TypeError(f"GGUF value of unsupported type {type(v).__name__}")


def pack_value(v: GGUFValue) -> bytes:
    """A key's value with its type tag, as GGUF v3 stores it."""
    if v.type == VT.ARRAY:
        items = v.value
        if len(items) == 0:
            raise ValueError("GGUF arrays must not be empty")
        sub = v.sub_type if v.sub_type is not None else _element_type(items[0])  # UINT8 is 0
        head = struct.pack("<IIQ", VT.ARRAY, sub, len(items))
        if sub == VT.STRING:
            return head + b"".join(_string(s) for s in items)
        if sub in _NUMPY:
            return head + np.asarray(items, dtype=_NUMPY[sub]).tobytes()
        raise ValueError(f"GGUF arrays of {sub.name} are not supported")
    if v.type == VT.STRING:
        return struct.pack("<I", VT.STRING) + _string(v.value)
    return struct.pack("<I", v.type) + struct.pack(_SCALAR[v.type], v.value)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (rows first)
    ggml_type: int
    nbytes: int


class State(Enum):
    NEW = "new"
    DATA = "writing tensor data"
    IN_TENSOR = "inside a tensor"
    COMPLETE = "complete, not yet in place"
    DONE = "done"
    ABORTED = "aborted"


def _pad(n: int, align: int) -> int:
    return (align - n % align) % align


class PackedValues(dict):
    """Key/values packed once for every file that shares them (a ladder's files share the
    vocabulary, hundreds of thousands of strings): id(value) -> (value, bytes), the value kept so
    that its id stays its own."""

    def pack(self, value: GGUFValue) -> bytes:
        hit = self.get(id(value))
        if hit is None or hit[0] is not value:
            hit = self[id(value)] = (value, pack_value(value))
        return hit[1]


class GGUFWriter:
    def __init__(self, path: Path, kv: dict[str, GGUFValue], tensors: Iterable[TensorInfo], force: bool = False,
                 alignment: int = DEFAULT_ALIGNMENT, packed: PackedValues | None = None):
        self.path = path
        self.kv = kv
        self.packed = packed if packed is not None else PackedValues()
        self.tensors = list(tensors)
        self.force = force
        self.alignment = alignment
        self.state = State.NEW
        self._next = 0  # index of the next tensor whose data is due
        self._written = 0  # bytes written of the current tensor
        self._file: AtomicFile | None = None
        self._header: bytes | None = None

    def _expect(self, *states: State) -> None:
        if self.state not in states:
            want = " or ".join(s.value for s in states)
            raise RuntimeError(f"GGUF writer for {self.path}: expected state {want}, got {self.state.value}")

    def header(self) -> bytes:
        if self._header is None:
            self._header = self._pack_header()
        return self._header

    def _pack_header(self) -> bytes:
        parts = [struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(self.tensors), len(self.kv))]
        for key, value in self.kv.items():
            parts.append(_string(key))
            parts.append(self.packed.pack(value))
        offset = 0
        for t in self.tensors:
            dims = t.shape[::-1]  # GGUF lists the row length first
            parts.append(_string(t.name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                         + struct.pack("<IQ", t.ggml_type, offset))
            offset += t.nbytes + _pad(t.nbytes, self.alignment)
        head = b"".join(parts)
        return head + b"\0" * _pad(len(head), self.alignment)

    def invalidate_header(self) -> None:
        """The key/values changed before open(): the header is packed again."""
        self._expect(State.NEW)
        self._header = None

    @property
    def file_size(self) -> int:
        return len(self.header()) + sum(t.nbytes + _pad(t.nbytes, self.alignment) for t in self.tensors)

    def open(self) -> None:
        self._expect(State.NEW)
        self._file = AtomicFile(self.path, self.force)
        self.state = State.DATA
        self._file.write(self.header())

    def begin_tensor(self, name: str) -> None:
        self._expect(State.DATA)
        if self._next >= len(self.tensors):
            raise RuntimeError(f"GGUF writer for {self.path}: tensor {name!r} is beyond the planned {len(self.tensors)}")
        want = self.tensors[self._next].name
        if name != want:
            raise RuntimeError(f"GGUF writer for {self.path}: expected tensor {want!r}, got {name!r}")
        self.state = State.IN_TENSOR
        self._written = 0

    def write(self, data: np.ndarray) -> None:
        self._expect(State.IN_TENSOR)
        assert self._file is not None
        buf = memoryview(np.ascontiguousarray(data)).cast("B")
        t = self.tensors[self._next]
        if self._written + buf.nbytes > t.nbytes:
            raise RuntimeError(f"GGUF writer for {self.path}: tensor {t.name!r} is {t.nbytes} bytes, "
                               f"got {self._written + buf.nbytes}")
        self._file.write(buf)
        self._written += buf.nbytes

    def end_tensor(self) -> None:
        self._expect(State.IN_TENSOR)
        assert self._file is not None
        t = self.tensors[self._next]
        if self._written != t.nbytes:
            raise RuntimeError(f"GGUF writer for {self.path}: tensor {t.name!r} is {t.nbytes} bytes, "
                               f"got {self._written}")
        self._file.write(b"\0" * _pad(t.nbytes, self.alignment))
        self._next += 1
        self.state = State.DATA

    def finish(self, commit: bool = True) -> tuple[int, str]:
        """Complete the file (and make it appear at its path unless `commit` is False: then
        commit() does); returns (size in bytes, sha256 hex)."""
        self._expect(State.DATA)
        assert self._file is not None
        if self._next != len(self.tensors):
            raise RuntimeError(f"GGUF writer for {self.path}: {len(self.tensors) - self._next} tensors not written")
        self._file.complete()
        self.state = State.COMPLETE
        if commit:
            self.commit()
        return self._file.size, self._file.sha256.hexdigest()

    def commit(self) -> None:
        self._expect(State.COMPLETE)
        assert self._file is not None
        self._file.commit()
        self.state = State.DONE

    def abort(self) -> None:
        if self._file is not None and self.state not in (State.DONE, State.ABORTED):
            self._file.abort()
        self.state = State.ABORTED
