"""AWQ (Lin et al. 2023) as AutoAWQ 0.2.9 and llm-compressor 0.14 implement it: codes, scales and
zeros (the checkpoint's byte layout is writers/awq.py's business).

Per group of linear layers that share an input (and the operation before them that can absorb
a per-channel scale): x_mean = mean |x| per input channel, w_mean = mean over output rows of
|W| normalised by each quantization group's max; the candidates are llm-compressor's: no scaling
(s = 1), and for ratio = i/18, i = 0..18, s = (x_mean^ratio / (w_mean^(1-ratio) + 1e-4)).clamp(
min=1e-4) / sqrt(max(s) min(s)) (AutoAWQ tries i/20, i = 0..19, and never s = 1); the candidate
whose Q(W s)/s gives the lowest mean squared error of the inspected block's output wins. Then 1/s
is folded into the preceding norm or linear and s into the linears. Then, for every linear but
the ones computing attention queries and keys, a clipping search: the max of each (row, group)
shrunk by up to 50% in 20 steps, keeping the one with the lowest output error on (up to 512)
input tokens. Quantizer: zero point, s = (max - min) / 15, z = clamp(-round(min / s), 0, 15),
q = clamp(round(w / s) + z, 0, 15), w' = (q - z) s.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Callable

import torch

N_GRID = 20
PRUNE_KEEP = 4
PRUNE_MIN = 4  # samples in the first quarter for the pruned search
MAX_SHRINK = 0.5
CLIP_TOKENS = 512


@dataclass
class AWQResult:
    q: torch.Tensor  # int codes [N, K]
    scales: torch.Tensor  # [G, N] float32 (f16-representable)
    zeros: torch.Tensor  # [G, N] int
    weight: torch.Tensor  # dequantized [N, K]


def _codes(w: torch.Tensor, group: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [N*G, group], scales [N*G, 1], zeros [N*G, 1]) of w [N, K] with zero points per group."""
    g = w.reshape(-1, group)
    hi, lo = g.amax(1, keepdim=True), g.amin(1, keepdim=True)
    maxq = 2 ** bits - 1
    scales = ((hi - lo).clamp(min=1e-5) / maxq).half().float()  # stored as f16: quantize with those
    zeros = torch.clamp(-torch.round(lo / scales), 0, maxq)
    return torch.clamp(torch.round(g / scales) + zeros, 0, maxq), scales, zeros


