"""The GGUF writer: a state machine that refuses out-of-order calls, and values gguf reads back."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import GGUFReader
from gguf import GGUFValueType as VT
from gguf.gguf_writer import GGUFValue

from qconvert.writers.gguf import GGUFWriter, TensorInfo

KV = {
    "general.architecture": GGUFValue("llama", VT.STRING),
    "u8": GGUFValue(7, VT.UINT8), "i8": GGUFValue(-7, VT.INT8), "u16": GGUFValue(700, VT.UINT16),
    "i16": GGUFValue(-700, VT.INT16), "u32": GGUFValue(70000, VT.UINT32), "i32": GGUFValue(-70000, VT.INT32),
    "f32": GGUFValue(0.5, VT.FLOAT32), "b": GGUFValue(True, VT.BOOL), "u64": GGUFValue(2**40, VT.UINT64),
    "i64": GGUFValue(-(2**40), VT.INT64), "f64": GGUFValue(0.25, VT.FLOAT64),
    "strings": GGUFValue(["a", "ü", "<|im_end|>"], VT.ARRAY), "bytes": GGUFValue([b"\xe2\x96\x81x", b"y"], VT.ARRAY),
    "ints": GGUFValue([1, 2, 3], VT.ARRAY), "floats": GGUFValue([0.5, -1.0], VT.ARRAY),
    "typed": GGUFValue([1, 2], VT.ARRAY, VT.UINT8),
}


def tensors():
    return [TensorInfo("a.weight", (2, 3), int(GT.F32), 24), TensorInfo("b.weight", (5,), int(GT.F32), 20)]


def test_round_trip_through_gguf_reader(tmp_path):
    w = GGUFWriter(tmp_path / "x.gguf", KV, tensors())
    w.open()
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(5, dtype=np.float32)
    for name, data in (("a.weight", a), ("b.weight", b)):
        w.begin_tensor(name)
        w.write(data)
        w.end_tensor()
    size, sha = w.finish()
    assert size == (tmp_path / "x.gguf").stat().st_size == w.file_size
    r = GGUFReader(tmp_path / "x.gguf")
    f = r.fields
    for key in ("u8", "i8", "u16", "i16", "u32", "i32", "b", "u64", "i64", "f64", "f32"):
        assert f[key].contents() == KV[key].value, key
        assert f[key].types[0] == KV[key].type
    assert f["strings"].contents() == ["a", "ü", "<|im_end|>"]
    assert f["bytes"].contents() == ["\u2581x", "y"]
    assert f["ints"].contents() == [1, 2, 3] and f["ints"].types[1] == VT.INT32
    assert f["floats"].contents() == [0.5, -1.0]
    assert f["typed"].types[1] == VT.UINT8
    ta, tb = r.tensors
    assert list(ta.shape) == [3, 2] and np.array_equal(np.asarray(ta.data), a)
    assert np.array_equal(np.asarray(tb.data), b)
    assert ta.data_offset % 32 == 0 and tb.data_offset % 32 == 0


def test_out_of_order_calls_raise_with_states(tmp_path):
    w = GGUFWriter(tmp_path / "x.gguf", KV, tensors())
    with pytest.raises(RuntimeError, match="expected state writing tensor data, got new"):
        w.begin_tensor("a.weight")
    w.open()
    with pytest.raises(RuntimeError, match="expected tensor 'a.weight', got 'b.weight'"):
        w.begin_tensor("b.weight")
    w.begin_tensor("a.weight")
    with pytest.raises(RuntimeError, match="is 24 bytes, got 28"):
        w.write(np.zeros(7, np.float32))
    w.write(np.zeros(3, np.float32))
    with pytest.raises(RuntimeError, match="is 24 bytes, got 12"):
        w.end_tensor()
    with pytest.raises(RuntimeError, match="expected state writing tensor data, got inside a tensor"):
        w.finish()
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_unfinished_file_is_not_committed(tmp_path):
    w = GGUFWriter(tmp_path / "x.gguf", KV, tensors())
    w.open()
    w.begin_tensor("a.weight")
    w.write(np.zeros(6, np.float32))
    w.end_tensor()
    with pytest.raises(RuntimeError, match="1 tensors not written"):
        w.finish()
    w.abort()
    assert list(tmp_path.iterdir()) == []
