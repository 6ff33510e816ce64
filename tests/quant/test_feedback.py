"""Error-feedback rounding in the GGUF block types (quant/feedback.py): each codec's bytes, the
grid the type's own quantizer rounds to, and a lower output error than importance-weighted
rounding to nearest on correlated inputs, for every type it handles."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from qconvert.quant import blocks, feedback
from tests.oracles import ggml_dequantize

TYPES = sorted(feedback.CODECS)


def ggml_scales(monkeypatch, name: str) -> None:
    """The type's scales as ggml's quantizer chooses them, without the wider search."""
    monkeypatch.setitem(feedback.CODECS, name, dataclasses.replace(feedback.CODECS[name], search=False))


def correlated_inputs(K: int, n: int = 2048, seed: int = 0) -> torch.Tensor:
    """Inputs whose columns are mixed and of very different sizes, as a layer's are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(K) + 0.3 * torch.randn(K, K, generator=g) / K ** 0.5
    return torch.randn(n, K, generator=g) @ mix * torch.exp(torch.randn(K, generator=g))


@pytest.mark.parametrize("name", TYPES)
def test_codes_written_into_the_blocks_decode_as_the_grid_says(name):
    """pack() puts every code where the format keeps it: random codes in the quantizer's blocks
    decode (ggml's own dequantizer, through libggml-base) to a * code + b (a * table[code]):
    a code in the wrong place would be off by whole steps."""
    t, codec = blocks.get(name), feedback.CODECS[name]
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((6, 512)) * rng.uniform(0.01, 3, (6, 1))).astype(np.float32)
    data = t.quantize(x).reshape(-1, t.block_bytes).copy()
    a, b = codec.grid(data)
    codes = rng.integers(0, codec.levels, size=a.shape)
    codec.pack(data, codes)
    values = a * (codec.table[codes] if codec.table is not None else codes) + b
    decoded = ggml_dequantize(int(t.ggml), data, t.block)
    # ggml computes d (q - 32) where the grid says d q - 32 d: the last bit may differ
    np.testing.assert_allclose(decoded, values, rtol=1e-6, atol=1e-6 * np.abs(values).max())


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL"])
def test_without_correlation_the_bytes_are_the_quantizers(name, monkeypatch):
    """With inputs that do not correlate (H diagonal) no error has anywhere to go: each weight
    is rounded to the nearest point of the grid its block's scales make, which is what ggml's
    quantizer does for these types; the bytes are its bytes (IQ4_NL's scales as ggml's own
    search chooses them)."""
    ggml_scales(monkeypatch, name)
    t = blocks.get(name)
    rng = np.random.default_rng(2)
    W = rng.standard_normal((16, 512)).astype(np.float32)
    weights = rng.uniform(0.1, 4, 512).astype(np.float32)
    r = feedback.quantize(torch.from_numpy(W), torch.diag(torch.from_numpy(weights * 2)), t, weights,
                          act_order=False)
    np.testing.assert_array_equal(r.data, t.quantize(W, 1, weights))
    assert r.error == pytest.approx(r.rtn_error)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_blocks_get_the_scales_of_their_whole_rows(name, monkeypatch):
    """The legacy types weigh a block's importance by its whole row's mean square
    (quantize_row_*_impl); quantized one block at a time, each block still gets the scales (and
    mins) ggml's quantizer gives it within its row. Without correlation the codes are the nearest
    points of the stored grid (ggml rounds with the scale before its f16 rounding, so its own
    codes are not always the nearest: a few differ, each by one step)."""
    ggml_scales(monkeypatch, name)
    t, codec = blocks.get(name), feedback.CODECS[name]
    rng = np.random.default_rng(2)
    W = rng.standard_normal((16, 512)).astype(np.float32)
    weights = rng.uniform(0.1, 4, 512).astype(np.float32)
    r = feedback.quantize(torch.from_numpy(W), torch.diag(torch.from_numpy(weights * 2)), t, weights,
                          act_order=False)
    ours, ggml = r.data.reshape(-1, t.block_bytes), t.quantize(W, 1, weights).reshape(-1, t.block_bytes)
    scale_bytes = 2 if name in ("Q4_0", "Q5_0") else 4
    np.testing.assert_array_equal(ours[:, :scale_bytes], ggml[:, :scale_bytes])
    a, b = codec.grid(ours)
    x = W.reshape(-1, 32)
    nearest = np.clip(np.rint((x - b) / a), 0, codec.levels - 1) * a + b
    np.testing.assert_array_equal(r.weight.numpy().reshape(-1, 32), nearest.astype(np.float32))
    theirs = t.dequantize(ggml, (16, 512)).reshape(-1, 32)
    assert (np.abs(theirs - nearest) <= 1.0001 * np.abs(a)).all()
    assert r.error <= r.rtn_error


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", TYPES)
def test_error_feedback_beats_rounding_to_nearest(name, act_order):
    """On correlated inputs the output error tr((W - W') H (W - W')^T) is well below the type's
    own importance-weighted rounding to nearest (same importance weights, same sizes), and the
    blocks decode to the weight the result reports."""
    t = blocks.get(name)
    K, N = 512, 96
    X = correlated_inputs(K)
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(3)) * 0.05
    im = (X * X).mean(0).numpy()
    r = feedback.quantize(W, H, t, im, act_order=act_order)
    assert r.data.shape == (N, t.nbytes((N, K)) // N) and r.data.dtype == np.uint8
    np.testing.assert_array_equal(r.weight.numpy(), t.dequantize(r.data, (N, K)))
    assert r.error < 0.95 * r.rtn_error, (r.error, r.rtn_error)


SEARCHED = [n for n in TYPES if feedback.CODECS[n].search]


@pytest.mark.parametrize("name", SEARCHED)
def test_the_wider_scale_search_never_loses_to_ggmls(name):
    """search_scale keeps ggml's scale unless a candidate rounds the block with a lower
    importance-weighted error at its stored (f16) scale; on blocks with an outlier, clipping it
    or a coarser grid wins in many blocks."""
    t, codec = blocks.get(name), feedback.CODECS[name]
    assert name in ("Q4_0", "Q5_0", "Q8_0", "IQ4_NL")
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((400, 32)) * rng.uniform(0.01, 3, (400, 1))).astype(np.float32)
    x[::2, 5] *= 6  # an outlier in every other block
    w = rng.uniform(0.1, 4, 32).astype(np.float32)
    ggml = t.quantize(x, 1, w)
    ours = ggml.copy()
    feedback.search_scale(ours, x, w, codec)
    assert np.array_equal(ours[:, 2:], ggml[:, 2:])  # the scale alone moves

    def error(data):
        a, b = codec.grid(data)
        if codec.table is None:
            q = np.clip(np.rint((x - b) / a), 0, codec.levels - 1) * a + b
        else:
            v = x / a
            q = codec.table[np.abs(v[..., None] - codec.table).argmin(-1)] * a
        return (w * (x - q) ** 2).sum(1)
    theirs, mine = error(ggml), error(ours)
    assert (mine <= theirs * (1 + 1e-6)).all()
    assert (mine < 0.99 * theirs).mean() > 0.2, (mine < 0.99 * theirs).mean()
    assert mine.sum() < 0.99 * theirs.sum()


