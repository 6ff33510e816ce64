"""Error-feedback rounding in llama.cpp's block formats: GPTQ's column-by-column rounding, each
error compensated by the columns not yet rounded through the inverse Hessian of the layer's
inputs, with every block's scales (and mins) chosen by ggml's own search (widened for the types
with one scale per block of 32: search_scale), so the bytes are a file of exactly
llama-quantize's type and size.

One linear W [N out, K in] at a time, with H = 2/n X^T X of its calibration inputs. Columns go in
super-blocks of the type's block size along K (256 for the K-quants and IQ4_XS, 32 otherwise).
When a super-block begins, its columns as the earlier rounding errors have left them are
quantized by the type's own quantizer (the C kernel, byte-identical to ggml, with the importance
weights llama-quantize would use; the legacy types' weights take the whole row's mean square,
as llama-quantize's do, though the quantizer sees one block of the row), and for Q4_0, Q5_0,
Q8_0 and IQ4_NL its scale is then searched again over a wider range by the importance alone:
that fixes the block's scales and mins, the "grid". Then its columns are rounded one at a time to the nearest point of
their sub-block's grid, by descending diag(H) within the block (act-order within what the format
allows: the block's columns are fixed by the format, their order is free), each error spread
over the block's later columns through the upper Cholesky factor of H^-1, and the block's
accumulated error over the remaining super-blocks at its end (the lazy batch update). The
feedback moves the weights it has not yet rounded, so the scales are then chosen again, by the
same quantizer, from the weights as they were when rounded, and the block is rounded once more
from its start with those (scales and feedback alternated once: on SmolLM2-135M's q2_k the
output error fell from 0.193x to 0.175x rounding to nearest's; a second alternation did not
help). The column loop is kernels/feedback.c (every output row runs on its own, so rows are
split over threads), or the same steps in torch without the C kernels. The codes are written
into the block's bytes in place of the quantizer's own; the scales stay as chosen.

A column whose input was always zero in calibration (diag(H) = 0) is kept, not zeroed as GPTQ
does for its checkpoints (it may see input on other text): it gets H = 1 there, so it is rounded
on its own, receiving and spreading no error.

Each type's codec knows its bytes: `grid(data)` gives every weight's step a and offset b
(value = a * code + b, or a * table[code] for IQ4's non-uniform levels) from the quantizer's
block bytes, `pack(data, codes)` writes codes into them. The lattice i-quants (IQ3_*, IQ2_*,
IQ1_*) and the ternary types have no per-weight grid (their points are vectors of 4 or 8
weights on a lattice) and are not handled here: `supports()` says which are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from qconvert.quant import blocks
from qconvert.quant.blocks import BlockType
from qconvert.quant.gptq import ERROR_ROWS, _hinv_upper, output_error
from qconvert.quant.reference import iq4_nl, kquants, legacy

F = np.float32


def _f16(data: np.ndarray, at: int) -> np.ndarray:
    """The f16 at byte `at` of every block [B, bytes] as float32 [B, 1]."""
    return np.ascontiguousarray(data[:, at:at + 2]).view(np.float16).astype(F)


@dataclass(frozen=True)
class Codec:
    """A block type's codes: `levels` codes 0..levels-1 per weight; `grid(data [B, bytes]) ->
    (a, b) [B, block]` each weight's step and offset; `pack(data, codes [B, block])` the bytes
    with those codes; `table`: the non-uniform values (value = a * table[code], b = 0)."""

    levels: int
    grid: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    pack: Callable[[np.ndarray, np.ndarray], None]
    table: np.ndarray | None = None
    # one scale per block of 32 at its first two bytes, value = d * level: the scale search widened
    # (search_scale); the levels are table's, or the integers from -levels / 2 up
    search: bool = False

    def level_values(self) -> np.ndarray:
        if self.table is not None:
            return self.table
        return np.arange(self.levels, dtype=F) - self.levels // 2


# ---- legacy types and Q8_0: blocks of 32, one scale (and min) ----------------------------------

def _legacy_grid(shift: int | None):
    """Q4_0 (shift 8), Q5_0 (16): value = d (q - shift); Q4_1, Q5_1 (None): d q + m."""
    def grid(data):
        d = _f16(data, 0)
        a = np.repeat(d, 32, axis=1)
        b = -shift * a if shift is not None else np.repeat(_f16(data, 2), 32, axis=1)
        return a, b
    return grid


def _legacy_pack(qs_at: int, five: bool):
    def pack(data, codes):
        if five:
            data[:, qs_at - 4:qs_at] = legacy._qh(codes)
        data[:, qs_at:qs_at + 16] = legacy._nibbles(codes)
    return pack


def _q8_0_grid(data):
    a = np.repeat(_f16(data, 0), 32, axis=1)
    return a, -128 * a


def _q8_0_pack(data, codes):
    data[:, 2:34] = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)


# ---- K-quants: super-blocks of 256 ---------------------------------------------------------------

def _kx_grid(data):
    """Q4_K, Q5_K: value = d sc_j q - dmin m_j, sub-block j of 32."""
    sc, m = kquants.unpack_scales(data[:, 4:16])
    a = np.repeat(_f16(data, 0) * sc.astype(F), 32, axis=1)
    b = -np.repeat(_f16(data, 2) * m.astype(F), 32, axis=1)
    return a, b


def _q4_k_pack(data, codes):
    L = codes.astype(np.uint8).reshape(-1, 4, 2, 32)  # [pair of sub-blocks][low/high nibble][32]
    data[:, 16:144] = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)


def _q5_k_pack(data, codes):
    L = codes.astype(np.uint8).reshape(-1, 4, 2, 32)
    low = L & 0x0F
    data[:, 48:176] = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)  # bit 2p + h of qh[l]
    hi = ((L >> 4) & 1) << shifts[None, :, :, None]
    data[:, 16:48] = np.bitwise_or.reduce(hi.reshape(-1, 8, 32), axis=1)


def _q6_k_grid(data):
    """value = d sc_j (q - 32), sub-block j of 16."""
    sc = data[:, 192:208].copy().view(np.int8).astype(F)
    a = np.repeat(_f16(data, 208) * sc, 16, axis=1)
    return a, -32 * a


def _q6_k_pack(data, codes):
    L = codes.astype(np.uint8).reshape(-1, 2, 4, 32)  # [half][quarter][l]
    ql = np.concatenate([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                         (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], axis=2)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    data[:, :128], data[:, 128:192] = ql.reshape(-1, 128), qh.reshape(-1, 64)


def _q3_k_grid(data):
    """value = d s_j (q - 4), s_j signed (six bits minus 32), sub-block j of 16."""
    a = np.repeat(_f16(data, 108) * kquants._q3_unscales(data[:, 96:108]).astype(F), 16, axis=1)
    return a, -4 * a


def _q3_k_pack(data, codes):
    L = codes.astype(np.uint8)
    high = (L > 3).reshape(-1, 8, 32).astype(np.uint8)  # bit k of hmask[l]: element 32k + l above 3
    data[:, :32] = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    data[:, 32:96] = kquants._pack2(L & 3)


def _q2_k_grid(data):
    """value = d (sc_j & 15) q - dmin (sc_j >> 4), sub-block j of 16."""
    sc = data[:, :16]
    a = np.repeat(_f16(data, 80) * (sc & 0xF).astype(F), 16, axis=1)
    b = -np.repeat(_f16(data, 82) * (sc >> 4).astype(F), 16, axis=1)
    return a, b


def _q2_k_pack(data, codes):
    data[:, 16:80] = kquants._pack2(codes)


# ---- IQ4: the non-uniform 16 levels --------------------------------------------------------------

def _iq4_nl_grid(data):
    a = np.repeat(_f16(data, 0), 32, axis=1)
    return a, np.zeros_like(a)


def _iq4_nl_pack(data, codes):
    data[:, 2:18] = iq4_nl._pack(codes)


def _iq4_xs_grid(data):
    """value = d (ls_k - 32) table[q], block k of 32 (6-bit ls: 4 low bits in scales_l, 2 in scales_h)."""
    scales_h = data[:, 2:4].copy().view("<u2").astype(np.int32)  # [B, 1]
    low = np.stack([(data[:, 4 + k // 2] >> (4 * (k % 2))) & 0xF for k in range(8)], axis=1).astype(np.int32)
    ls = low | (((scales_h >> (2 * np.arange(8))) & 3) << 4)
    a = np.repeat(_f16(data, 0) * (ls - 32).astype(F), 32, axis=1)
    return a, np.zeros_like(a)


def _iq4_xs_pack(data, codes):
    data[:, 8:136] = iq4_nl._pack(codes.reshape(-1, 32)).reshape(-1, 128)


CODECS: dict[str, Codec] = {
    "Q8_0": Codec(256, _q8_0_grid, _q8_0_pack, search=True),
    "Q4_0": Codec(16, _legacy_grid(8), _legacy_pack(2, False), search=True),
    "Q4_1": Codec(16, _legacy_grid(None), _legacy_pack(4, False)),
    "Q5_0": Codec(32, _legacy_grid(16), _legacy_pack(6, True), search=True),
    "Q5_1": Codec(32, _legacy_grid(None), _legacy_pack(8, True)),
    "Q2_K": Codec(4, _q2_k_grid, _q2_k_pack),
    "Q3_K": Codec(8, _q3_k_grid, _q3_k_pack),
    "Q4_K": Codec(16, _kx_grid, _q4_k_pack),
    "Q5_K": Codec(32, _kx_grid, _q5_k_pack),
    "Q6_K": Codec(64, _q6_k_grid, _q6_k_pack),
    "IQ4_NL": Codec(16, _iq4_nl_grid, _iq4_nl_pack, iq4_nl.KVALUES.astype(F), search=True),
    "IQ4_XS": Codec(16, _iq4_xs_grid, _iq4_xs_pack, iq4_nl.KVALUES.astype(F)),
}


# the divisors tried besides ggml's: the block's largest magnitude at this fraction of the grid's
# largest level (below 1 a coarser grid, above it the largest weights clipped)
SEARCH = torch.linspace(0.5, 1.25, 21)


def search_scale(data: np.ndarray, rows: np.ndarray, w: np.ndarray, codec: Codec, threads: int = 1) -> None:
    """A block-of-32 type's scale d (value = d * level) chosen again, in place in `data` [B, bytes],
    for the blocks `rows` [B, 32] with importance weights w [32]: among the quantizer's own d and
    d = m / (level[0] f), m the block's largest weight in magnitude (its sign kept), level[0] the
    grid's largest in magnitude, f in SEARCH, each rounded to f16 and then refitted by weighted
    least squares for the levels it rounds to (d' = sum(w x l) / sum(w l^2)), the one with the
    lowest sum(w (x - d l)^2) (the first such: the quantizer's on a tie). ggml's quantizers try
    d within 10% of m / level[0] (Q8_0 only m / 127), weighted by the importance times
    sqrt(sigma2 + x^2), which suits rounding each weight to its nearest level; rounded with
    feedback, the importance alone (H's diagonal) is the objective, and a grid that clips the
    largest weights or leaves room around them often does better (on SmolLM2-135M, auto-round's
    q3_k_m types, mostly Q5_0: KL divergence 0.0330 -> 0.0239). The C kernel (kernels/feedback.c)
    where it is built, else the same steps in torch (a last-bit difference in a sum may pick
    another of two near-equal candidates)."""
    if blocks._k is not None:
        d = np.ascontiguousarray(_f16(data, 0).reshape(-1))
        blocks._k.search_scale(np.ascontiguousarray(rows, dtype=F), np.ascontiguousarray(w, dtype=F),
                               np.ascontiguousarray(codec.level_values(), dtype=F), int(codec.table is not None),
                               SEARCH.numpy(), d, len(rows), threads)
        data[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
        return
    levels = torch.from_numpy(codec.level_values())
    X = torch.from_numpy(rows)
    W = torch.from_numpy(np.ascontiguousarray(w, dtype=F))[None, None, :]
    m = X.gather(1, X.abs().argmax(1, keepdim=True))  # [B, 1]
    d = torch.cat([torch.from_numpy(_f16(data, 0)), m / (levels[0] * SEARCH)[None, :]], 1).half().float()
    Xc = X[:, None, :]  # [B, 1, 32] against the candidates [B, C, 1]

    def error(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(each candidate's weighted error, the levels it rounds to) for scales d [B, C]."""
        L = _nearest(Xc / torch.where(d == 0, torch.ones_like(d), d)[..., None], levels, codec.table is not None)
        return torch.nan_to_num((W * (Xc - d[..., None] * L) ** 2).sum(-1), nan=float("inf")), L

    e, L = error(d)
    den = (W * L * L).sum(-1)
    fit = torch.where(den > 0, (W * Xc * L).sum(-1) / torch.where(den > 0, den, torch.ones_like(den)), d).half().float()
    e2, _ = error(fit)
    better = e2 < e
    d, e = torch.where(better, fit, d), torch.where(better, e2, e)
    best = d.gather(1, e.argmin(1, keepdim=True))  # argmin: the first lowest
    data[:, :2] = best.numpy().astype(np.float16).view(np.uint8).reshape(-1, 2)


def _nearest(v: torch.Tensor, levels: torch.Tensor, table: bool) -> torch.Tensor:
    """The level nearest each of v (levels ascending; uniform ones: integers from levels[0])."""
    if not table:
        return torch.clamp(torch.round(v), float(levels[0]), float(levels[-1]))
    return levels[torch.bucketize(v, (levels[1:] + levels[:-1]) / 2)]


def supports(t: type[BlockType]) -> bool:
    """Whether `t`'s weights can be rounded one at a time here (a per-weight grid)."""
    return t.name in CODECS


@dataclass
class FeedbackResult:
    data: np.ndarray  # the tensor's blocks, uint8 [N, K / block * block bytes]
    weight: torch.Tensor  # what the file decodes to, float32 [N, K]
    damp: float  # the damping that factorised
    error: float  # tr((W - W') H (W - W')^T) / N on sampled rows (gptq.output_error)
    rtn_error: float  # the same for the type's own quantizer on W with the same importance weights


def quantize(W: torch.Tensor, H: torch.Tensor, t: type[BlockType], imatrix: np.ndarray | None = None,
             damp: float = 0.01, act_order: bool = True, threads: int = 1) -> FeedbackResult:
    """W [N, K] (float32) in block type `t` with error feedback through H [K, K]. `imatrix`: the
    importance weights [K] the type's quantizer chooses the scales with (llama-quantize's; by
    default each column's mean square input, diag(H) / 2). `act_order`: columns by descending
    diag(H) within each block."""
    codec = CODECS[t.name]
    N, K = W.shape
    QK = t.block
    if K % QK:
        raise ValueError(f"{t.name}: {K} input columns are not whole blocks of {QK}")
    W0 = W.float()
    H = H.float().clone()
    diag = torch.diag(H)
    dead = diag == 0
    H[dead, :] = 0
    H[:, dead] = 0
    H[dead, dead] = 1
    weights = np.ascontiguousarray(imatrix if imatrix is not None else (diag / 2).numpy(), dtype=F).reshape(-1)

    # the columns' order: blocks in order, each block's columns by descending diag(H)
    perm = torch.arange(K)
    if act_order:
        perm = (torch.argsort(-diag.reshape(-1, QK), dim=1, stable=True) + torch.arange(0, K, QK)[:, None]).reshape(-1)
    U, damp = _hinv_upper(H[perm][:, perm], damp)
    Wt = W0.t()[perm].contiguous()  # [K, N], column k of W (in the order above) is row k here

    # the legacy types weigh by the row's mean square: the whole row's, as llama-quantize sees it
    ms = legacy.row_mean_squares(W0.numpy()) if getattr(t, "row_mean_square", False) else None
    block_bytes = t.block_bytes
    out = np.empty((N, K // QK * block_bytes), dtype=np.uint8)
    table = torch.from_numpy(codec.table) if codec.table is not None else None
    mids = (table[1:] + table[:-1]) / 2 if table is not None else None
    Err, targets = torch.empty(QK, N), torch.empty(QK, N)
    for s, i1 in enumerate(range(0, K, QK)):
        i2 = i1 + QK
        local = perm[i1:i2] - i1  # the block's columns in the order they are rounded
        back = torch.argsort(local)
        W1 = Wt[i1:i2]  # a view: updated in place
        U1 = U[i1:i2, i1:i2].contiguous()  # both roundings' (the C loop takes it whole)

        def scales(x: torch.Tensor) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
            """The type's quantizer on the block's columns x [QK, N] (in rounding order): its
            bytes and the grid (a, b [QK, N]) its scales make."""
            rows = np.ascontiguousarray(x[back].t().numpy())
            data = t.quantize(rows, threads, weights[i1:i2], mean_squares=ms)
            if codec.search:
                search_scale(data, rows, weights[i1:i2], codec, threads)
            a, b = (torch.from_numpy(np.ascontiguousarray(g.T))[local] for g in codec.grid(data))
            return data, a, b
        # the scales from the block's weights; rounded with feedback; the scales again from the
        # weights as they were when rounded (the feedback moves them); rounded again from the start
        start = W1.clone()
        data, a, b = scales(W1)
        _round_block(W1, U1, a, b, codec.levels, table, mids, Err, threads, targets)
        data, a, b = scales(targets)
        W1.copy_(start)
        codes = _round_block(W1, U1, a, b, codec.levels, table, mids, Err, threads)
        codec.pack(data, codes[back].t().numpy())
        out[:, s * block_bytes:(s + 1) * block_bytes] = data
        if i2 < K:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err, alpha=-1)

    weight = torch.from_numpy(t.dequantize(out, (N, K), threads))
    sample = torch.arange(0, N, max(1, N // ERROR_ROWS))  # the same rows for both: a paired estimate
    rows = np.ascontiguousarray(W0[sample].numpy())
    rtn = torch.from_numpy(t.dequantize(t.quantize(rows, threads, weights), rows.shape, threads))
    return FeedbackResult(out, weight, damp, output_error(W0[sample], weight[sample], H),
                          output_error(W0[sample], rtn, H))


def _round_block(W1: torch.Tensor, U1: torch.Tensor, a: torch.Tensor, b: torch.Tensor, levels: int,
                 table: torch.Tensor | None, mids: torch.Tensor | None, Err: torch.Tensor,
                 threads: int = 1, targets: torch.Tensor | None = None) -> torch.Tensor:
    """One block's columns (rows of W1 [B, N], updated in place) rounded in order to their grid
    (a, b [B, N]), each error spread over the later columns; fills Err with the scaled errors
    (and `targets` with each weight as it was when rounded) and returns the codes [B, N] (uint8). The C kernel (kernels/feedback.c) where it is built,
    else the same steps in torch (the last bits of the updates may differ between the two)."""
    B = W1.shape[0]
    codes = torch.empty(B, W1.shape[1], dtype=torch.uint8)
    if blocks._k is not None:
        blocks._k.feedback_round(W1.numpy(), U1.contiguous().numpy(), a.contiguous().numpy(), b.contiguous().numpy(),
                                 table.numpy() if table is not None else b"", levels, codes.numpy(), Err.numpy(),
                                 targets.numpy() if targets is not None else bytearray(), B, W1.shape[1], threads)
        return codes
    step = torch.where(a == 0, torch.ones_like(a), a)
    for i in range(B):
        w = W1[i]
        if targets is not None:
            targets[i] = w
        if table is None:
            c = torch.sub(w, b[i]).div_(step[i]).round_().clamp_(0, levels - 1)
            q = c * a[i] + b[i]
        else:
            c = torch.bucketize(w / step[i], mids)
            q = table[c] * a[i]
        codes[i] = c
        err = Err[i]
        torch.sub(w, q, out=err).div_(U1[i, i])
        if i + 1 < B:
            W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1)
    return codes
