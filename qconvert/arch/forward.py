"""The model families' forward passes in plain torch, one decoder layer at a time.

Calibration runs the model from the memory-mapped checkpoint layer by layer: a layer's weights
are read when it runs and dropped after, so memory holds one layer and the activations. Every
linear layer's input is offered to a recorder under the GGUF name of its weight (the name an
importance matrix uses). The forwards are checked against transformers' in the tests.
"""
from __future__ import annotations

import ctypes
import math
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from qconvert.errors import InputError
from qconvert.quant.blocks import to_float32

Recorder = Callable[[str, torch.Tensor], None]  # (GGUF weight name, the linear's input [..., n_in])


@dataclass
class ScaleGroup:
    """Linear layers that share an input, for AWQ: the operation before them that can absorb a
    per-channel scale, and the block whose output the scale search compares."""

    prev: tuple[str, str]  # ("norm" | "norm1p" | "layernorm" | "linear", HF name or prefix)
    linears: list[str]  # HF prefixes; the first one's input is the group's input
    inspect: Callable[[torch.Tensor], torch.Tensor] | None = None  # None: the linear itself


def _none(name: str, x: torch.Tensor) -> None:
    pass


def int8_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes per row of a float matrix, and the scales [rows, 1]: a ~ codes * scales."""
    scale = a.abs().amax(1, keepdim=True).clamp_min_(1e-30) / 127
    return torch.round(a / scale).to(torch.int8), scale


class Forward:
    """Base: weight access by HF name (float32 torch, read from the mmap on demand). `weights`
    replaces the checkpoint's tensors: anything with `in` and `[]` by HF name giving a Tensor."""

    def __init__(self, family, weights=None):
        self.family = family
        self.cfg = family.cfg
        self.tensors = weights if weights is not None else {
            n.replace("language_model.", ""): t for n, t in family.ckpt.tensors.items()}
        self._cache: dict[str, torch.Tensor] = {}
        # int8 matrix products (int8_linear) when set: calibration statistics only
        self.int8 = False
        self._int8: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._int8_input: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # called as hook(self, hf_prefix, input) before each linear layer runs; GPTQ quantizes
        # the layer there and puts the dequantized weight back with set_linear_weight()
        self.hook: Callable[[Forward, str, torch.Tensor], None] | None = None

    def linear_weight(self, hf: str) -> torch.Tensor:
        """A linear layer's weight as [out, in]."""
        return self.w(hf + ".weight")

    def set_linear_weight(self, hf: str, weight: torch.Tensor) -> None:
        """Replace a linear layer's weight ([out, in]) for the rest of this layer's run."""
        self._cache[hf + ".weight"] = weight

    def apply_linear(self, hf: str, x: torch.Tensor) -> torch.Tensor:
        """x times the layer's current weight (no bias: the scale searches compare differences)."""
        return F.linear(x, self.linear_weight(hf))

    def set(self, name: str, value: torch.Tensor) -> None:
        """Replace any weight (a norm's, a bias) for the rest of this layer's run."""
        self._cache[name] = value

    def scale_groups(self, i: int) -> list[ScaleGroup]:
        """AWQ's groups for decoder layer i, in AutoAWQ's order."""
        raise NotImplementedError(f"no AWQ scale groups for {self.family.arch_name}")

    def w(self, name: str) -> torch.Tensor:
        """A weight as float32, read on first use and kept until clear()."""
        if name not in self._cache:
            t = self.tensors[name]
            a = to_float32(t.dtype, t.array())
            if not a.flags.owndata or not a.flags.writeable:
                a = a.copy()  # a view of the mmap: torch gets its own copy; converted data is used as is
            self._cache[name] = torch.from_numpy(a)
            t.release()
        return self._cache[name]

    def clear(self) -> None:
        self._cache.clear()
        self._int8.clear()
        self._int8_input = None

    def has(self, name: str) -> bool:
        return name in self._cache or name in self.tensors

    def linear(self, x: torch.Tensor, hf: str, rec: Recorder, bias: bool | None = None) -> torch.Tensor:
        rec(self.family.map_name(hf + ".weight"), x)
        if self.hook is not None:
            self.hook(self, hf, x)
        b = self.w(hf + ".bias") if (bias is None and self.has(hf + ".bias")) or bias else None
        if self.int8:
            return self.int8_linear(x, hf, b)
        return F.linear(x, self.w(hf + ".weight"), b)

    def int8_linear(self, x: torch.Tensor, hf: str, b: torch.Tensor | None) -> torch.Tensor:
        """x W^T (+ b) as an int8 matrix product: the weight's rows and the input's rows each
        scaled to int8 by their largest magnitude (the input once for all linears sharing it),
        int32 sums, float32 out. About 2x the speed of float32 on CPUs with int8 dot products,
        and about 1% of error in the product; calibration statistics only, never quantization."""
        flat = x.reshape(-1, x.shape[-1])
        if self._int8_input is None or self._int8_input[0] is not x:
            self._int8_input = (x, *int8_rows(flat))
        _, xq, xs = self._int8_input
        key = hf + ".weight"
        if key not in self._int8:
            wq, ws = int8_rows(self.linear_weight(hf))
            self._int8[key] = (wq.t(), ws.view(1, -1))  # [in, out]: _int_mm's layout for the weight
            self._cache.pop(key)  # the float copy is not needed again
        wq, ws = self._int8[key]
        y = torch._int_mm(xq, wq).to(torch.float32)
        y *= xs
        y *= ws
        if b is not None:
            y += b
        return y.view(*x.shape[:-1], -1)

    # the three phases; subclasses implement them
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layer(self, i: int, h: torch.Tensor, rec: Recorder = _none) -> torch.Tensor:
        raise NotImplementedError

    def head(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for i in range(self.family.n_layers):
            h = self.layer(i, h)
        return self.head(h)


class _Allocator:
    """glibc's malloc tuned for a layer-at-a-time torch workload on Linux (elsewhere: no-op).

    By default glibc raises its mmap threshold as large blocks are freed, after which activations
    come from the heap and memory grows layer after layer; a low fixed threshold instead gives
    every large tensor its own mapping, and then every one of the many short-lived activations
    is a fresh mapping the kernel must zero page by page (half the time of an AWQ search went
    to page faults). So: blocks up to glibc's largest threshold (32 MiB) come from a heap that
    free() does not shrink in passing, and `release()` (after each layer) hands every free page
    back to the kernel with malloc_trim."""

    def __init__(self) -> None:
        self.libc = None
        if sys.platform.startswith("linux"):
            try:
                self.libc = ctypes.CDLL("libc.so.6")
                self.libc.malloc_trim  # noqa: B018 - glibc only
            except (OSError, AttributeError):
                self.libc = None  # not glibc: nothing to tune

    def tune(self) -> None:
        if self.libc is not None:
            self.libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: glibc's maximum on 64-bit
            self.libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: shrink only when release() says so
            self.libc.mallopt(-2, 16 << 20)  # M_TOP_PAD

    def release(self) -> None:
        if self.libc is not None:
            self.libc.malloc_trim(0)


ALLOCATOR = _Allocator()


ACTIVATION_BYTES = 24 << 20  # the widest activation of a batch stays below glibc's mmap threshold
MAX_BATCH = 4


def samples_within(sample_bytes: int) -> int:
    """How many samples of the widest activation (sample_bytes each) fit in ACTIVATION_BYTES, so
    that the block comes from the heap rather than a fresh mapping the kernel zeroes page by
    page (see _Allocator); at least 1."""
    return max(1, ACTIVATION_BYTES // max(1, sample_bytes))


def samples_per_batch(fw: Forward, seq_len: int) -> int:
    """How many samples run through a layer together: samples_within the widest activation (the
    MLP's, float32), at most MAX_BATCH."""
    c = fw.cfg
    hidden = c.get(int, "hidden_size", "n_embd", default=0)
    widest = c.get(int, "intermediate_size", "n_inner", default=None) or 4 * hidden
    return min(MAX_BATCH, samples_within(seq_len * max(widest, 3 * hidden) * 4))


def hidden_states(fw: Forward, tokens: torch.Tensor, rec: Recorder = _none,
                  progress: Callable[[int, int], None] | None = None, batch: int | None = None) -> torch.Tensor:
    """Run token batches [n, T] through every decoder layer, one layer at a time for all of them
    (a layer's weights are read once, then dropped); returns the last layer's output [n, T, D].
    `batch`: samples run together (default: samples_per_batch)."""
    ALLOCATOR.tune()
    batch = batch or samples_per_batch(fw, tokens.shape[1])
    with torch.inference_mode():
        h = torch.cat([fw.embed(tokens[i:i + batch]) for i in range(0, len(tokens), batch)])
        fw.clear()
        n = fw.family.n_layers
        for layer in range(n):
            h = torch.cat([fw.layer(layer, h[i:i + batch], rec) for i in range(0, len(h), batch)])
            fw.clear()  # this layer's weights go; the next layer's are read when it runs
            if progress:
                progress(layer + 1, n)
            ALLOCATOR.release()
    return h


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


def attention(q, k, v, scale: float, window: int | None = None) -> torch.Tensor:
    """Causal attention, GQA by repeating k/v heads; q [B, H, T, D], k/v [B, Hkv, T, D]."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    T = q.shape[2]
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    i = torch.arange(T)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


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


class LlamaForward(Forward):
    """Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms), with Llama 3 rope scaling."""

    def __init__(self, family, weights=None):
        super().__init__(family, weights)
        c = self.cfg
        self.n_head = c.need(int, "num_attention_heads")
        self.n_kv = c.get(int, "num_key_value_heads", default=self.n_head)
        self.head_dim = c.get(int, "head_dim", positive=True) or c.positive(int, "hidden_size") // self.n_head
        self.eps = c.get(float, "rms_norm_eps", default=1e-6, nonnegative=True)
        rope = family.rope_parameters()
        self.theta = float(rope.get("rope_theta", 10000.0))
        self.factors = None  # per-frequency divisors: Llama 3 scaling, or linear scaling's factor
        if self.has("rope_freqs.weight"):  # a GGUF's own table, as llama.cpp reads it
            self.factors = self.w("rope_freqs.weight").numpy().copy()
        elif str(rope.get("rope_type", "")).lower() == "llama3":
            from qconvert.arch.llama import llama3_rope_factors
            self.factors = llama3_rope_factors(rope, self.head_dim)
        elif str(rope.get("rope_type", "")).lower() == "linear":
            self.factors = np.full(self.head_dim // 2, float(rope["factor"]), dtype=np.float32)
        self.act = act(c, "hidden_act", default="silu")
        self._rope: dict[int, tuple] = {}

    def rope(self, T: int):
        if T not in self._rope:
            self._rope = {T: rope_tables(self.head_dim, self.theta, T, self.factors)}
        return self._rope[T]

    def embed(self, ids):
        return F.embedding(ids, self.w("model.embed_tokens.weight"))

    def attn(self, i: int, x, rec=_none):
        p = f"model.layers.{i}."
        q = heads(self.linear(x, p + "self_attn.q_proj", rec), self.n_head)
        k = heads(self.linear(x, p + "self_attn.k_proj", rec), self.n_kv)
        v = heads(self.linear(x, p + "self_attn.v_proj", rec), self.n_kv)
        if self.has(p + "self_attn.q_norm.weight"):  # Qwen3
            q = rms_norm(q, self.w(p + "self_attn.q_norm.weight"), self.eps)
            k = rms_norm(k, self.w(p + "self_attn.k_norm.weight"), self.eps)
        cos, sin = self.rope(x.shape[1])
        o = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, 1.0 / math.sqrt(self.head_dim))
        return self.linear(merge(o), p + "self_attn.o_proj", rec)

    def mlp(self, p: str, x, rec):
        g = self.linear(x, p + "mlp.gate_proj", rec)
        u = self.linear(x, p + "mlp.up_proj", rec)
        return self.linear(self.act(g) * u, p + "mlp.down_proj", rec)

    NORM_KIND = "norm"  # how the norms take AWQ's 1/s (see ScaleGroup.prev)
    MLP_NORM = "post_attention_layernorm"  # the norm whose output the MLP reads

    def scale_groups(self, i):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        groups = [ScaleGroup((self.NORM_KIND, p + "input_layernorm.weight"), [a + "q_proj", a + "k_proj", a + "v_proj"],
                             lambda x: self.attn(i, x))]
        if self.linear_weight(a + "v_proj").shape == self.linear_weight(a + "o_proj").shape:
            groups.append(ScaleGroup(("linear", a + "v_proj"), [a + "o_proj"]))
        groups.append(ScaleGroup((self.NORM_KIND, p + self.MLP_NORM + ".weight"), [m + "gate_proj", m + "up_proj"],
                                 lambda x: self.mlp(p, x, _none)))
        groups.append(ScaleGroup(("linear", m + "up_proj"), [m + "down_proj"]))
        return groups

    def layer(self, i, h, rec=_none):
        p = f"model.layers.{i}."
        x = rms_norm(h, self.w(p + "input_layernorm.weight"), self.eps)
        h = h + self.attn(i, x, rec)
        x = rms_norm(h, self.w(p + "post_attention_layernorm.weight"), self.eps)
        return h + self.mlp(p, x, rec)

    def head(self, h):
        h = rms_norm(h, self.w("model.norm.weight"), self.eps)
        name = "lm_head.weight" if self.has("lm_head.weight") else "model.embed_tokens.weight"
        return F.linear(h, self.w(name))


class Gemma3Forward(LlamaForward):
    """Gemma 3: (1 + w) norms around attention and MLP, scaled embeddings, q/k norms, local and
    global rope (scaling on the global layers only), sliding-window layers, tanh-GELU, optional
    final logit soft-capping."""

    def __init__(self, family, weights=None):
        super().__init__(family, weights)
        c = self.cfg
        self.head_dim = c.get(int, "head_dim", default=256, positive=True)
        self.scale = c.get(float, "query_pre_attn_scalar", default=float(self.head_dim), positive=True) ** -0.5
        self.window = c.get(int, "sliding_window", positive=True)
        self.local_theta = float(family.local_rope_theta() or 10000.0)
        self.sliding = family.swa_layers() or [i % 6 < 5 for i in range(family.n_layers)]
        self.act = act(c, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh")
        self._tables: dict = {}

    def tables(self, T: int, local: bool):
        key = (T, local)
        if key not in self._tables:
            self._tables[key] = (rope_tables(self.head_dim, self.local_theta, T) if local else
                                 rope_tables(self.head_dim, self.theta, T, self.factors))
        return self._tables[key]

    def embed(self, ids):
        e = F.embedding(ids, self.w("model.embed_tokens.weight"))
        return e * torch.tensor(self.cfg.need(int, "hidden_size") ** 0.5, dtype=e.dtype)

    NORM_KIND = "norm1p"  # (1 + w) norms
    MLP_NORM = "pre_feedforward_layernorm"

    def norm(self, x, name):
        return rms_norm(x, self.w(name), self.eps, plus_one=True)

    def attn(self, i, x, rec=_none):
        p = f"model.layers.{i}."
        q = heads(self.linear(x, p + "self_attn.q_proj", rec), self.n_head)
        k = heads(self.linear(x, p + "self_attn.k_proj", rec), self.n_kv)
        v = heads(self.linear(x, p + "self_attn.v_proj", rec), self.n_kv)
        q, k = self.norm(q, p + "self_attn.q_norm.weight"), self.norm(k, p + "self_attn.k_norm.weight")
        cos, sin = self.tables(x.shape[1], self.sliding[i])
        o = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, self.scale,
                      self.window if self.sliding[i] else None)
        return self.linear(merge(o), p + "self_attn.o_proj", rec)

    def layer(self, i, h, rec=_none):
        p = f"model.layers.{i}."
        x = self.norm(h, p + "input_layernorm.weight")
        h = h + self.norm(self.attn(i, x, rec), p + "post_attention_layernorm.weight")
        x = self.norm(h, p + "pre_feedforward_layernorm.weight")
        return h + self.norm(self.mlp(p, x, rec), p + "post_feedforward_layernorm.weight")

    def head(self, h):
        h = self.norm(h, "model.norm.weight")
        name = "lm_head.weight" if self.has("lm_head.weight") else "model.embed_tokens.weight"
        logits = F.linear(h, self.w(name))
        cap = self.cfg.get(float, "final_logit_softcapping")
        return torch.tanh(logits / cap) * cap if cap else logits


class GPTNeoXForward(Forward):
    """GPT-NeoX / Pythia: LayerNorm, fused qkv per head, partial rotary, parallel residual."""

    def __init__(self, family, weights=None):
        super().__init__(family, weights)
        c = self.cfg
        self.n_head = c.need(int, "num_attention_heads")
        self.head_dim = c.need(int, "hidden_size") // self.n_head
        rope = family.rope_parameters()
        pct = c.get(float, "rotary_pct", default=rope.get("partial_rotary_factor", 0.25))
        self.rot = int(self.head_dim * pct)
        self.theta = float(rope.get("rope_theta", 10000.0))
        self.eps = c.get(float, "layer_norm_eps", default=1e-5, nonnegative=True)
        self.parallel = c.data.get("use_parallel_residual", True)
        self.act = act(c, "hidden_act", default="gelu")

    def ln(self, x, p):
        return F.layer_norm(x, (x.shape[-1],), self.w(p + ".weight"), self.w(p + ".bias"), self.eps)

    def embed(self, ids):
        return F.embedding(ids, self.w("gpt_neox.embed_in.weight"))

    def layer(self, i, h, rec=_none):
        p = f"gpt_neox.layers.{i}."
        B, T, _ = h.shape
        x = self.ln(h, p + "input_layernorm")
        qkv = self.linear(x, p + "attention.query_key_value", rec).view(B, T, self.n_head, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))
        cos, sin = rope_tables(self.rot, self.theta, T)
        o = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, 1.0 / math.sqrt(self.head_dim))
        a = self.linear(merge(o), p + "attention.dense", rec)
        if self.parallel:
            m = self.mlp(p, self.ln(h, p + "post_attention_layernorm"), rec)
            return h + a + m
        h = h + a
        return h + self.mlp(p, self.ln(h, p + "post_attention_layernorm"), rec)

    def mlp(self, p, x, rec):
        a = self.act(self.linear(x, p + "mlp.dense_h_to_4h", rec))
        if self.has(p + "mlp.act.scales"):  # AWQ checkpoints: transformers' ScaledActivation, act(x) / scales
            a = a / self.w(p + "mlp.act.scales")
        return self.linear(a, p + "mlp.dense_4h_to_h", rec)

    def scale_groups(self, i):
        p = f"gpt_neox.layers.{i}."
        return [ScaleGroup(("layernorm", p + "input_layernorm"), [p + "attention.query_key_value"]),
                ScaleGroup(("layernorm", p + "post_attention_layernorm"), [p + "mlp.dense_h_to_4h"]),
                ScaleGroup(("act", p + "mlp.act.scales"), [p + "mlp.dense_4h_to_h"])]

    def head(self, h):
        return F.linear(self.ln(h, "gpt_neox.final_layer_norm"), self.w("embed_out.weight"))


class GPT2Forward(Forward):
    """GPT-2: learned positions, LayerNorm, Conv1D weights ([in, out]), tanh-GELU."""

    def __init__(self, family, weights=None):
        super().__init__(family, weights)
        c = self.cfg
        self.n_head = c.need(int, "n_head", "num_attention_heads")
        self.eps = c.get(float, "layer_norm_epsilon", "layer_norm_eps", default=1e-5, nonnegative=True)
        self.act = act(c, "activation_function", default="gelu_new")
        self.prefix = "transformer." if self.has("transformer.wte.weight") else ""

    def conv1d(self, x, name, rec):
        rec(self.family.map_name(name + ".weight"), x)
        if self.hook is not None:
            self.hook(self, name, x)
        if self.int8:
            return self.int8_linear(x, name, self.w(name + ".bias"))
        return x @ self.w(name + ".weight") + self.w(name + ".bias")

    def ln(self, x, p):
        return F.layer_norm(x, (x.shape[-1],), self.w(p + ".weight"), self.w(p + ".bias"), self.eps)

    def scale_groups(self, i):
        p = f"{self.prefix}h.{i}."
        return [ScaleGroup(("layernorm", p + "ln_1"), [p + "attn.c_attn"]),
                ScaleGroup(("layernorm", p + "ln_2"), [p + "mlp.c_fc"])]

    def linear_weight(self, hf: str) -> torch.Tensor:
        return self.w(hf + ".weight").T  # Conv1D stores [in, out]

    def set_linear_weight(self, hf: str, weight: torch.Tensor) -> None:
        self._cache[hf + ".weight"] = weight.T.contiguous()

    def embed(self, ids):
        pos = torch.arange(ids.shape[1])
        return F.embedding(ids, self.w(self.prefix + "wte.weight")) + F.embedding(pos, self.w(self.prefix + "wpe.weight"))

    def layer(self, i, h, rec=_none):
        p = f"{self.prefix}h.{i}."
        x = self.ln(h, p + "ln_1")
        q, k, v = (heads(t, self.n_head) for t in self.conv1d(x, p + "attn.c_attn", rec).split(h.shape[-1], dim=-1))
        o = attention(q, k, v, 1.0 / math.sqrt(q.shape[-1]))
        h = h + self.conv1d(merge(o), p + "attn.c_proj", rec)
        x = self.ln(h, p + "ln_2")
        return h + self.conv1d(self.act(self.conv1d(x, p + "mlp.c_fc", rec)), p + "mlp.c_proj", rec)

    def head(self, h):
        h = self.ln(h, self.prefix + "ln_f")
        name = "lm_head.weight" if self.has("lm_head.weight") else self.prefix + "wte.weight"
        return F.linear(h, self.w(name))