@pytest.mark.skipif(blocks._k is None, reason="the C kernel's search against torch's")
@pytest.mark.parametrize("name", SEARCHED)
def test_the_c_scale_search_is_the_torch_search(name, monkeypatch):
    t, codec = blocks.get(name), feedback.CODECS[name]
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((3000, 32)) * rng.uniform(0.01, 3, (3000, 1))).astype(np.float32)
    x[::3, 9] *= 5
    x[7] = 0  # an empty block keeps its zero scale
    w = rng.uniform(0.1, 4, 32).astype(np.float32)
    ggml = t.quantize(x, 1, w)
    c, pure = ggml.copy(), ggml.copy()
    feedback.search_scale(c, x, w, codec, threads=2)
    monkeypatch.setattr(blocks, "_k", None)
    feedback.search_scale(pure, x, w, codec)
    same = (c[:, :2] == pure[:, :2]).all(1)
    assert same.mean() > 0.995 and same[7] and not c[7, :2].any()


def test_columns_without_input_keep_their_weights():
    """A column no calibration input reached is rounded on its own, not zeroed as GPTQ's
    checkpoints zero it: other text may reach it."""
    t = blocks.get("Q4_K")
    X = correlated_inputs(256)
    X[:, 7] = 0
    W = torch.randn(8, 256) * 0.05
    W[:, 7] = 0.3
    r = feedback.quantize(W, 2 * X.T @ X / X.shape[0], t)
    assert torch.allclose(r.weight[:, 7], W[:, 7], rtol=0.2)


