"""The base of every family's forward pass in plain torch, one decoder layer at a time.

A forward reads a layer's weights when the layer runs (from the memory-mapped checkpoint, or
from other weights under the same HF names: a GGUF file's, a GPTQ checkpoint's, dequantized)
and the layer loop (calibrate/driver.py) drops them after, so memory holds one layer. Every
linear layer runs through `linear()`, where the loop's observers see its input. Each family's
module subclasses Forward with its embed / layer / head; the pieces they share are in
arch/layers.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from qconvert.arch.layers import int8_rows
from qconvert.quant.blocks import to_float32


@dataclass
class ScaleGroup:
    """Linear layers that share an input, for AWQ: the operation before them that can absorb a
    per-channel scale, and the block whose output the scale search compares."""

    prev: tuple[str, str]  # ("norm" | "norm1p" | "layernorm" | "act" | "linear", HF name or prefix)
    linears: list[str]  # HF prefixes; the first one's input is the group's input
    inspect: Callable[[torch.Tensor], torch.Tensor] | None = None  # None: the linear itself
    rows: slice | None = None  # prev "linear": its output rows that feed these linears (a fused
    # qkv's v rows); None: all of them


class Forward:
    """Base: weight access by HF name (float32 torch, read from the mmap on demand). `weights`
    replaces the checkpoint's tensors: anything with `in` and `[]` by HF name giving a Tensor."""

    PRODUCTS = ("float32", "int8", "bfloat16")  # the matrix products linear() can run

    def __init__(self, family, weights=None):
        self.family = family
        self.cfg = family.cfg
        self.tensors = weights if weights is not None else {
            n.replace("language_model.", ""): t for n, t in family.ckpt.tensors.items()}
        self._cache: dict[str, torch.Tensor] = {}
        # the linear layers' matrix products: "float32"; "int8" (int8_linear: the importance
        # matrix's statistics only); "bfloat16" (bf16_linear: GPTQ's forward, on CPUs that multiply
        # bfloat16 natively)
        self.products = "float32"
        self._int8: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._bf16: dict[str, torch.Tensor] = {}
        self._per_input: dict[str, tuple[torch.Tensor, object]] = {}
        # set by the layer loop (calibrate/driver.py) for the layers it runs: each observer sees
        # every linear layer's input before the layer runs (observers.py)
        self.observers: tuple = ()
        # set by the layer loop while a batch runs: [(calibration unit, its samples in the
        # batch)] and the batch's number of samples (driver.unit_parts)
        self.chunk_units: list[tuple[int, slice]] | None = None
        self.chunk_samples = 0
        # set by quantize_inputs: the loader's run-time quantization of these linears' inputs
        self._acts: tuple[Callable[[torch.Tensor], torch.Tensor], frozenset[str]] | None = None

    def quantize_inputs(self, quantize: Callable[[torch.Tensor], torch.Tensor], linears: frozenset[str]) -> None:
        """Run the input of each linear layer in `linears` (HF prefixes) through `quantize` (a
        W8A8 or FP8 checkpoint's activation quantization, quant/activations.py) before its
        matrix product, as the loader does."""
        self._acts = (quantize, linears)

    def use_products(self, kind: str) -> str:
        """Run the linear layers' matrix products as `kind` where this forward can; returns the
        kind it will use."""
        self.products = kind if kind in self.PRODUCTS else "float32"
        return self.products

    def linear_weight(self, hf: str) -> torch.Tensor:
        """A linear layer's weight as [out, in]."""
        return self.w(hf + ".weight")

    def set_linear_weight(self, hf: str, weight: torch.Tensor) -> None:
        """Replace a linear layer's weight ([out, in]) for the rest of this layer's run."""
        self._cache[hf + ".weight"] = weight
        self._int8.pop(hf + ".weight", None)
        self._bf16.pop(hf + ".weight", None)

    def apply_linear(self, hf: str, x: torch.Tensor) -> torch.Tensor:
        """x times the layer's current weight (no bias: the scale searches compare differences)."""
        return F.linear(x, self.linear_weight(hf))

    def set(self, name: str, value: torch.Tensor) -> None:
        """Replace any weight (a norm's, a bias) for the rest of this layer's run."""
        self._cache[name] = value

    def scale_groups(self, i: int) -> list[ScaleGroup]:
        """AWQ's groups for decoder layer i, in AutoAWQ's order, from the family's awq_groups."""
        if not self.family.awq_groups:
            raise NotImplementedError(f"no AWQ scale groups for {self.family.arch_name}")
        p = self.family.layer_prefix(i)
        out = []
        for spec in self.family.awq_groups:
            linears = [p + n for n in spec.linears]
            prev = p + spec.prev
            if spec.same_shape and self.linear_weight(prev).shape != self.linear_weight(linears[0]).shape:
                continue
            name = prev + ".weight" if spec.kind in ("norm", "norm1p") else prev
            out.append(ScaleGroup((spec.kind, name), linears, self.block(i, spec.inspect) if spec.inspect else None,
                                  spec.rows))
        return out

    def block(self, i: int, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """Layer i's block `name` ("attention", "mlp") as a function of its input."""
        raise NotImplementedError(f"{type(self).__name__} has no {name} block")

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
        """Drop every weight read so far (the layer loop calls this after each layer)."""
        self._cache.clear()
        self._int8.clear()
        self._bf16.clear()
        self._per_input.clear()

    def per_input(self, key: str, x: torch.Tensor, make: Callable[[], object]) -> object:
        """`make()`, computed once for all the linear layers that share the input x (q, k, v;
        gate, up) and kept until another input comes: the int8 rows of x, its squared sums for
        the importance matrix, its Hessian for GPTQ."""
        hit = self._per_input.get(key)
        if hit is not None and hit[0] is x:
            return hit[1]
        value = make()
        self._per_input[key] = (x, value)
        return value

    def has(self, name: str) -> bool:
        return name in self._cache or name in self.tensors

    def observe(self, hf: str, x: torch.Tensor) -> None:
        """Offer a linear layer's input to the layer loop's observers, before the layer runs (an
        observer may replace its weight then)."""
        for o in self.observers:
            o.linear_input(self, hf, x)

    def linear_input(self, hf: str, x: torch.Tensor) -> torch.Tensor:
        """What a linear layer multiplies: its input, offered to the observers first, then
        quantized as the loader quantizes it (quantize_inputs) where it does."""
        self.observe(hf, x)
        if self._acts is not None and hf in self._acts[1]:
            return self.per_input("acts", x, lambda: self._acts[0](x))
        return x

    def linear(self, x: torch.Tensor, hf: str, bias: bool | None = None) -> torch.Tensor:
        x = self.linear_input(hf, x)
        b = self.w(hf + ".bias") if (bias is None and self.has(hf + ".bias")) or bias else None
        if self.products != "float32":
            return self.low_precision_linear(x, hf, b)
        return F.linear(x, self.w(hf + ".weight"), b)

    def low_precision_linear(self, x: torch.Tensor, hf: str, b: torch.Tensor | None) -> torch.Tensor:
        return (self.int8_linear if self.products == "int8" else self.bf16_linear)(x, hf, b)

    def bf16_linear(self, x: torch.Tensor, hf: str, b: torch.Tensor | None) -> torch.Tensor:
        """x W^T (+ b) from bfloat16 copies of x (once for all linears sharing it) and W, summed
        in float32, float32 out: twice the speed of float32 where the CPU multiplies bfloat16
        natively (AVX512-BF16, AMX), each product off by about 0.3%, as on a GPU running the
        model in bfloat16."""
        xb = self.per_input("bf16", x, lambda: x.to(torch.bfloat16))
        key = hf + ".weight"
        if key not in self._bf16:
            self._bf16[key] = self.linear_weight(hf).to(torch.bfloat16)
        y = F.linear(xb, self._bf16[key]).float()
        if b is not None:
            y += b
        return y

    def int8_linear(self, x: torch.Tensor, hf: str, b: torch.Tensor | None) -> torch.Tensor:
        """x W^T (+ b) as an int8 matrix product: the weight's rows and the input's rows each
        scaled to int8 by their largest magnitude (the input once for all linears sharing it),
        int32 sums, float32 out. About 2x the speed of float32 on CPUs with int8 dot products,
        and about 1% of error in the product; calibration statistics only, never quantization."""
        xq, xs = self.per_input("int8", x, lambda: int8_rows(x.reshape(-1, x.shape[-1])))
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

    def layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """All layers at once, weights kept (tests and short inputs; calibrate/driver.py streams)."""
        h = self.embed(ids)
        for i in range(self.family.n_layers):
            h = self.layer(i, h)
        return self.head(h)
