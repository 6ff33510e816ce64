"""Pieces every family's forward is built from, in plain torch: norms, rotary embeddings,
attention, activations, and the int8 rows of the calibration forward's matrix products."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from qconvert.errors import InputError


def int8_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes per row of a float matrix, and the scales [rows, 1]: a ~ codes * scales."""
    scale = a.abs().amax(1, keepdim=True).clamp_min_(1e-30) / 127
    return torch.round(a / scale).to(torch.int8), scale


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, plus_one: bool = False) -> torch.Tensor:
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * (1.0 + w) if plus_one else y * w


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rope_tables(dim: int, theta: float, n: int, factors: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if factors is not None:
        inv = inv / torch.from_numpy(factors)
    freqs = torch.outer(torch.arange(n, dtype=torch.float32), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; HF's rotate-half convention on the first cos.shape[-1] dims."""
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    rot = rot * cos + rotate_half(rot) * sin
    return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


def attention(q, k, v, scale: float, window: int | None = None, softcap: float | None = None,
              sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention, GQA by repeating k/v heads; q [B, H, T, D], k/v [B, Hkv, T, D]. `window`:
    each position sees itself and the window - 1 before it; `softcap`: scores capped to
    (-softcap, softcap) by softcap * tanh(score / softcap) before the mask (Gemma 2); `sinks` [H]:
    one more logit per head in every softmax, whose probability goes to no value (gpt-oss)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    T = q.shape[2]
    if window is None and not softcap and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    i = torch.arange(T)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed = allowed & (i[:, None] - i[None, :] < window)
    if not softcap and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    if softcap:
        scores = torch.tanh(q @ k.transpose(-1, -2) * (scale / softcap)) * softcap
    else:
        scores = q @ k.transpose(-1, -2) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is None:
        return torch.softmax(scores, dim=-1) @ v
    B, H = scores.shape[:2]
    scores = torch.cat((scores, sinks.reshape(1, H, 1, 1).expand(B, H, T, 1).to(scores.dtype)), dim=-1)
    return torch.softmax(scores, dim=-1)[..., :-1] @ v


def heads(x: torch.Tensor, n: int) -> torch.Tensor:
    B, T, _ = x.shape
    return x.view(B, T, n, -1).transpose(1, 2)


def merge(x: torch.Tensor) -> torch.Tensor:
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


def act(cfg, *keys: str, default: str):
    """The activation the config names under the first of `keys` present."""
    name = next((cfg.data[k] for k in keys if cfg.data.get(k) is not None), default)
    if not isinstance(name, str):
        raise InputError(f"{cfg.path}: {keys[0]} must be an activation's name, got {name!r}")
    name = name.lower()
    if name in ("silu", "swish"):
        return F.silu
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise InputError(f"{cfg.path}: activation {name!r} is not supported by qconvert's forward")
