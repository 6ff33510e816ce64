"""The one layer loop. Token batches run through the model one decoder layer at a time: a
layer's weights are read when it runs (from the memory-mapped checkpoint) and dropped after, so
memory holds one layer and the activations, never the model. The loop owns the order of layers,
how many samples run together, the allocator's tuning and the observers' view of the layer.

Methods are observers (llm-compressor's modifiers, GPTQModel's loop processors): while a layer
runs, each observer sees every linear layer's input before that linear runs, and may replace
the linear's weight there (GPTQ quantizes it, so the rest of the layer runs on the quantized
weight); when the layer has run on every sample, each observer sees the layer's end, with its
weights still loaded, and may change them (AWQ folds its scales and quantizes there); if it
asks, the layer runs again on the changed weights before its output moves on to the next layer.
No method swaps a hook or runs inside a progress callback.

The samples are calibration units of UNIT samples: a batch never splits a unit, and observers
sum their statistics per unit (parallel.Tree), so that the samples can be shared among workers
(calibrate/parallel.py) without changing a bit of the result.
"""
from __future__ import annotations

import ctypes
import sys
from typing import Callable

import torch

from qconvert.arch.forward import Forward

Progress = Callable[[int, int], None]  # (layers done, layers)


class Observer:
    """A method in the layer loop; every hook is optional."""

    # statistics over every sample are needed before the layer's linears run (GPTQ's Hessians,
    # AWQ's searches): all samples run through a layer in one batch
    all_samples = False
    feeds = "float outputs"  # what the layer passes on to the next: its float or its quantized output
    fast_products = "float32"  # the forward's matrix products unless --exact-calib (Forward.products)
    # a mixture's expert that the router sends fewer tokens than this (or none) first runs every
    # token of the batch for this observer's statistics, while the layer's output keeps the real
    # routing (MoEForward.mlp); None: experts see only their routed tokens
    expert_min_tokens: int | None = None

    def linear_input(self, fw: Forward, hf: str, x: torch.Tensor) -> None:
        """Linear layer `hf` is about to run on x [samples, tokens, in]; fw.set_linear_weight()
        replaces its weight for the rest of the layer's run."""

    def end_layer(self, fw: Forward, i: int) -> bool:
        """Decoder layer i has run on every sample (weights still loaded, observers silent).
        Return True after changing its weights when the next layer must see the changed layer's
        output rather than the one already computed."""
        return False


def few_token_experts(fw: Forward) -> list[dict]:
    """The experts of the layer just run that took every token for the observers' statistics
    (Observer.expert_min_tokens), for the method's report; the forward's list is emptied."""
    few = getattr(fw, "few_token_experts", None) or []
    out = [{"expert": e, "routed_tokens": n} for e, n in few]
    few.clear()
    return out


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

_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86's AVX512-BF16 and AMX, Arm's BF16 extension
# int8 dot products: x86's AVX512-VNNI, AVX-VNNI and AMX, Arm's dot product and int8 matrix multiply
_INT8_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"}


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux's cpuinfo lists them (elsewhere: none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware: there bfloat16 products run at about
    twice float32's speed, elsewhere slower."""
    return bool(_BF16_FLAGS & _cpu_flags())


def native_int8() -> bool:
    """Whether this CPU has int8 dot products: there int8 products (torch._int_mm) run at about
    twice float32's speed; without them (AVX2 alone) about 3x slower than float32."""
    return bool(_INT8_FLAGS & _cpu_flags())


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


UNIT = 4  # samples per calibration unit: statistics are summed per unit, then over units in a fixed tree


def unit_parts(fw: Forward, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """x, a linear layer's input for the samples running now, split by calibration unit:
    [(unit, its part of x)]. An input whose rows do not follow the samples (a mixture expert's
    routed tokens from several units at once) is one part, under the first unit."""
    units = fw.chunk_units or [(0, slice(None))]
    if len(units) == 1 or x.dim() != 3 or x.shape[0] != fw.chunk_samples:
        return [(units[0][0], x)]
    return [(u, x[s]) for u, s in units]


def run_layers(fw: Forward, tokens: torch.Tensor, observers: tuple[Observer, ...] = (),
               progress: Progress | None = None, first_unit: int = 0) -> torch.Tensor:
    """Run token batches [n, T] through every decoder layer, one layer at a time for all of them;
    returns the last layer's output [n, T, D]. The samples are calibration units of UNIT samples
    (the first one numbered `first_unit`: a worker's share starts there); a batch never splits a
    unit, so every unit's activations, and the statistics the observers take from them per unit,
    are the same whichever share of the samples this run holds."""
    ALLOCATOR.tune()
    n = len(tokens)
    units = [(first_unit + k // UNIT, k, min(k + UNIT, n)) for k in range(0, n, UNIT)]
    if any(o.all_samples for o in observers):
        chunks = [(0, n, [(u, slice(a, b)) for u, a, b in units])]
    else:
        batch = min(UNIT, samples_per_batch(fw, tokens.shape[1]))
        chunks = [(j, min(j + batch, b), [(u, slice(0, min(j + batch, b) - j))])
                  for u, a, b in units for j in range(a, b, batch)]

    def through(i: int, h: torch.Tensor) -> torch.Tensor:
        outs = []
        for a, b, parts in chunks:
            fw.chunk_units, fw.chunk_samples = parts, b - a
            outs.append(fw.layer(i, h[a:b]))
        fw.chunk_units = None
        return torch.cat(outs)
    with torch.inference_mode():
        h = torch.cat([fw.embed(tokens[a:b]) for a, b, _ in chunks])
        fw.clear()
        layers = fw.family.n_layers
        for i in range(layers):
            fw.observers = observers
            try:
                out = through(i, h)
            finally:
                fw.observers = ()
            rerun = False
            for o in observers:
                rerun = bool(o.end_layer(fw, i)) or rerun
            h = through(i, h) if rerun else out
            del out
            fw.clear()  # this layer's weights go; the next layer's are read when it runs
            if progress:
                progress(i + 1, layers)
            ALLOCATOR.release()
    return h
