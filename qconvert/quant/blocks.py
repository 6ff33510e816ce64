"""GGUF block types, and the one place that chooses the C kernels or the numpy reference.

Each block type is a class declared with its sizes and registered by subclassing; a second
class with the same name is an error. `QCONVERT_PUREPYTHON=1` selects the numpy reference;
otherwise the C extension must import, and a broken build is a loud error.
"""
from __future__ import annotations

import functools
import os
from functools import partial
from typing import Callable, ClassVar, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as GT

from qconvert.quant.reference import (floats, iq1, iq2, iq3, iq4_nl, kquants, lattice, legacy, mxfp4, q1_0, q8_0,
                                       ternary)

PURE_PYTHON = os.environ.get("QCONVERT_PUREPYTHON", "") not in ("", "0")

if PURE_PYTHON:
    _k = None
else:
    try:
        from qconvert import _kernels as _k
    except ImportError as e:  # pragma: no cover - exercised by a broken install only
        raise ImportError(
            f"qconvert's C kernels (qconvert._kernels) failed to import: {e}. Rebuild with "
            "`pip install -e .`, or set QCONVERT_PUREPYTHON=1 to run the (slow) numpy reference."
        ) from e

BACKEND = "numpy" if _k is None else "c"
if _k is not None:  # the C module's block sizes are checked against the one table, loudly
    for _name, _sizes in _k.QUANT_SIZES.items():
        if GGML_QUANT_SIZES[GT[_name]] != _sizes:
            raise ImportError(f"qconvert._kernels declares {_name} as {_sizes} (weights, bytes) per block, gguf's "
                              f"GGML_QUANT_SIZES {GGML_QUANT_SIZES[GT[_name]]}: rebuild the kernels")


def backend_description() -> str:
    """Which kernels run: "C with AVX2", "plain C" (no AVX2, or QCONVERT_NO_SIMD=1), or "numpy"
    (QCONVERT_PUREPYTHON=1)."""
    if _k is None:
        return "numpy (QCONVERT_PUREPYTHON=1)"
    return "C with AVX2" if _k.have_avx2() else "plain C"

REGISTRY: dict[str, type[BlockType]] = {}


class BlockType:
    """Bytes of one GGUF tensor type: `block` weights stored in `block_bytes` bytes."""

    name: ClassVar[str]
    ggml: ClassVar[GT]
    block: ClassVar[int]
    block_bytes: ClassVar[int]
    # magnitudes from which the type can no longer hold a value (its f16 parts overflow to inf)
    overflow: ClassVar[float] = float("inf")

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            return  # an abstract family of types, such as Blocks
        if cls.name in REGISTRY:
            raise TypeError(f"block type {cls.name} is declared twice ({REGISTRY[cls.name].__qualname__} "
                            f"and {cls.__qualname__})")
        cls.block, cls.block_bytes = GGML_QUANT_SIZES[cls.ggml]  # the one size table, gguf-py's
        REGISTRY[cls.name] = cls

    @classmethod
    def fits(cls, n_per_row: int) -> bool:
        return n_per_row % cls.block == 0

    @classmethod
    def nbytes(cls, shape: tuple[int, ...]) -> int:
        n = int(np.prod(shape, dtype=np.int64))
        return n // cls.block * cls.block_bytes

    @classmethod
    def bits_per_weight(cls) -> float:
        return cls.block_bytes * 8 / cls.block

    @classmethod
    def quantize(cls, rows: np.ndarray, threads: int = 1, imatrix: np.ndarray | None = None) -> np.ndarray:
        """float32 [nrows, n_per_row] (C-contiguous) -> the tensor's bytes, as a numpy array.
        `imatrix`: per-column importance (n_per_row float32), used by the types that take one."""
        raise NotImplementedError

    @classmethod
    def dequantize(cls, data: np.ndarray, shape: tuple[int, ...], threads: int = 1) -> np.ndarray:
        raise NotImplementedError


