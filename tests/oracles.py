"""Code nobody on this team wrote, wrapped for the tests: ggml's quantizers through ctypes
(llama-cpp-python's libggml-base.so), llama.cpp itself, transformers' forward."""
from __future__ import annotations

import ctypes
import functools
import os

import numpy as np


@functools.cache
def ggml() -> ctypes.CDLL:
    import llama_cpp

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def ggml_quantize(type_id: int, rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml_quantize_chunk(type, rows) -> bytes as uint8 [nrows, row_size]."""
    lib = ggml()
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    nrows, n = rows.shape
    lib.ggml_quantize_init(type_id)
    row_size = lib.ggml_row_size(type_id, n)
    out = np.zeros((nrows, row_size), dtype=np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    written = lib.ggml_quantize_chunk(type_id, rows.ctypes.data, out.ctypes.data, 0, nrows, n,
                                      None if qw is None else qw.ctypes.data)
    assert written == out.size
    return out


class _TypeTraits(ctypes.Structure):
    """ggml.h's struct ggml_type_traits, up to the two functions."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


def ggml_dequantize(type_id: int, data: np.ndarray, n: int) -> np.ndarray:
    """ggml's own to_float (ggml_get_type_traits(type)->to_float) over every block of `data`,
    for the types gguf.quants cannot dequantize; float32 [size / n, n]."""
    lib = ggml()
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    traits = lib.ggml_get_type_traits(type_id).contents
    assert traits.to_float, f"ggml has no to_float for type {type_id}"
    to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(traits.to_float)
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    k = data.size // traits.type_size * traits.blck_size
    out = np.empty(k, np.float32)
    to_float(data.ctypes.data, out.ctypes.data, k)
    return out.reshape(-1, n)


def generic_llama(path, **kwargs):
    """llama-cpp-python's Llama on `path` with llama.cpp's generic CPU kernels, not the repacked
    ones (its "extra buffer types") it picks per instruction set: those quantize activations
    differently (Q4_K against Q8_K in 8x8 tiles on AVX2 only), which moved a tiny random model's
    perplexity by 0.5% more on an AVX2-only machine than on an AVX-512 one. Llama() has no
    argument for it, so its default model parameters are patched while it loads."""
    from unittest import mock

    import llama_cpp
    from llama_cpp import Llama

    default = llama_cpp.llama_cpp.llama_model_default_params

    def generic():
        p = default()
        p.use_extra_bufts = False
        return p

    with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", generic):
        return Llama(str(path), **kwargs)


def llama_logits(path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of `ids`."""
    llm = generic_llama(path, logits_all=True, n_ctx=128, n_threads=2, verbose=False)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def hf_logits(model_dir, ids: list[int]) -> np.ndarray:
    import torch
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].numpy()


def rel_rms(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(((a - ref) ** 2).mean()) / np.sqrt((ref ** 2).mean()))


def assert_forward_equals_transformers(model_dir, ids) -> None:
    """Our forward's logits on a checkpoint equal transformers' (float32) within float rounding."""
    import torch
    import transformers

    from qconvert.families import family_for
    from qconvert.read.checkpoint import open_checkpoint

    ids = torch.as_tensor(ids)
    ckpt = open_checkpoint(str(model_dir))
    try:
        ours = family_for(ckpt).forward().logits(ids)
    finally:
        ckpt.close()
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expect = ref(ids).logits
    assert torch.allclose(ours, expect, rtol=1e-4, atol=1e-4 * float(expect.abs().max()))
