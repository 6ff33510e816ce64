"""GPTQ as an observer of the layer loop: every sample runs through a layer together; just
before each linear layer runs, its Hessian (2/n X^T X of its actual input, shared by linears
that share the input) is formed and the layer quantized, and its dequantized weight is what the
rest of the layer then uses. So q/k/v are quantized on the norm's output, o on the attention
computed with the quantized q/k/v, gate/up after o, down after gate/up (GPTQModel's
true-sequential order), and the quantized layer's output feeds the next layer."""
from __future__ import annotations

import torch

from qconvert.calibrate.driver import Observer, few_token_experts, unit_parts
from qconvert.checkpoint import CheckpointWriter
from qconvert.errors import InputError
from qconvert.quant.blocks import first_nonfinite
from qconvert.quant.gptq import gptq


SYMMETRIC_FROM = 512  # inputs at least this wide form X^T X from its blocks on and above the diagonal
BAND = 256  # rows per band of those blocks
SAME = "same input"  # a linear's statistics payload when it shares the previous linear's input


class Bands:
    """X^T X of a wide input as its blocks on and above the diagonal: bands of BAND rows, each
    from the diagonal to the last column. Summed band by band (about half the whole product's
    work; on a 2-core AVX2 EPYC a 2048 x 4864 input's bands take 0.34 s, the whole product 1.04 s
    and four bands 0.48 s); full() mirrors them once into the whole matrix."""

    def __init__(self, K: int, bands: list[torch.Tensor]):
        self.K, self.bands = K, bands

    def __iadd__(self, other: "Bands") -> "Bands":
        for a, b in zip(self.bands, other.bands):
            a += b
        return self

    def full(self) -> torch.Tensor:
        H = torch.empty(self.K, self.K)
        for i, rows in zip(range(0, self.K, BAND), self.bands):
            H[i:i + BAND, i:] = rows
            H[i:, i:i + BAND] = rows.T
        return H


def gram_sum(x: torch.Tensor) -> torch.Tensor | Bands:
    """X^T X of a linear's input rows, to be summed with others: inputs at least SYMMETRIC_FROM
    wide as Bands, only the blocks on and above the diagonal (each element the same dot product
    over the rows as in the whole product)."""
    X = x.reshape(-1, x.shape[-1]).float()
    K = X.shape[1]
    if K < SYMMETRIC_FROM:
        return X.T @ X
    return Bands(K, [X[:, i:i + BAND].T @ X[:, i:] for i in range(0, K, BAND)])


def gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X of a linear's input rows."""
    g = gram_sum(x)
    return g.full() if isinstance(g, Bands) else g


def hessian(x: torch.Tensor) -> torch.Tensor:
    """2/n X^T X of a linear's input rows."""
    return gram(x).mul_(2.0 / max(1, x.reshape(-1, x.shape[-1]).shape[0]))


class GPTQStatistics(Observer):
    """GPTQ's part in the layer loop over the samples: for each new input of a linear it
    quantizes, the Gram matrix X^T X of every calibration unit's rows, summed in the units'
    tree (parallel.Tree), the row count and each column's range (max, min: SmoothQuant's); the
    linear's quantized weight comes back (`send`) and the rest of the layer runs on it. Linears
    that share the input (q, k, v) send SAME after the first."""

    all_samples = True

    def __init__(self, names, send, expert_min_tokens: int | None = None, gram: bool = True):
        self.names = frozenset(names)
        self.send = send
        self.gram = gram  # False: column ranges only (W8A8 rounding to nearest)
        self.expert_min_tokens = expert_min_tokens
        self.last: torch.Tensor | None = None

    def linear_input(self, fw, hf: str, x: torch.Tensor) -> None:
        if hf not in self.names:  # kept in float (a mixture's router)
            return
        payload = SAME if x is self.last else statistics(fw, x, self.gram)
        self.last = x
        fw.set_linear_weight(hf, self.send(fw, "linear", hf, payload))

    def end_layer(self, fw, i: int) -> bool:
        self.last = None
        return bool(self.send(fw, "end", i, None))