class F32(BlockType):
    name, ggml = "F32", GT.F32

    @classmethod
    def quantize(cls, rows: np.ndarray, threads: int = 1, imatrix: np.ndarray | None = None) -> np.ndarray:
        return np.ascontiguousarray(rows, dtype=np.float32)

    @classmethod
    def dequantize(cls, data: np.ndarray, shape: tuple[int, ...], threads: int = 1) -> np.ndarray:
        return np.frombuffer(data, dtype=np.float32).reshape(shape)


class F16(BlockType):
    name, ggml = "F16", GT.F16
    overflow = 65520.0  # rounds to inf

    @classmethod
    def quantize(cls, rows: np.ndarray, threads: int = 1, imatrix: np.ndarray | None = None) -> np.ndarray:
        if _k is None:
            return floats.f32_to_f16(rows)
        out = np.empty(rows.shape, dtype=np.float16)
        _k.convert("f32>f16", rows, out, threads)
        return out

    @classmethod
    def dequantize(cls, data: np.ndarray, shape: tuple[int, ...], threads: int = 1) -> np.ndarray:
        return to_float32("F16", np.frombuffer(data, dtype=np.uint16).reshape(shape), threads)


class BF16(BlockType):
    name, ggml = "BF16", GT.BF16

    @classmethod
    def quantize(cls, rows: np.ndarray, threads: int = 1, imatrix: np.ndarray | None = None) -> np.ndarray:
        if _k is None:
            return floats.f32_to_bf16(rows)
        out = np.empty(rows.shape, dtype=np.uint16)
        _k.convert("f32>bf16", rows, out, threads)
        return out

    @classmethod
    def dequantize(cls, data: np.ndarray, shape: tuple[int, ...], threads: int = 1) -> np.ndarray:
        return to_float32("BF16", np.frombuffer(data, dtype=np.uint16).reshape(shape), threads)


