"""GPTQ (Frantar et al. 2022) as the reference tools implement it: codes, scales and zeros
(the checkpoint's byte layout is writers/gptq.py's business).

One linear layer at a time: W [N out, K in] and H = 2/n sum x x^T over its calibration inputs.
Columns are quantized in order (or by descending diag(H) with act-order), each column's rounding
error spread over the columns not yet quantized through the inverse Hessian's Cholesky factor,
in blocks of 128 columns with lazy batch updates. Group parameters (one scale and zero per
output row and group of input columns) come from the updated weights when a group begins, or,
with act-order, from the original weights of each static group (so g_idx stays k // g, which
vLLM needs). Dead columns (diag(H) == 0) get H = 1 and W = 0. Damping: damp * mean(diag(H)) on
the diagonal, raised by 0.01 at a time when the Cholesky factorisation fails.

Quantizer: symmetric s = 2 max|w| / (2^b - 1), z = 2^(b-1); asymmetric on [min, max] widened
to include 0, s = (max - min) / (2^b - 1), z = round(-min / s); q = clamp(round(w / s) + z, 0,
2^b - 1), w' = s (q - z).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from qconvert.errors import InputError

BLOCK = 128  # columns per lazy-update block
ERROR_ROWS = 64  # output rows on which the reported errors are measured


@dataclass
class GPTQResult:
    q: torch.Tensor  # int codes [N, K], in the original column order
    scales: torch.Tensor  # [G, N] float32
    zeros: torch.Tensor  # [G, N] int (the zero point itself)
    g_idx: torch.Tensor  # [K] int32, the group of each input column
    weight: torch.Tensor  # dequantized [N, K] float32
    damp: float  # the damping that factorised
    error: float  # tr((W - W') H (W - W')^T) / N: mean output-row squared error on the inputs
    rtn_error: float  # the same for round-to-nearest with the same groups


def group_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of w [N, g]. Scales are rounded to f16 (what the checkpoint
    stores) before the codes are chosen, so the file decodes to exactly the weights GPTQ used."""
    maxq = 2 ** bits - 1
    if sym:
        scale = (2 * w.abs().amax(1) / maxq).half().float()
    else:
        lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        scale = ((hi - lo) / maxq).half().float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero group
    if sym:
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of w [N] or [N, m] given per-row scale/zero [N]."""
    if w.dim() == 2:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)


PANEL = 256  # rows or columns per piece of the factorisation and the triangular inverse


@contextmanager
def _pieces():
    """Run fixed pieces of a factorisation side by side: yields each(fn, starts), which calls
    fn(start) for every start on as many threads as torch was given (-j), each torch operation
    inside on one thread. The pieces are the same whatever the thread count and each is computed
    on one thread, so the bits do not depend on -j (LAPACK's own factorisation splits its blocks
    by thread count, and its bits change with them: on SmolLM2-135M, -j 1 and -j 2 gave
    different GPTQ codes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    inference = torch.is_inference_mode_enabled()  # per thread in torch: the pool's threads take the caller's

    def run(fn, s: int) -> None:
        with torch.inference_mode(inference), torch.no_grad():
            fn(s)

    def each(fn, starts) -> None:
        if pool is None:
            for s in starts:
                fn(s)
        else:
            list(pool.map(lambda s: run(fn, s), starts))
    try:
        yield each
    finally:
        if pool is not None:
            pool.shutdown()
        torch.set_num_threads(threads)


def lower_inverse(L: torch.Tensor) -> torch.Tensor:
    """The inverse of lower-triangular L, by halves: [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1,
    D^-1]], the corner from two triangular solves. n^3 / 3 multiply-adds, a third of a solve
    against the identity (which does not know that the inverse is triangular too). MKL's solves
    give the same bits on 1 to 4 threads (tests/test_gptq.py), unlike its factorisation."""
    out = torch.zeros_like(L)
    _lower_inverse_into(L, out)
    return out


def _lower_inverse_into(L: torch.Tensor, out: torch.Tensor) -> None:
    n = L.shape[0]
    if n <= 256:
        out.copy_(torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype), upper=False))
        return
    h = n // 2
    _lower_inverse_into(L[:h, :h], out[:h, :h])
    _lower_inverse_into(L[h:, h:], out[h:, h:])
    corner = torch.linalg.solve_triangular(L[:h, :h], L[h:, :h], upper=False, left=False)  # C A^-1
    out[h:, :h] = torch.linalg.solve_triangular(L[h:, h:], corner, upper=False).neg_()