def statistics(fw, x: torch.Tensor, grams: bool = True) -> dict:
    """A share of the samples' statistics of input x: per-unit Gram matrices as the tree's
    blocks, the row count, each column's max and min (exact however the rows are shared)."""
    from qconvert.calibrate.parallel import Tree
    tree = Tree()
    if grams:
        for u, part in unit_parts(fw, x):
            tree.add(u, gram_sum(part))
    rows = x.reshape(-1, x.shape[-1])
    return {"gram": tree.blocks(), "rows": rows.shape[0], "max": rows.amax(0), "min": rows.amin(0)}


def reduce(payloads: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the Hessian 2/n X^T X over every worker's rows, each column's range max - min)."""
    from qconvert.calibrate.parallel import total
    n = sum(p["rows"] for p in payloads)
    H = total([p["gram"] for p in payloads])
    if isinstance(H, Bands):
        H = H.full()
    if H is not None:
        H.mul_(2.0 / max(1, n))
    return H, torch.stack([p["max"] for p in payloads]).amax(0) - torch.stack([p["min"] for p in payloads]).amin(0)


def finite_weight(fw, hf: str, path, name: str) -> torch.Tensor:
    """Linear `hf`'s weight from the forward as float32, refusing NaN and infinity (naming the
    checkpoint `path` and the tensor `name`)."""
    W = fw.linear_weight(hf).float()
    bad = first_nonfinite(W.numpy())
    if bad >= 0:
        raise InputError(f"{path}: tensor {name} has a non-finite value at flat index {bad}")
    return W


class GPTQObserver:
    """GPTQ's method: given a linear's Hessian over every sample, the linear quantized (the
    weights read from this process's forward), written, its dequantized weight returned; at a
    layer's end the layer's tensors flushed to the checkpoint."""

    all_samples = True
    feeds = "quantized outputs"
    # where the CPU has them: the layers' products (not the Hessians: a bfloat16 product's sums
    # come back rounded to bfloat16, which leaves H too far from positive definite to factorise
    # at the usual damping)
    fast_products = "bfloat16"
    part = "gptq"  # parallel.PARTS: the statistics part the workers run

    def __init__(self, out: CheckpointWriter):
        self.out = out
        self.plan = out.plan
        self.expert_min_tokens = out.plan.opts.expert_min_tokens
        self.all_tokens: dict[int, list[dict]] = {}  # by layer: experts quantized from every token
        self.input: tuple | None = None  # the reduced statistics of the last new input

    def part_args(self, samples: int) -> dict:  # noqa: ARG002 - every method's signature
        """What the workers' statistics part is made with (`samples`: all of them)."""
        return {"names": sorted(self.plan.linears), "expert_min_tokens": self.expert_min_tokens,
                "gram": self.plan.opts.gptq}

    def observer(self, samples: int) -> Observer:
        """The statistics part wired to this method in the same process."""
        return GPTQStatistics(send=lambda fw, kind, key, p: self.handle(fw, kind, key, [p]), **self.part_args(samples))

    def handle(self, fw, kind: str, key, payloads: list):
        if kind == "linear":
            if not isinstance(payloads[0], str):  # SAME: the previous linear's input
                self.input = reduce(payloads)
            return self.quantize(fw, key, *self.input)
        self.end(fw, key)
        return False

    def weight(self, hf: str, fw) -> torch.Tensor:
        return finite_weight(fw, hf, self.plan.model.ckpt.path, f"{self.plan.linears[hf].name}.weight")

    def quantize(self, fw, hf: str, H: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        lin, o = self.plan.linears[hf], self.plan.opts
        r = gptq(self.weight(hf, fw), H, o.bits, o.group_size, o.sym, o.act_order, o.damp)
        self.out.add_linear(lin, r.q.numpy(), r.scales.numpy(), r.zeros.numpy(), r.g_idx.numpy())
        self.out.layers.setdefault(lin.layer, []).append({"name": lin.name, "gptq": r.error, "rtn": r.rtn_error,
                                                          "damp": r.damp})
        return r.weight

    def end(self, fw, i: int) -> None:
        self.input = None
        few = few_token_experts(fw)
        if few:
            self.all_tokens[i] = few
        self.out.flush(i)

    def report(self) -> list[dict]:
        return [{"layer": i, "gptq_error": sum(e["gptq"] for e in es), "rtn_error": sum(e["rtn"] for e in es),
                 **({"experts_from_all_tokens": self.all_tokens[i]} if i in self.all_tokens else {}),
                 "linears": es} for i, es in sorted(self.out.layers.items())]