def pseudo_quantize(w: torch.Tensor, group: int, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dequantized w, scales [N, G], zeros [N, G]) of w [N, K] with zero points per group."""
    N, K = w.shape
    q, scales, zeros = _codes(w, group, bits)
    return ((q - zeros) * scales).reshape(N, K), scales.reshape(N, -1), zeros.reshape(N, -1)


def quantize(w: torch.Tensor, group: int, bits: int = 4) -> AWQResult:
    N, K = w.shape
    q, scales, zeros = _codes(w, group, bits)
    return AWQResult(q.reshape(N, K).to(torch.int32), scales.reshape(N, -1).T.contiguous(),
                     zeros.reshape(N, -1).T.to(torch.int32).contiguous(), ((q - zeros) * scales).reshape(N, K))


# the candidates (ratio, duo scaling), as llm-compressor 0.14's AWQModifier (duo_scaling=True)
# searches them: no scaling at all, then 19 ratios 0, 1/18, ..., 1 of x_mean^r / w_mean^(1-r)
GRID = [(0.0, False)] + [(i / (N_GRID - 2), True) for i in range(N_GRID - 1)]


def _scales(x_mean: torch.Tensor, w_mean: torch.Tensor, ratio: float, duo: bool = True) -> torch.Tensor:
    if duo:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    s[~torch.isfinite(s)] = 1
    return s


def best_scale(x: torch.Tensor, weights: list[torch.Tensor], group: int,
               run: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor],
               bits: int = 4, floats: frozenset[int] = frozenset(),
               found: dict | None = None) -> tuple[torch.Tensor, float | None]:
    """The per-input-channel scale for linears sharing input x [samples, tokens, K]; `run(weights,
    xs)` gives the inspected block's output for inputs xs (some of x's samples) with the given
    weights of those linears. Returns (scales, ratio); ratio None: no scaling won.

    The candidate (GRID) with the lowest squared error over all samples wins, as in AutoAWQ and
    llm-compressor; but every one is first tried on a quarter of the samples only, and the rest
    are run for the PRUNE_KEEP with the lowest errors there: 9 block forwards of all samples
    instead of 21 (when the quarter holds at least PRUNE_MIN samples; with fewer, every candidate
    runs on every sample). On SmolLM2-135M and Qwen2.5-0.5B (16 x 512 calibration tokens) it kept
    the full search's choice in all 162 groups with AutoAWQ's ratios, and gave the same checkpoint
    as the full search on Qwen2.5-0.5B with llm-compressor's.

    `floats`: the indices of weights that stay unquantized (a mixture's router, which shares the
    experts' input and takes the scales too, as in llm-compressor's MoE mappings): left out of
    w_mean and unrounded in the trials. `found`, when given, receives the block's float output
    over all samples ("reference") and the winner's squared error ("error"), for the clipping
    check."""
    w_mean = weight_mean(weights, group, floats)
    x_mean = x.abs().reshape(-1, x.shape[-1]).mean(0)
    parts = [slice(a, b) for a, b in search_parts(len(x))]
    references = [run(weights, x[p]) for p in parts]

    def error(i: int, part: int) -> float:
        s = _scales(x_mean, w_mean, *GRID[i])
        err = float((references[part] - run(trial(weights, s, group, floats, bits), x[parts[part]])).double()
                    .pow(2).sum())
        return err if math.isfinite(err) else math.inf

    errors = {i: error(i, 0) for i in range(len(GRID))}
    if len(parts) == 2:
        kept = sorted(errors, key=lambda i: (errors[i], i))[:PRUNE_KEEP]
        errors = {i: errors[i] + error(i, 1) for i in kept}
    best = min(errors, key=lambda i: (errors[i], i))
    if not math.isfinite(errors[best]):
        raise FloatingPointError("the block's output is not finite for any scaling")
    if found is not None:
        found["reference"], found["error"] = torch.cat(references), errors[best]
    return _scales(x_mean, w_mean, *GRID[best]), (GRID[best][0] if GRID[best][1] else None)


def gram_error(d: torch.Tensor, H: torch.Tensor) -> float:
    """The squared output error over every token, sum ||x d^T||^2, of a weight difference d [N, K]
    from the input's Gram matrix H = X^T X [K, K]: sum((d H) * d)."""
    e = float(((d @ H) * d).sum(dtype=torch.float64))
    return e if math.isfinite(e) else math.inf


def gram_scale_errors(w: torch.Tensor, H: torch.Tensor, x_mean: torch.Tensor, w_mean: torch.Tensor, group: int,
                      bits: int = 4) -> dict[int, float]:
    """Every candidate's error, on every token, for a linear compared alone (its own output, as
    AutoAWQ compares o_proj and down_proj): Q(W s)/s - W through the Gram matrix H of its input.
    One X^T X and 20 products of [N, K] by [K, K] instead of 9 forwards of every token (the
    pruned search): a third of the work for Qwen2.5-0.5B's down_proj, a seventh for o_proj."""
    errors = {}
    for c in range(len(GRID)):
        s = _scales(x_mean, w_mean, *GRID[c])
        errors[c] = gram_error(pseudo_quantize(w * s, group, bits)[0] / s - w, H)
    return errors