def test_partial_blocks_are_refused():
    with pytest.raises(ValueError, match="whole blocks"):
        feedback.quantize(torch.zeros(4, 300), torch.eye(300), blocks.get("Q4_K"))
    assert not feedback.supports(blocks.get("IQ2_XXS")) and feedback.supports(blocks.get("IQ4_XS"))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_a_rows_mean_squares_give_its_blocks_their_bytes_one_at_a_time(name):
    """quantize(mean_squares=) of a row's blocks one column of blocks at a time, given the whole
    rows' mean squares, is the whole rows' quantization byte for byte (C and numpy alike)."""
    from qconvert.quant.reference.legacy import row_mean_squares

    t = blocks.get(name)
    rng = np.random.default_rng(5)
    W = (rng.standard_normal((24, 256)) * rng.uniform(0.01, 3, (24, 1))).astype(np.float32)
    weights = rng.uniform(0.1, 4, 256).astype(np.float32)
    ms = row_mean_squares(W)
    parts = [t.quantize(np.ascontiguousarray(W[:, i:i + 32]), 1, weights[i:i + 32], mean_squares=ms)
             for i in range(0, 256, 32)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), t.quantize(W, 1, weights))
    with pytest.raises(ValueError, match="mean squares"):
        blocks.get("Q4_K").quantize(W, 1, weights, mean_squares=ms)
    with pytest.raises(ValueError, match="mean squares"):
        t.quantize(W, 1, None, mean_squares=ms)


@pytest.mark.skipif(blocks._k is None, reason="the C kernel's loop against torch's")
@pytest.mark.parametrize("name", ["Q4_K", "IQ4_NL"])
def test_the_c_column_loop_is_the_torch_loop(name):
    """kernels/feedback.c runs _round_block's torch loop: the same codes (but where a last-bit
    difference in an update moves a weight across a rounding boundary), updates and errors."""
    t, codec = blocks.get(name), feedback.CODECS[name]
    B, N = t.block, 300
    X = correlated_inputs(B, seed=4)
    H = 2 * X.T @ X / X.shape[0]
    U, _ = feedback._hinv_upper(H, 0.01)
    rng = np.random.default_rng(6)
    W = torch.from_numpy((rng.standard_normal((N, B)) * 0.05).astype(np.float32))
    a, b = (torch.from_numpy(np.ascontiguousarray(g.T)) for g in codec.grid(t.quantize(W.numpy(), 1)))
    table = torch.from_numpy(codec.table) if codec.table is not None else None
    mids = (table[1:] + table[:-1]) / 2 if table is not None else None
    got = {}
    for backend in ("c", "torch"):
        W1, Err = W.t().contiguous(), torch.empty(B, N)
        k = blocks._k
        if backend == "torch":
            blocks._k = None
        try:
            codes = feedback._round_block(W1, U, a, b, codec.levels, table, mids, Err, 2)
        finally:
            blocks._k = k
        got[backend] = codes, W1, Err
    (c1, w1, e1), (c2, w2, e2) = got["c"], got["torch"]
    assert (c1 == c2).float().mean() > 0.995
    torch.testing.assert_close(w1, w2, rtol=1e-3, atol=1e-4)
    assert (e1 - e2).abs().mean() < 1e-3 * e2.abs().mean()