def _cholesky(A: torch.Tensor, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower Cholesky factor of A and LAPACK's info (0, or the order of the first minor that is
    not positive definite), right-looking by panels: each diagonal block factorised, the panel
    below it solved, the trailing lower triangle updated column panel by column panel, the
    pieces side by side (_pieces: the same bits whatever -j). `overwrite`: in A's memory."""
    n = A.shape[0]
    if not overwrite:
        A = A.clone()
    with _pieces() as each:
        for j in range(0, n, PANEL):
            e = min(j + PANEL, n)
            Ljj, info = torch.linalg.cholesky_ex(A[j:e, j:e])
            if int(info):
                return A, info + j
            A[j:e, j:e] = Ljj
            if e == n:
                break

            def below(r: int) -> None:
                rows = A[r:r + PANEL, j:e]
                rows.copy_(torch.linalg.solve_triangular(Ljj.mT, rows, upper=True, left=False))
            each(below, range(e, n, PANEL))
            P = A[e:, j:e]

            def update(c: int) -> None:  # the columns c.. of the trailing matrix, from their diagonal down
                A[c:, c:c + PANEL].sub_(P[c - e:] @ P[c - e:c - e + PANEL].T)
            each(update, range(e, n, PANEL))
    return A.tril_(), torch.zeros((), dtype=torch.int32)