class Blocks(BlockType):
    """A block-quantized type: C kernel `_k.quantize(name, ...)` or the numpy `reference`."""

    reference: ClassVar[Ref]
    # the i-quant grid its quantizer searches (reference/lattice.py), built on first use
    lattice: ClassVar[str | None] = None
    # ggml_quantize_requires_imatrix: ggml's quantizer has no path without importance weights
    needs_imatrix: ClassVar[bool] = False
    # the importance weights take the row's mean square (Q4_0, Q4_1, Q5_0, Q5_1), which
    # quantize(mean_squares=) can give in place of the rows' own
    row_mean_square: ClassVar[bool] = False

    @classmethod
    def quantize(cls, rows: np.ndarray, threads: int = 1, imatrix: np.ndarray | None = None,
                 mean_squares: np.ndarray | None = None) -> np.ndarray:
        """Rows [nrows, n] as blocks. `mean_squares` [nrows] (row_mean_square types, with
        `imatrix`): each row's mean square in its importance weights, as if the row were longer
        (feedback.py quantizes a row one block at a time)."""
        nrows, n = rows.shape
        ms = None
        if mean_squares is not None:
            if not cls.row_mean_square or imatrix is None:
                raise ValueError(f"{cls.name}: mean squares are for Q4_0, Q4_1, Q5_0 and Q5_1 with importance weights")
            ms = np.ascontiguousarray(mean_squares, dtype=np.float32).reshape(-1)
            if ms.size != nrows:
                raise ValueError(f"{cls.name}: {nrows} rows need {nrows} mean squares, got {ms.size}")
        if not cls.fits(n):
            raise ValueError(f"{cls.name}: row length must be a multiple of {cls.block}, got {n}")
        if cls.needs_imatrix and imatrix is None:
            raise ValueError(f"{cls.name}: importance weights are required (ggml cannot quantize it without them)")
        qw = None
        if imatrix is not None:
            qw = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
            if qw.size != n:
                raise ValueError(f"{cls.name}: importance weights must have {n} values, got {qw.size}")
            bad = np.flatnonzero(~np.isfinite(qw) | (qw < 0))
            if bad.size:
                raise ValueError(f"{cls.name}: importance weights must be finite and >= 0, got {qw[bad[0]]} "
                                 f"at column {bad[0]}")
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if _k is None:
            return cls.reference.quantize(rows, qw) if ms is None else cls.reference.quantize(rows, qw, ms)
        if cls.lattice is not None:
            _build_lattice(cls.lattice)
        out = np.empty((nrows, n // cls.block * cls.block_bytes), dtype=np.uint8)
        _k.quantize(cls.name, rows, out, nrows, n, threads, qw, ms)
        return out

    @classmethod
    def dequantize(cls, data: np.ndarray, shape: tuple[int, ...], threads: int = 1) -> np.ndarray:
        n = shape[-1]
        data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
        if _k is None:
            return cls.reference.dequantize(data, n).reshape(shape)
        if cls.lattice is not None:
            _build_lattice(cls.lattice)
        out = np.empty(shape, dtype=np.float32)
        _k.dequantize(cls.name, data, out, out.size // n, n, threads)
        return out


@functools.cache
def _build_lattice(name: str) -> None:
    """The C kernels' copy of an i-quant grid and its neighbour map, from the gguf package's table."""
    _k.lattice(name, lattice.levels(name).tobytes())


class Ref(NamedTuple):
    """A type's numpy reference: quantize(rows, imatrix) and dequantize(data, n_per_row)."""

    quantize: Callable[[np.ndarray, np.ndarray | None], np.ndarray]
    dequantize: Callable[[np.ndarray, int], np.ndarray]


def _by_name(module, name: str) -> Ref:
    return Ref(partial(module.quantize, name), partial(module.dequantize, name))


class Q8_0(Blocks):
    name, ggml = "Q8_0", GT.Q8_0
    overflow = 65520.0 * 127  # the f16 scale amax/127 overflows
    reference = Ref(lambda rows, qw: q8_0.quantize(rows), q8_0.dequantize)  # ggml ignores qw for Q8_0


class MXFP4(Blocks):
    name, ggml = "MXFP4", GT.MXFP4
    reference = Ref(mxfp4.quantize, mxfp4.dequantize)  # ggml ignores importance weights for MXFP4


class Q4_0(Blocks):
    name, ggml = "Q4_0", GT.Q4_0
    reference = _by_name(legacy, "Q4_0")
    row_mean_square = True


class Q4_1(Blocks):
    name, ggml = "Q4_1", GT.Q4_1
    reference = _by_name(legacy, "Q4_1")
    row_mean_square = True


class Q5_0(Blocks):
    name, ggml = "Q5_0", GT.Q5_0
    reference = _by_name(legacy, "Q5_0")
    row_mean_square = True


class Q5_1(Blocks):
    name, ggml = "Q5_1", GT.Q5_1
    reference = _by_name(legacy, "Q5_1")
    row_mean_square = True


class Q2_K(Blocks):
    name, ggml = "Q2_K", GT.Q2_K
    reference = _by_name(kquants, "Q2_K")


class Q3_K(Blocks):
    name, ggml = "Q3_K", GT.Q3_K
    reference = _by_name(kquants, "Q3_K")


class Q4_K(Blocks):
    name, ggml = "Q4_K", GT.Q4_K
    reference = _by_name(kquants, "Q4_K")


class Q5_K(Blocks):
    name, ggml = "Q5_K", GT.Q5_K
    reference = _by_name(kquants, "Q5_K")


class Q6_K(Blocks):
    name, ggml = "Q6_K", GT.Q6_K
    reference = _by_name(kquants, "Q6_K")


class IQ4_NL(Blocks):
    name, ggml = "IQ4_NL", GT.IQ4_NL
    reference = Ref(iq4_nl.quantize, iq4_nl.dequantize)


class IQ4_XS(Blocks):
    name, ggml = "IQ4_XS", GT.IQ4_XS
    reference = Ref(iq4_nl.quantize_xs, iq4_nl.dequantize_xs)


class TQ1_0(Blocks):
    name, ggml = "TQ1_0", GT.TQ1_0
    reference = _by_name(ternary, "TQ1_0")


class TQ2_0(Blocks):
    name, ggml = "TQ2_0", GT.TQ2_0
    reference = _by_name(ternary, "TQ2_0")


class Q1_0(Blocks):
    name, ggml = "Q1_0", GT.Q1_0
    # d = mean |x| of 128 weights as f16: below 65504 the mean (with its float sum's rounding)
    # stays below 65520, where f16 becomes inf; from there a block of large values overflows
    overflow = 65504.0
    reference = Ref(q1_0.quantize, q1_0.dequantize)  # ggml ignores importance weights for Q1_0


class IQ3_XXS(Blocks):
    name, ggml = "IQ3_XXS", GT.IQ3_XXS
    lattice = "IQ3_XXS"
    # the largest value it stores is 65504 * 7.75 * 62 (f16 d, block scale 15, grid value 62);
    # far beyond, from |x| ~ 1e12, ggml's neighbour search finds no finite distance and aborts
    overflow = 65504.0 * 7.75 * 62
    reference = _by_name(iq3, "IQ3_XXS")


class IQ3_S(Blocks):
    name, ggml = "IQ3_S", GT.IQ3_S
    lattice = "IQ3_S"
    overflow = 65504.0 * 31 * 15  # f16 d, block scale 1 + 2*15, grid value 15; see IQ3_XXS
    reference = _by_name(iq3, "IQ3_S")


class IQ2_XXS(Blocks):
    name, ggml = "IQ2_XXS", GT.IQ2_XXS
    lattice, needs_imatrix = "IQ2_XXS", True
    # the largest value it stores is 65504 * 15.5 * 0.25 * 43 (f16 d, block scale 15, grid value
    # 43); beyond, d overflows, and from |x| ~ 1e12 ggml's neighbour search aborts (IQ2_XS, IQ2_S)
    overflow = 65504.0 * 15.5 * 0.25 * 43
    reference = _by_name(iq2, "IQ2_XXS")


class IQ2_XS(Blocks):
    name, ggml = "IQ2_XS", GT.IQ2_XS
    lattice, needs_imatrix = "IQ2_XS", True
    overflow = 65504.0 * 15.5 * 0.25 * 43  # see IQ2_XXS
    reference = _by_name(iq2, "IQ2_XS")


class IQ2_S(Blocks):
    name, ggml = "IQ2_S", GT.IQ2_S
    lattice = "IQ2_S"  # ggml quantizes it without importance weights too
    overflow = 65504.0 * 15.5 * 0.25 * 43  # see IQ2_XXS
    reference = _by_name(iq2, "IQ2_S")


class IQ1_S(Blocks):
    name, ggml = "IQ1_S", GT.IQ1_S
    lattice = "IQ1"
    needs_imatrix = True
    # the largest value it stores is 65504 * 15 * 1.125 (f16 d, block scale 2*7+1, grid value
    # 1 + delta 0.125); beyond, d overflows
    overflow = 65504.0 * 15 * 1.125
    reference = _by_name(iq1, "IQ1_S")


class IQ1_M(Blocks):
    name, ggml = "IQ1_M", GT.IQ1_M
    lattice = "IQ1"  # quantize_row_iq1_m_impl has a path without importance weights (x^2)
    overflow = 65504.0 * 15 * 1.125  # see IQ1_S
    reference = _by_name(iq1, "IQ1_M")




def get(name: str) -> type[BlockType]:
    try:
        return REGISTRY[name.upper()]
    except KeyError:
        raise ValueError(f"unknown block type {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def to_float32(dtype: str, a: np.ndarray, threads: int = 1) -> np.ndarray:
    """A checkpoint array (F32/F16/BF16 bits/F64) as C-contiguous float32."""
    if dtype == "F32":
        return np.ascontiguousarray(a, dtype=np.float32)
    if dtype in ("F16", "BF16"):
        a = np.ascontiguousarray(a).view(np.uint16)
        if _k is None:
            return floats.f16_to_f32(a) if dtype == "F16" else floats.bf16_to_f32(a)
        out = np.empty(a.shape, dtype=np.float32)
        _k.convert("f16>f32" if dtype == "F16" else "bf16>f32", a, out, threads)
        return out
    if dtype == "F64":
        return np.ascontiguousarray(a, dtype=np.float32)
    raise ValueError(f"cannot read {dtype} as float")


def first_nonfinite(a: np.ndarray) -> int:
    """Index (flat) of the first NaN or Inf in a float32 array, or -1."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if _k is None:
        return floats.first_nonfinite(a)
    return int(_k.first_nonfinite(a))
