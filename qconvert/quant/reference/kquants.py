"""Q4_K, Q5_K, Q6_K: super-blocks of 256. Oracles: ggml quantize_row_q{4,5,6}_K_ref (no
importance matrix) and quantize_row_q{4,5,6}_K_impl (with one), as ggml_quantize_chunk calls them.

Quirks: without an imatrix, sub-block scales/mins come from make_qkx2_quants on weights
sqrt(mean x^2) + |x| and are rounded to 6 bits against the largest (ls stored through uint8,
then capped at 63); with one, make_qkx3_quants on qw*sqrt(sigma2 + x^2), sigma2 = 2*mean x^2 of
the super-block, and the 6-bit scales from make_qp_quants weighted by each sub-block's weight sum.
Levels are then recomputed from the f16-rounded d and dmin (a sub-block with d = 0 keeps the
search's levels). Q6_K: make_qx_quants per 16 on x^2 (or the raw qw), block scale -128/max_scale.
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qconvert.quant.reference.search import (GROUP_MAX_EPS, F, make_q3_quants, make_qkx_quants, make_qp_quants,
                                             make_qx_quants, nearest_int, seqsum, signed_absmax)

BYTES = {name: GGML_QUANT_SIZES[GGMLQuantizationType[name]][1]
         for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")}  # gguf's size table


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return v.astype(F).astype(np.float16).view(np.uint8).reshape(-1, 2)


def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16).astype(F).reshape(-1)


def pack_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> 12 bytes (get_scale_min_k4's layout)."""
    s = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    s[:, 0:4], s[:, 4:8] = ls[:, :4], lm[:, :4]
    s[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    s[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    s[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    return s


def unpack_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _kx(x: np.ndarray, qw: np.ndarray | None, nmax: int, rmin: float, nstep: int):
    """Q4_K/Q5_K common part: (d/dmin bytes [B,4], scales [B,12], levels [B,256])."""
    B = x.shape[0]
    sub = x.reshape(B * 8, 32)
    if qw is None:
        av = np.sqrt(seqsum(sub * sub) / F(32))
        weights = av[:, None] + np.abs(sub)
        scales, mins, L = make_qkx_quants(sub, nmax, weights, rmin, 0.1, nstep, False)
        scales, mins = scales.reshape(B, 8), mins.reshape(B, 8)
        max_scale = np.maximum(scales.max(axis=1), F(0))
        max_min = np.maximum(mins.max(axis=1), F(0))
        with np.errstate(divide="ignore"):
            inv_s = np.where(max_scale > 0, F(63) / np.where(max_scale > 0, max_scale, F(1)), F(0)).astype(F)
            inv_m = np.where(max_min > 0, F(63) / np.where(max_min > 0, max_min, F(1)), F(0)).astype(F)
        ls = np.minimum(63, nearest_int(inv_s[:, None] * scales) & 0xFF).astype(np.uint8)
        lm = np.minimum(63, nearest_int(inv_m[:, None] * mins) & 0xFF).astype(np.uint8)
        d, dmin = max_scale / F(63), max_min / F(63)
    else:
        sigma2 = F(2) * seqsum(x * x) / F(256)
        w = np.tile(qw.astype(F).reshape(-1, 256), (1, 1)).reshape(-1, 256)
        w = np.broadcast_to(w, x.shape) * np.sqrt(sigma2[:, None] + x * x)
        w = w.reshape(B * 8, 32)
        sw = seqsum(w).reshape(B, 8)
        scales, mins, L = make_qkx_quants(sub, nmax, w, -0.9, 0.05, 36, True)
        d, ls = make_qp_quants(scales.reshape(B, 8), 63, sw)
        dmin, lm = make_qp_quants(mins.reshape(B, 8), 63, sw)
        ls, lm = np.minimum(63, ls), np.minimum(63, lm)
    head = np.concatenate([_f16_bytes(d), _f16_bytes(dmin)], axis=1)
    packed = pack_scales(ls, lm)
    sc, m = unpack_scales(packed)
    dd, dm = _f16(head[:, :2]), _f16(head[:, 2:])
    d_sub = dd[:, None] * sc.astype(F)
    dm_sub = dm[:, None] * m.astype(F)
    L = L.reshape(B, 8, 32).astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(nearest_int((x.reshape(B, 8, 32) + dm_sub[:, :, None]) / d_sub[:, :, None]), 0, nmax)
    L = np.where((d_sub != 0)[:, :, None], again, L)
    return head, packed, L.reshape(B, 256)


def _superblocks(rows: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    rows = np.ascontiguousarray(rows, dtype=F)
    x = rows.reshape(-1, 256)
    if qw is not None:
        qw = np.tile(np.asarray(qw, dtype=F).reshape(-1, 256), (rows.shape[0], 1))
    return x, qw


@np.errstate(all="ignore")  # inf/NaN appear where ggml's floats overflow too; the bytes still match
def quantize(kind: str, rows: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    x, w = _superblocks(rows, qw)
    if kind == "Q6_K":
        out = _q6_k(x, w)
    elif kind == "Q3_K":
        out = _q3_k(x, w)
    elif kind == "Q2_K":
        out = _q2_k(x, w)
    else:
        nmax, rmin, nstep = (15, -1.0, 20) if kind == "Q4_K" else (31, -0.5, 15)
        head, scales, L = _kx(x, w, nmax, rmin, nstep)
        L = L.astype(np.uint8).reshape(-1, 4, 2, 32)  # [block][pair of sub-blocks][low/high][32]
        if kind == "Q4_K":
            qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
            out = np.concatenate([head, scales, qs], axis=1)
        else:
            low = L & 0x0F
            qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
            hi = (L >> 4) & 1  # bit 2g of qh[l] for sub-block 2g, 2g+1 for 2g+1
            shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
            qh = np.bitwise_or.reduce((hi << shifts[None, :, :, None]).reshape(-1, 8, 32), axis=1).astype(np.uint8)
            out = np.concatenate([head, scales, qh, qs], axis=1)
    return out.reshape(rows.shape[0], -1)


def _pack2(L: np.ndarray) -> np.ndarray:
    """Levels 0..3 [B, 256] -> qs [B, 64]: byte 32h + l holds element 128h + l + 32k at bits 2k."""
    L = L.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64)


def _unpack2(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    return (q & 3).reshape(-1, 256)


def _q3_scales(ls: np.ndarray) -> np.ndarray:
    """16 six-bit scales (0..63) -> 12 bytes: low nibbles of 0-7 and 8-15 in bytes 0-7 (low and
    high half), the top two bits of scale j at bits 2*(j // 4) of byte 8 + j % 4."""
    ls = ls.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, :8] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    for j in range(16):
        out[:, 8 + j % 4] |= (ls[:, j] >> 4) << (2 * (j // 4))
    return out


def _q3_unscales(s: np.ndarray) -> np.ndarray:
    """12 bytes -> the 16 signed scales (six bits minus 32)."""
    low = np.concatenate([s[:, :8] & 0xF, s[:, :8] >> 4], axis=1).astype(np.int32)
    high = np.stack([(s[:, 8 + j % 4] >> (2 * (j // 4))) & 3 for j in range(16)], axis=1).astype(np.int32)
    return (low | (high << 4)) - 32


def _q3_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """quantize_row_q3_K_ref (no imatrix: make_q3_quants per 16, 6-bit scales against the one of
    largest magnitude, d = 1/(-32/max_scale)) or quantize_row_q3_K_impl (weights qw*sqrt(sigma2 +
    x^2) with sigma2 = 2*sum x^2/256, make_qx_quants per 16, then make_qx_quants(32) on the 16
    scales weighted by the sub-blocks' weight sums); levels again from f16(d)*scale (divided, not
    multiplied by the inverse) where that is not 0. block_q3_K {hmask[32]: bit 4h+k of byte l for
    element 128h+32k+l above 3; qs[64]; scales[12]; f16 d}."""
    B = x.shape[0]
    sub = x.reshape(B * 16, 16)
    if qw is None:
        scales, L = make_q3_quants(sub, 4)
        scales = scales.reshape(B, 16)
        _, max_scale = signed_absmax(scales)
        ok = max_scale != 0
        with np.errstate(divide="ignore", over="ignore"):
            iscale = (F(-32) / np.where(ok, max_scale, F(1))).astype(F)
            ls = np.clip(nearest_int(iscale[:, None] * scales), -32, 31) + 32
            d = np.where(ok, F(1) / iscale, F(0)).astype(F)
        ls = np.where(ok[:, None], ls, 0)
        packed = np.where(ok[:, None], _q3_scales(ls), np.uint8(0))
    else:
        sigma2 = F(2) * seqsum(x * x) / F(256)
        w = (qw * np.sqrt(sigma2[:, None] + x * x)).reshape(B * 16, 16)
        scales, L = make_qx_quants(sub, 4, w)
        d, ls = make_qx_quants(scales.reshape(B, 16), 32, seqsum(w).reshape(B, 16))
        packed = _q3_scales(ls.astype(np.int64) & 0xFF)
    d_bytes = _f16_bytes(d)
    d_sub = _f16(d_bytes)[:, None] * _q3_unscales(packed).astype(F)
    L = L.reshape(B, 16, 16).astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(nearest_int(x.reshape(B, 16, 16) / d_sub[:, :, None]), -4, 3) + 4
    L = np.where((d_sub != 0)[:, :, None], again, L).reshape(B, 256)
    high = (L > 3).reshape(B, 8, 32)
    hmask = np.bitwise_or.reduce(high.astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    qs = _pack2(np.where(L > 3, L - 4, L))
    return np.concatenate([hmask.astype(np.uint8), qs, packed, d_bytes], axis=1)


def _q2_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """quantize_row_q2_K_ref (no imatrix: make_qkx2_quants per 16 on weights |x| with errors by
    |diff| (use_mad), 4-bit scales and mins against the largest, d = max/15) or
    quantize_row_q2_K_impl (weights qw*sqrt(sigma2 + x^2), sigma2 = sum x^2/256, make_qkx3_quants,
    4-bit scales and mins by make_qp_quants(15) weighted by the sub-blocks' weight sums); levels
    again from f16(d)*scale and f16(dmin)*min where the scale is not 0. block_q2_K {scales[16]:
    scale | min << 4; qs[64]; f16 d; f16 dmin}."""
    B = x.shape[0]
    sub = x.reshape(B * 16, 16)
    if qw is None:
        scales, mins, L = make_qkx_quants(sub, 3, np.abs(sub), -0.5, 0.1, 15, False, mad=True)
        scales, mins = scales.reshape(B, 16), mins.reshape(B, 16)
        max_scale = np.maximum(scales.max(axis=1), F(0))
        max_min = np.maximum(mins.max(axis=1), F(0))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            inv_s = (F(15) / np.where(max_scale > 0, max_scale, F(1))).astype(F)
            inv_m = (F(15) / np.where(max_min > 0, max_min, F(1))).astype(F)
            ls = np.where((max_scale > 0)[:, None], nearest_int(inv_s[:, None] * scales), 0)
            lm = np.where((max_min > 0)[:, None], nearest_int(inv_m[:, None] * mins), 0)
        d = np.where(max_scale > 0, max_scale / F(15), F(0)).astype(F)
        dmin = np.where(max_min > 0, max_min / F(15), F(0)).astype(F)
    else:
        sigma2 = seqsum(x * x) / F(256)
        w = (qw * np.sqrt(sigma2[:, None] + x * x)).reshape(B * 16, 16)
        sw = seqsum(w).reshape(B, 16)
        scales, mins, L = make_qkx_quants(sub, 3, w, -0.9, 0.05, 36, True)
        d, ls = make_qp_quants(scales.reshape(B, 16), 15, sw)
        dmin, lm = make_qp_quants(mins.reshape(B, 16), 15, sw)
        ls, lm = ls.astype(np.int64), lm.astype(np.int64)
    sc = ((ls & 0xFF) | ((lm << 4) & 0xFF)).astype(np.uint8)
    head = np.concatenate([_f16_bytes(d), _f16_bytes(dmin)], axis=1)
    d_sub = _f16(head[:, :2])[:, None] * (sc & 0xF).astype(F)
    m_sub = _f16(head[:, 2:])[:, None] * (sc >> 4).astype(F)
    L = L.reshape(B, 16, 16).astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(nearest_int((x.reshape(B, 16, 16) + m_sub[:, :, None]) / d_sub[:, :, None]), 0, 3)
    L = np.where((d_sub != 0)[:, :, None], again, L).reshape(B, 256)
    return np.concatenate([sc, _pack2(L), head], axis=1)


def _q6_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    B = x.shape[0]
    sub = x.reshape(B * 16, 16)
    scales, L = make_qx_quants(sub, 32, None if qw is None else qw.reshape(B * 16, 16))
    scales = scales.reshape(B, 16)
    amax, mx = signed_absmax(scales)
    zero = amax < GROUP_MAX_EPS
    safe = np.where(zero, F(1), mx).astype(F)
    iscale = (F(-128) / safe).astype(F)
    with np.errstate(divide="ignore", over="ignore"):
        d_bytes = _f16_bytes((F(1) / iscale).astype(F))
    sc = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
    d_sub = _f16(d_bytes)[:, None] * sc.astype(F)
    L = L.reshape(B, 16, 16).astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(nearest_int(x.reshape(B, 16, 16) / d_sub[:, :, None]), -32, 31) + 32
    L = np.where((d_sub != 0)[:, :, None], again, L).reshape(B, 2, 4, 32).astype(np.uint8)  # [half][quarter][l]
    ql = np.concatenate([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                         (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], axis=2).reshape(B, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6))
    out = np.concatenate([ql, qh.reshape(B, 64), sc.view(np.uint8), d_bytes], axis=1)
    out[zero] = 0
    return out


def dequantize(kind: str, data: np.ndarray, n_per_row: int) -> np.ndarray:
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, BYTES[kind])
    B = b.shape[0]
    if kind == "Q3_K":
        hbit = (b[:, None, :32] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [B][128h+32k][l]
        q = _unpack2(b[:, 32:96]).astype(np.int32) - 4 * (1 - hbit.reshape(B, 256).astype(np.int32))
        dl = _f16(b[:, 108:110])[:, None] * _q3_unscales(b[:, 96:108]).astype(F)
        return (dl.repeat(16, axis=1) * q.astype(F)).reshape(-1, n_per_row)
    if kind == "Q2_K":
        sc = b[:, :16]
        dl = _f16(b[:, 80:82])[:, None] * (sc & 0xF).astype(F)
        ml = _f16(b[:, 82:84])[:, None] * (sc >> 4).astype(F)
        q = _unpack2(b[:, 16:80]).astype(F)
        return (dl.repeat(16, axis=1) * q - ml.repeat(16, axis=1)).reshape(-1, n_per_row)
    if kind == "Q6_K":
        ql, qh = b[:, :128].reshape(B, 2, 64), b[:, 128:192].reshape(B, 2, 32)
        sc = b[:, 192:208].view(np.int8).astype(F).reshape(B, 2, 8)
        d = _f16(b[:, 208:210])
        q = np.stack([(ql[:, :, :32] & 0xF) | (((qh >> 0) & 3) << 4), (ql[:, :, 32:] & 0xF) | (((qh >> 2) & 3) << 4),
                      (ql[:, :, :32] >> 4) | (((qh >> 4) & 3) << 4), (ql[:, :, 32:] >> 4) | (((qh >> 6) & 3) << 4)],
                     axis=2).astype(np.int32) - 32  # [B][half][quarter][32]
        s = sc.reshape(B, 2, 4, 2).repeat(16, axis=3)  # sub-block of 16 -> its scale
        y = (d[:, None, None, None] * s) * q.astype(F)
        return y.reshape(-1, n_per_row)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = unpack_scales(b[:, 4:16])
    d_sub, m_sub = d[:, None] * sc.astype(F), dmin[:, None] * m.astype(F)
    qs = b[:, -128:].reshape(B, 4, 32)
    q = np.stack([qs & 0xF, qs >> 4], axis=2).astype(np.int32)  # [B][pair][low/high][32]
    if kind == "Q5_K":
        qh = b[:, 16:48]
        shifts = 2 * np.arange(4)[:, None] + np.arange(2)[None, :]
        q += (((qh[:, None, None, :] >> shifts[None, :, :, None]) & 1) << 4).astype(np.int32)
    y = d_sub.reshape(B, 4, 2, 1) * q.astype(F) - m_sub.reshape(B, 4, 2, 1)
    return y.reshape(-1, n_per_row)
