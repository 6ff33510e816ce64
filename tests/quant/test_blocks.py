"""Block kernels against ggml's own quantizers, byte for byte, and C against the numpy reference."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT

from qconvert import _kernels
from qconvert.quant import blocks
from qconvert.quant.reference import floats, lattice, q8_0
from tests.oracles import ggml_dequantize, ggml_quantize


def cases(n: int = 256) -> dict[str, np.ndarray]:
    """Rows that exercise every branch: 16 rows each."""
    rng = np.random.default_rng(1)
    ties = np.tile(np.arange(-63.5, 64.5, 1.0, dtype=np.float32)[:32], (16, n // 32))
    ties[:, ::32] = 127.0  # amax 127 -> id 1: every x*id lands exactly on a .5 tie of roundf
    outlier = rng.normal(size=(16, n)).astype(np.float32)
    outlier[np.arange(16), rng.integers(0, n, 16)] = 1e4
    rep = np.random.default_rng(2)  # its own stream: the cases above stay as they were
    repeats = rep.integers(-3, 4, size=(16, n)).astype(np.float32)
    repeats[:8] = np.where(repeats[:8] == 0, rep.choice(np.array([0.0, -0.0], np.float32), size=(8, n)), repeats[:8])
    repeats[8:] = rep.choice(np.array([0.3, 1.0], np.float32), size=(8, n))
    return {
        "gaussian": rng.normal(size=(16, n)).astype(np.float32),
        "student_t": rng.standard_t(2.0, size=(16, n)).astype(np.float32),
        "outliers": outlier,
        "zeros": np.zeros((16, n), np.float32),
        "constant": np.full((16, n), 0.3, np.float32),
        "mixed_zero_blocks": np.where(np.arange(n) // 32 % 2 == 0, rng.normal(size=(16, n)), 0).astype(np.float32),
        "tiny": (rng.normal(size=(16, n)) * 1e-30).astype(np.float32),
        "subnormal_scale": (rng.normal(size=(16, n)) * 1e-6).astype(np.float32),
        "huge": (rng.normal(size=(16, n)) * 1e30).astype(np.float32),
        "ties": ties,
        "negative_ties": -ties,
        # x / max |x| exactly +-0.5 and +-0.75 (TQ's lroundf rounds halves away from zero)
        "halves": np.tile(np.array([2.0, 1.0, -1.0, 0.5, -0.5, 1.5, -1.5, 0.0], np.float32), (16, n // 8)),
        # 0 and +-1 or 2 of the smallest subnormal: block maxima whose scale max/15 is 0 (IQ3_S
        # then writes its groups under d = 0)
        "denormal": (rng.integers(-2, 3, size=(16, n)) * np.float32(1.4e-45)).astype(np.float32),
        # mostly zeros: the IQ2 sign-parity fix-up meets ties (the first zero is flipped) and its
        # neighbour search equal distances
        "sparse": np.where(rng.random((16, n)) < 0.3, rng.normal(size=(16, n)), 0).astype(np.float32),
        # every 16 weights their own magnitude, 1e-17 to 1e-6: groups either side of the
        # GROUP_MAX_EPS thresholds (1e-15; IQ2_S 1e-8) and weights that underflow
        "near_eps": (rng.normal(size=(16, n)) * np.repeat(10.0 ** rng.uniform(-17, -6, (16, n // 16)), 16, axis=1)
                     ).astype(np.float32),
        # few distinct values, +0 and -0 among them: the IQ1 types sort a block, and the order of
        # equal values (glibc's qsort keeps index order) and neighbour-search ties change their bytes
        "repeats": repeats,
    }


QUANT_TYPES = ["Q8_0", "MXFP4", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "Q2_K", "Q3_K", "TQ1_0", "TQ2_0",
               "Q1_0", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"]

# cases on which ggml_quantize_chunk aborts the process (GGML_ASSERT), so they cannot be compared
# with it: for "huge" the i-quants' squared weights overflow to inf and the neighbour search finds
# no finite distance. Ours take the first neighbour there, C and numpy alike, and are held to each
# other; the pipeline refuses such values first (BlockType.overflow).
GGML_ABORTS = {("IQ3_XXS", "huge"), ("IQ3_S", "huge"), ("IQ2_XS", "huge"), ("IQ2_S", "huge")}


def kernel_ready(kind: str) -> type[blocks.BlockType]:
    """The block type, its lattice built in the C kernels (as Blocks.quantize does first; here
    directly, since these tests call the C kernels under QCONVERT_PUREPYTHON=1 too)."""
    bt = blocks.get(kind)
    if getattr(bt, "lattice", None):
        _kernels.lattice(bt.lattice, lattice.levels(bt.lattice).tobytes())
    return bt


def importance(n: int, seed: int = 11) -> np.ndarray:
    """An importance-matrix row as llama-imatrix makes them: positive, skewed, a few large."""
    rng = np.random.default_rng(seed)
    return (rng.lognormal(0, 1.5, n) * (rng.random(n) < 0.97) + 1e-3).astype(np.float32)


@pytest.mark.parametrize("imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("kind", QUANT_TYPES)
def test_every_type_is_ggml(kind, imatrix):
    """Every case, byte for byte against ggml_quantize_chunk, in the active backend (C, or
    numpy under QCONVERT_PUREPYTHON=1) and in the numpy reference itself."""
    bt = blocks.get(kind)
    if bt.needs_imatrix and not imatrix:
        pytest.skip(f"ggml_quantize_chunk aborts for {kind} without importance weights: see test_needs_imatrix")
    for case, rows in cases(512).items():
        qw = importance(rows.shape[1]) if imatrix else None
        if (kind, case) in GGML_ABORTS:
            assert np.array_equal(bt.quantize(rows, 2, qw), bt.reference.quantize(rows, qw)), case
            continue
        expect = ggml_quantize(int(bt.ggml), rows, qw)
        assert np.array_equal(bt.quantize(rows, 2, qw).reshape(-1), expect.reshape(-1)), case
        assert np.array_equal(bt.reference.quantize(rows, qw).reshape(-1), expect.reshape(-1)), case


@pytest.mark.parametrize("imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("kind", [k for k in QUANT_TYPES if blocks.get(k).block == 32])
def test_rows_of_blocks_past_the_lanes(kind, imatrix):
    """Rows of 11 blocks of 32 (as Qwen2.5-0.5B's rows of 896 are 28), which the kernels search
    8 blocks at a time: the 3 past the last full 8 are searched in lanes filled with zeros."""
    bt = blocks.get(kind)
    for case, rows in cases(352).items():
        qw = importance(rows.shape[1]) if imatrix else None
        expect = ggml_quantize(int(bt.ggml), rows, qw)
        assert np.array_equal(bt.quantize(rows, 2, qw).reshape(-1), expect.reshape(-1)), case


@pytest.mark.parametrize("kind", [k for k in QUANT_TYPES if blocks.get(k).needs_imatrix])
def test_needs_imatrix(kind):
    """ggml_quantize_requires_imatrix types: refused without importance weights at every door
    (ggml_quantize_chunk aborts the process instead, so it is not called here)."""
    bt = kernel_ready(kind)
    rows = cases(256)["gaussian"]
    with pytest.raises(ValueError, match="importance weights are required"):
        bt.quantize(rows)
    with pytest.raises(ValueError, match="importance weights are required"):
        bt.reference.quantize(rows, None)
    with pytest.raises(ValueError, match="importance weights are required"):
        _kernels.quantize(kind, rows, np.empty((16, bt.nbytes((1, 256))), np.uint8), 16, 256, 1, None)


@pytest.mark.parametrize("kind", ["IQ1_S", "IQ1_M"])
def test_blocks_without_importance(kind):
    """Importance weights 0 over whole blocks: no split of the block has sumq2 > 0, and ggml
    leaves it a zero block (IQ1_M's d refit still counts it)."""
    bt = blocks.get(kind)
    qw = importance(512)
    qw[:64] = 0  # blocks 0-1 of IQ1_S, 0-3 of IQ1_M
    qw[300:316] = 0
    for case in ("gaussian", "repeats"):
        rows = cases(512)[case]
        expect = ggml_quantize(int(bt.ggml), rows, qw)
        assert np.array_equal(bt.quantize(rows, 2, qw), expect), case
        assert np.array_equal(bt.reference.quantize(rows, qw), expect), case


@pytest.mark.parametrize("kind", QUANT_TYPES)
def test_c_kernel_is_reference(kind):
    bt = kernel_ready(kind)
    rows = cases(256)["student_t"]
    for qw in ([] if bt.needs_imatrix else [None]) + [importance(256)]:
        out = np.empty((rows.shape[0], 256 // bt.block * bt.block_bytes), np.uint8)
        _kernels.quantize(kind, rows, out, rows.shape[0], 256, 1, qw)
        assert np.array_equal(out, bt.reference.quantize(rows, qw))


@pytest.mark.parametrize("kind", QUANT_TYPES)
def test_dequantize_is_gguf(kind):
    import gguf

    bt = kernel_ready(kind)
    rows = cases(512)["student_t"]
    data = ggml_quantize(int(bt.ggml), rows, importance(512) if bt.needs_imatrix else None)
    if kind == "Q1_0":  # gguf.quants has no Q1_0 dequantizer: ggml's own to_float
        expect = ggml_dequantize(int(bt.ggml), data, 512)
    else:
        expect = gguf.quants.dequantize(data, bt.ggml).reshape(rows.shape)
    assert np.array_equal(bt.dequantize(data, rows.shape), expect)
    assert np.array_equal(bt.reference.dequantize(data.reshape(-1), 512).reshape(rows.shape), expect)
    out = np.empty(rows.shape, np.float32)
    _kernels.dequantize(kind, data.reshape(-1), out, rows.shape[0], 512, 2)
    assert np.array_equal(out, expect)


def test_q1_0_sums_in_index_order():
    """Q1_0's d is the float sum of |x| in index order over 128: here 128.0625 then 127 x 2^-18,
    each lost to rounding, so d = 1 + 2^-11 exactly, an f16 tie that goes down to 1.0 (a
    pairwise sum keeps the small ones and rounds up). -0.0 is a positive sign, NaN a negative."""
    rows = np.full((3, 128), 2.0 ** -18, np.float32)
    rows[:, 0] = 128.0625
    rows[1] *= -1
    rows[1, 5] = -0.0
    rows[2, 3] = np.nan
    expect = ggml_quantize(int(GT.Q1_0), rows)
    assert expect[0, :2].view(np.float16)[0] == 1.0 and expect[1, 2:4].tolist() == [32, 0]
    assert np.array_equal(blocks.Q1_0.quantize(rows), expect)
    assert np.array_equal(blocks.Q1_0.reference.quantize(rows, None), expect)
    out = np.empty_like(expect)
    _kernels.quantize("Q1_0", rows, out, 3, 128, 1, None)
    assert np.array_equal(out, expect)


def test_mxfp4_exponent_at_powers_of_two():
    """MXFP4's exponent is floorf(log2f(amax)): a block maximum a float32 step or a few below a
    power of two has a log2f that rounds up to the integer (a larger exponent than its binary
    one), further below it does not; also maxima past the grid's end (7.9 * 2^e clamps to 6),
    the smallest subnormals, and the largest finite floats."""
    below = [np.nextafter(np.float32(2.0 ** k), np.float32(0)) for k in (-20, -7, -1, 0, 1, 5, 30)]
    further = [np.float32(2.0 ** k) * np.float32(1 - 2.0 ** -20) for k in (-7, 0, 5)]
    maxima = np.array(below + further + [7.9, 0.2499, 1.4e-45, 3e-45, 3.4e38, -3.4e38, 2.0 ** -126], np.float32)
    rng = np.random.default_rng(5)
    rows = (rng.uniform(-1, 1, size=(maxima.size, 64)) * np.abs(maxima[:, None])).astype(np.float32)
    rows[:, 7] = maxima
    rows[:, 40] = maxima
    expect = ggml_quantize(int(GT.MXFP4), rows)
    assert np.array_equal(blocks.MXFP4.reference.quantize(rows), expect)
    out = np.empty_like(expect)
    _kernels.quantize("MXFP4", rows, out, rows.shape[0], 64, 1, None)
    assert np.array_equal(out, expect)


def test_q8_0_on_real_weights_and_gguf_reference():
    import gguf

    rng = np.random.default_rng(7)
    rows = (rng.standard_t(4, size=(64, 576)) * 0.02).astype(np.float32)  # SmolLM2's row length
    assert np.array_equal(blocks.Q8_0.quantize(rows).reshape(-1), gguf.quants.quantize(rows, GT.Q8_0).reshape(-1))


@pytest.mark.parametrize("kind", QUANT_TYPES)
def test_bytes_do_not_depend_on_threads(kind):
    bt = kernel_ready(kind)
    rows = np.random.default_rng(3).normal(size=(37, 512)).astype(np.float32)
    qw = importance(512)
    outs = []
    for threads in (1, 2, 3, 8):
        out = np.empty((37, 512 // bt.block * bt.block_bytes), np.uint8)
        _kernels.quantize(kind, rows, out, 37, 512, threads, qw)
        outs.append(out)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("kind", ["IQ3_XXS", "IQ3_S"])
def test_iq3_negative_scale(kind):
    """A block whose least-squares scale comes out negative: IQ3_XXS's parity fix-up turns the
    magnitude of a heavily weighted element negative (here -0.001 with importance 1000 beside
    1.0 with 0.005), ggml then makes the scale positive and flips every sign."""
    import gguf

    bt = blocks.get(kind)
    rows = np.ones((2, 256), np.float32)
    rows[:, ::8] = -0.001
    rows[1] *= -1
    qw = np.full(256, 0.005, np.float32)
    qw[::8] = 1000
    expect = ggml_quantize(int(bt.ggml), rows, qw)
    assert np.array_equal(bt.quantize(rows, 1, qw), expect)
    assert np.array_equal(bt.reference.quantize(rows, qw), expect)
    back = gguf.quants.dequantize(expect, bt.ggml).reshape(rows.shape)
    flipped = np.mean(np.sign(back[:, 1::8]) == -np.sign(rows[:, 1::8]))
    assert flipped == (1.0 if kind == "IQ3_XXS" else 0.0)  # IQ3_S keeps 8 signs, no parity, no flip


def test_q8_0_dequantize_is_gguf():
    import gguf

    rows = np.random.default_rng(5).normal(size=(8, 128)).astype(np.float32)
    data = blocks.Q8_0.quantize(rows)
    expect = gguf.quants.dequantize(data, GT.Q8_0)
    assert np.array_equal(blocks.Q8_0.dequantize(data, (8, 128)), expect)
    assert np.array_equal(q8_0.dequantize(data, 128), expect)


def every_float_class() -> np.ndarray:
    u = np.arange(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32)  # a sweep of all bit patterns
    edges = np.array([0x00000000, 0x80000000, 0x33000000, 0x33000001, 0x387FE000, 0x387FF000, 0x38800000,
                      0x477FE000, 0x477FEFFF, 0x477FF000, 0x47800000, 0x7F7FFFFF, 0x7F800000, 0xFF800000],
                     dtype=np.uint32)
    f = np.concatenate([u, edges]).view(np.float32)
    return f[np.isfinite(f)]


def test_f16_and_bf16_conversions_are_gguf():
    import gguf

    f = every_float_class()[None, :]
    with np.errstate(over="ignore"):
        assert np.array_equal(blocks.F16.quantize(f).view(np.uint16), f.astype(np.float16).view(np.uint16))
    expect = gguf.quants.quantize(f, GT.BF16).view(np.uint16)
    assert np.array_equal(blocks.BF16.quantize(f).view(np.uint16), expect)
    assert np.array_equal(floats.f32_to_bf16(f), expect)


def test_widening_conversions():
    h = np.arange(65536, dtype=np.uint16)
    h = h[np.isfinite(h.view(np.float16))]
    assert np.array_equal(blocks.to_float32("F16", h), h.view(np.float16).astype(np.float32))
    b = np.arange(0, 65536, 7, dtype=np.uint16)
    assert np.array_equal(blocks.to_float32("BF16", b).view(np.uint32), b.astype(np.uint32) << 16)


def test_c_float_kernels_match_reference_in_both_modes():
    f = every_float_class()
    out16 = np.empty(f.shape, np.uint16)
    _kernels.convert("f32>f16", f, out16, 2)
    with np.errstate(over="ignore"):
        assert np.array_equal(out16, f.astype(np.float16).view(np.uint16))
    outb = np.empty(f.shape, np.uint16)
    _kernels.convert("f32>bf16", f, outb, 2)
    assert np.array_equal(outb, floats.f32_to_bf16(f))


def test_nonfinite_scan():
    a = np.zeros((4, 64), np.float32)
    assert blocks.first_nonfinite(a) == -1
    a[2, 5] = np.inf
    a[3, 0] = np.nan
    assert blocks.first_nonfinite(a) == 2 * 64 + 5
    assert _kernels.first_nonfinite(a) == floats.first_nonfinite(a) == 133


def test_rows_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        blocks.Q8_0.quantize(np.zeros((2, 48), np.float32))
    with pytest.raises(ValueError, match="Q4_K: row length must be a multiple of 256, got 576"):
        blocks.Q4_K.quantize(np.zeros((2, 576), np.float32))
    with pytest.raises(ValueError, match="multiple of 32"):
        _kernels.quantize("Q8_0", np.zeros(96, np.float32), np.zeros(102, np.uint8), 2, 48, 1)
    with pytest.raises(ValueError, match="importance weights must have 256 values, got 255"):
        blocks.IQ4_NL.quantize(np.zeros((2, 256), np.float32), 1, np.ones(255, np.float32))
    qw = np.ones(256, np.float32)
    qw[7] = np.nan
    with pytest.raises(ValueError, match="finite and >= 0, got nan at column 7"):
        blocks.Q4_K.quantize(np.zeros((2, 256), np.float32), 1, qw)


def test_duplicate_block_type_is_an_error():
    with pytest.raises(TypeError, match="declared twice"):
        class Q8_0Again(blocks.BlockType):  # noqa: F841
            name = "Q8_0"


def test_backend_follows_the_switch():
    import os
    assert blocks.BACKEND == ("numpy" if os.environ.get("QCONVERT_PUREPYTHON") == "1" else "c")


def test_golden_vectors():
    """formats/gguf/golden holds ggml's output for fixed inputs (see make_golden.py there)."""
    import json
    from pathlib import Path

    golden = Path(__file__).resolve().parents[2] / "formats" / "gguf" / "golden"
    meta = json.loads((golden / "manifest.json").read_text())
    assert meta["entries"], "no golden vectors"
    for e in meta["entries"]:
        rows = np.fromfile(golden / e["input"], dtype="<f4").reshape(e["nrows"], e["n_per_row"])
        qw = np.fromfile(golden / e["imatrix"], dtype="<f4") if e.get("imatrix") else None
        expect = np.fromfile(golden / e["output"], dtype=np.uint8)
        kind = blocks.get(e["type"])
        assert np.array_equal(kind.quantize(rows, 1, qw).reshape(-1), expect), e["output"]
