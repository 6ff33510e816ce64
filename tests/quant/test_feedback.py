"""Error-feedback rounding in the GGUF block types (quant/feedback.py): each codec's bytes, the
grid the type's own quantizer rounds to, and a lower output error than importance-weighted
rounding to nearest on correlated inputs, for every type it handles."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qconvert.quant import blocks, feedback
from tests.oracles import ggml_dequantize

TYPES = sorted(feedback.CODECS)


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
def test_without_correlation_the_bytes_are_the_quantizers(name):
    """With inputs that do not correlate (H diagonal) no error has anywhere to go: each weight
    is rounded to the nearest point of the grid its block's scales make, which is what ggml's
    quantizer does for these types; the bytes are its bytes."""
    t = blocks.get(name)
    rng = np.random.default_rng(2)
    W = rng.standard_normal((16, 512)).astype(np.float32)
    weights = rng.uniform(0.1, 4, 512).astype(np.float32)
    r = feedback.quantize(torch.from_numpy(W), torch.diag(torch.from_numpy(weights * 2)), t, weights,
                          act_order=False)
    np.testing.assert_array_equal(r.data, t.quantize(W, 1, weights))
    assert r.error == pytest.approx(r.rtn_error)


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