def _hinv_upper(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of H^-1 (U^T U = H^-1) after damping; damping grows until it
    factorises. With J the reversal, J H J = L L^T gives H^-1 = (J L^-T J)(J L^-1 J) and J L^-1 J
    is upper triangular: one factorisation and one triangular inverse, instead of inverting H and
    factorising the inverse."""
    mean_diag = float(torch.mean(torch.diag(H)))
    idx = torch.arange(H.shape[0])
    flipped = H.flip(0, 1)
    while True:
        Hd = flipped.clone()
        Hd[idx, idx] += damp * mean_diag
        L, info = _cholesky(Hd, overwrite=True)
        if int(info) == 0:
            U = lower_inverse(L).flip(0, 1)
            if bool(torch.isfinite(torch.diag(U)).all()):
                return U, damp
        damp = round(damp + 0.01, 6)
        if damp > 1.0:
            raise InputError("GPTQ: the Hessian cannot be factorised even with damping 1.0 (are the calibration "
                             "inputs all zero or non-finite?)")


def gptq(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True,
         act_order: bool = False, damp: float = 0.05) -> GPTQResult:
    """Quantize W [N, K] (float32) given H [K, K]; group_size -1 means one group per row.
    `act_order`: columns by descending diag(H), group parameters from the original weights of
    each static group; otherwise columns in order, parameters from the updated weights when a
    group begins. The loop runs on W's transpose, so that each column it quantizes and each
    row of the update is contiguous."""
    N, K = W.shape
    g = K if group_size == -1 else group_size
    if K % g:
        raise ValueError(f"group size {g} does not divide {K} input columns")
    W0 = W.float()
    H = H.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    Wt = W0.t().contiguous()  # [K, N]: column k of W is row k here
    Wt[dead] = 0
    Hfull = H.clone()

    n_groups = K // g
    scales = torch.zeros(n_groups, N)
    zeros = torch.zeros(n_groups, N)
    if act_order:  # static groups: parameters from the original weights, g_idx = k // g
        for j in range(n_groups):
            scales[j], zeros[j] = group_params(Wt[j * g:(j + 1) * g].t(), bits, sym)
        perm = torch.argsort(torch.diag(H), descending=True)
        Wt, H = Wt[perm], H[perm][:, perm]
    else:
        perm = torch.arange(K)
    U, damp = _hinv_upper(H, damp)

    Qt = torch.empty_like(Wt)
    codes = torch.empty_like(Wt)
    Err = torch.empty(BLOCK, N)
    S, Z = torch.empty(BLOCK, N), torch.empty(BLOCK, N)  # each column's group scale and zero
    cols = perm.tolist()
    for i1 in range(0, K, BLOCK):
        i2 = min(i1 + BLOCK, K)
        U1 = U[i1:i2, i1:i2].contiguous()
        groups = [c // g for c in cols[i1:i2]]
        # runs of columns whose group parameters are known when the run starts: the whole block
        # with act-order, else up to the next group's first column
        cuts = [0] + [i for i in range(1, i2 - i1) if not act_order and cols[i1 + i] % g == 0] + [i2 - i1]
        for a, b in zip(cuts, cuts[1:]):
            if not act_order and cols[i1 + a] % g == 0:  # a group begins: parameters from the updated weights
                scales[groups[a]], zeros[groups[a]] = group_params(Wt[i1 + a:i1 + a + g].t(), bits, sym)
            run = torch.tensor(groups[a:b])
            S[a:b], Z[a:b] = scales[run], zeros[run]
            _columns(Wt[i1:i2], U1, S, Z, codes[i1:i2], Qt[i1:i2], Err, a, b, bits)
        if i2 < K:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err[:i2 - i1], alpha=-1)

    inv = torch.argsort(perm)
    Q, codes = Qt[inv].t().contiguous(), codes[inv].t()
    g_idx = (torch.arange(K) // g).to(torch.int32)
    # round-to-nearest with the same groups, for the report
    R = torch.empty_like(W0)
    for j in range(n_groups):
        s, z = group_params(W0[:, j * g:(j + 1) * g], bits, sym)
        R[:, j * g:(j + 1) * g] = s[:, None] * (quantize_codes(W0[:, j * g:(j + 1) * g], s, z, bits) - z[:, None])
    rows = torch.arange(0, N, max(1, N // ERROR_ROWS))  # the same rows for both: a paired estimate
    return GPTQResult(codes.to(torch.int32), scales, zeros.to(torch.int32), g_idx, Q, damp,
                      output_error(W0[rows], Q[rows], Hfull), output_error(W0[rows], R[rows], Hfull))


def _columns(W1: torch.Tensor, U1: torch.Tensor, S: torch.Tensor, Z: torch.Tensor, codes: torch.Tensor,
             Q: torch.Tensor, Err: torch.Tensor, a: int, b: int, bits: int) -> None:
    """Columns [a, b) of one block of B: W1 [B, N] (the block's columns as rows, updated in
    place), U1 [B, B] the block of H^-1's upper factor, S/Z each column's group scale and zero;
    writes the columns' codes, dequantized values and scaled errors. (A C loop was measured no
    faster than these contiguous torch operations on Qwen2.5-0.5B's down projection.)"""
    B, N = W1.shape
    maxq = 2 ** bits - 1
    for i in range(a, b):
        w, s, z = W1[i], S[i], Z[i]
        c = torch.round(w / s).add_(z).clamp_(0, maxq)
        q = (c - z).mul_(s)
        codes[i], Q[i] = c, q
        err = Err[i]
        torch.sub(w, q, out=err).div_(U1[i, i])
        if i + 1 < B:
            W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1)


def output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T) / N: with H = 2/n X^T X, twice the mean squared output error per row."""
    D = W - Q
    return float(((D @ H) * D).sum(dtype=torch.float64) / W.shape[0])
