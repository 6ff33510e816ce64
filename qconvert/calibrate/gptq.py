"""GPTQ as an observer of the layer loop: every sample runs through a layer together; just
before each linear layer runs, its Hessian (2/n X^T X of its actual input, shared by linears
that share the input) is formed and the layer quantized, and its dequantized weight is what the
rest of the layer then uses. So q/k/v are quantized on the norm's output, o on the attention
computed with the quantized q/k/v, gate/up after o, down after gate/up (GPTQModel's
true-sequential order), and the quantized layer's output feeds the next layer."""
from __future__ import annotations

import torch

from qconvert.calibrate.driver import Observer, few_token_experts
from qconvert.checkpoint import CheckpointWriter
from qconvert.errors import InputError
from qconvert.quant.blocks import first_nonfinite
from qconvert.quant.gptq import gptq


SYMMETRIC_FROM = 2048  # inputs at least this wide form X^T X from its upper triangle of blocks


def hessian(x: torch.Tensor) -> torch.Tensor:
    """2/n X^T X of a linear's input rows. Wide inputs (an MLP's down projection) compute only
    the blocks on and above the diagonal, in four bands, and mirror them: 10 of 16 blocks' work,
    the same values (each element is the same dot product over the rows)."""
    X = x.reshape(-1, x.shape[-1]).float()
    K = X.shape[1]
    if K < SYMMETRIC_FROM:
        return (X.T @ X) * (2.0 / X.shape[0])
    H = torch.empty(K, K)
    band = -(-K // 4)
    for i in range(0, K, band):
        rows = X[:, i:i + band].T @ X[:, i:]
        H[i:i + band, i:] = rows
        H[i:, i:i + band] = rows.T
    return H.mul_(2.0 / X.shape[0])


class GPTQObserver(Observer):
    all_samples = True
    feeds = "quantized outputs"
    # where the CPU has them: the layers' products (not the Hessians: a bfloat16 product's sums
    # come back rounded to bfloat16, which leaves H too far from positive definite to factorise
    # at the usual damping)
    fast_products = "bfloat16"

    def linear_input(self, fw, hf: str, x: torch.Tensor) -> None:
        lin, o = self.plan.linears.get(hf), self.plan.opts
        if lin is None:  # kept in float (a mixture's router)
            return
        H = fw.per_input("hessian", x, lambda: hessian(x))
        W = fw.linear_weight(hf).float()
        bad = first_nonfinite(W.numpy())
        if bad >= 0:
            raise InputError(f"{self.plan.model.ckpt.path}: tensor {lin.name}.weight has a non-finite value at flat "
                             f"index {bad}")
        r = gptq(W, H, o.bits, o.group_size, o.sym, o.act_order, o.damp)
        fw.set_linear_weight(hf, r.weight)
        self.out.add_linear(lin, r.q.numpy(), r.scales.numpy(), r.zeros.numpy(), r.g_idx.numpy())
        self.out.layers.setdefault(lin.layer, []).append({"name": lin.name, "gptq": r.error, "rtn": r.rtn_error,
                                                          "damp": r.damp})

    def __init__(self, out: CheckpointWriter):
        self.out = out
        self.plan = out.plan
        self.expert_min_tokens = out.plan.opts.expert_min_tokens
        self.all_tokens: dict[int, list[dict]] = {}  # by layer: experts quantized from every token

    def end_layer(self, fw, i: int) -> bool:
        few = few_token_experts(fw)
        if few:
            self.all_tokens[i] = few
        self.out.flush(i)
        return False

    def report(self) -> list[dict]:
        return [{"layer": i, "gptq_error": sum(e["gptq"] for e in es), "rtn_error": sum(e["rtn"] for e in es),
                 **({"experts_from_all_tokens": self.all_tokens[i]} if i in self.all_tokens else {}),
                 "linears": es} for i, es in sorted(self.out.layers.items())]