def clip_rows(x: torch.Tensor, first_row: int = 0, rows: int | None = None) -> torch.Tensor:
    """The input tokens the clipping search compares outputs on: every max(1, rows // CLIP_TOKENS)-th
    token of all `rows` (default: x's), x [..., K] holding those from number first_row on."""
    x = x.reshape(-1, x.shape[-1])
    step = max(1, (rows if rows is not None else x.shape[0]) // CLIP_TOKENS)
    return x[(-first_row) % step::step]


def clip_errors(w: torch.Tensor, x: torch.Tensor, group: int, bits: int = 4) -> torch.Tensor:
    """[steps, N, G]: for each shrink step of the clipping search, each (row, group)'s squared
    output error summed over the tokens x [tokens, K]. The per-group partial outputs x_g w_g^T
    are batched matrix products (AutoAWQ broadcasts a [rows, tokens, groups, group] product, the
    same sums in another order)."""
    N, K = w.shape
    G = K // group
    xg = x.reshape(-1, G, group).transpose(0, 1)  # G, T, g

    def partial(wb: torch.Tensor) -> torch.Tensor:  # wb [n, K] -> [G, T, n]
        return torch.bmm(xg, wb.reshape(-1, G, group).permute(1, 2, 0))

    steps = int(MAX_SHRINK * N_GRID)
    out = torch.empty(steps, N, G)
    rows = 256 if N % 256 == 0 else 64
    for r0 in range(0, N, rows):
        wb = w[r0:r0 + rows]
        n = wb.shape[0]
        org_max = wb.reshape(n, G, group).abs().amax(-1)  # n, G
        org_out = partial(wb)
        for i in range(steps):
            mx = org_max * (1 - i / N_GRID)
            cur = torch.clamp(wb.reshape(n, G, group), -mx[..., None], mx[..., None]).reshape(n, K)
            q = pseudo_quantize(cur, group, bits)[0]
            out[i, r0:r0 + n] = (partial(q) - org_out).pow(2).sum(1).T
    return out


def choose_clip(w: torch.Tensor, errors: torch.Tensor, group: int) -> torch.Tensor:
    """Per (row, group) clipping maxima [N, G] of w [N, K]: the shrink step with the lowest mean
    error (errors [steps, N, G], clip_errors' sums over the tokens divided by their number)."""
    N, K = w.shape
    org_max = w.reshape(N, K // group, group).abs().amax(-1)
    best_max = org_max.clone()
    min_err = torch.full_like(org_max, float("inf"))
    for i in range(errors.shape[0]):
        better = errors[i] < min_err
        min_err[better] = errors[i][better]
        best_max[better] = (org_max * (1 - i / N_GRID))[better]
    return best_max


def weight_mean(weights: list[torch.Tensor], group: int, floats: frozenset[int] = frozenset()) -> torch.Tensor:
    """w_mean [K]: the mean over output rows of |W| normalised by each quantization group's max,
    over the quantized weights of a group of linears sharing an input."""
    W = torch.cat([w for j, w in enumerate(weights) if j not in floats], 0)
    w_abs = W.abs().reshape(-1, group)
    return (w_abs / (w_abs.amax(1, keepdim=True) + 1e-6)).reshape(W.shape).mean(0)


def search_parts(n: int) -> list[tuple[int, int]]:
    """The samples [first, last) the scale search tries every candidate on, then the rest that
    the PRUNE_KEEP best are tried on too (one part when a quarter is fewer than PRUNE_MIN)."""
    first = (n + 3) // 4
    return [(0, first), (first, n)] if first >= PRUNE_MIN else [(0, n)]


def trial(weights: list[torch.Tensor], s: torch.Tensor, group: int, floats: frozenset[int] = frozenset(),
          bits: int = 4) -> list[torch.Tensor]:
    """The weights a scale candidate s is judged with: Q(W s) / s (a float one unrounded)."""
    return [w if j in floats else pseudo_quantize(w * s, group, bits)[0] / s for j, w in enumerate(weights)]


def best_clip(w: torch.Tensor, x: torch.Tensor, group: int, bits: int = 4) -> torch.Tensor:
    """Per (row, group) clipping maxima [N, G] for w [N, K] given inputs x [tokens, K]."""
    x = clip_rows(x)
    return choose_clip(w, clip_errors(w, x, group, bits) / x.shape[0], group)


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, group: int) -> torch.Tensor:
    N, K = w.shape
    m = max_val.reshape(N, -1, 1)
    return torch.clamp(w.reshape(N, -1, group), -m, m).reshape(N, K)
