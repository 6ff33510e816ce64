"""W8A8 int8 (SmoothQuant, then GPTQ) as an observer of the layer loop, in one pass.

SmoothQuant (Xiao et al. 2022) as llm-compressor's SmoothQuantModifier computes it, with its
default mappings (the input norm -> q, k, v; the post-attention norm -> gate, up; for GPT-NeoX
the input norm -> qkv, the post-attention norm -> dense_h_to_4h): per input channel j of a
group, the activation's dynamic range r_j = max_t x_tj - min_t x_tj over every calibration
token, the weights' w_j = 2 max |W_ij| over the group's rows, s_j = r_j^a / w_j^(1-a) (r_j
where w_j is 0), at least 1e-5; the norm's weight is divided by s and the linears' columns
multiplied by it, which leaves the float model's outputs as they were.

Then every linear is quantized to 8 bits, one scale per output channel, symmetric, by GPTQ
(`--no-gptq`: round to nearest). The smoothing is known when a group's first linear is about to
run: its input x is the norm's output with the old weights, which the smoothed model sees as
x / s; so the group's linears are quantized as W s against the Hessian of x / s
(diag(1/s) H diag(1/s)), and the rest of the layer runs on Q / s, which is Q applied to x / s.
llm-compressor instead accumulates GPTQ's Hessians on the unsmoothed inputs and quantizes the
smoothed weights with them. As with GPTQ, the quantized layer's output feeds the next layer.
"""
from __future__ import annotations

import torch

from qconvert.calibrate.awq import _Array, fold
from qconvert.calibrate.gptq import GPTQObserver
from qconvert.checkpoint import CheckpointWriter, to_f16
from qconvert.quant.gptq import GPTQResult, gptq, group_params, quantize_codes

MINIMUM_SCALE = 1e-5
SMOOTHED = ("norm", "norm1p", "layernorm")  # the operations before a group that SmoothQuant folds into


def smoothing_scales(r: torch.Tensor, weights: list[torch.Tensor], strength: float) -> torch.Tensor:
    """s [K] for inputs whose channels range over r [K] (max - min over every token), to linears
    with weights [N_i, K]."""
    w = 2.0 * torch.cat([m.abs().amax(0, keepdim=True) for m in weights]).amax(0)
    s = torch.where(w > 0, r.pow(strength) / w.pow(1 - strength), r)
    return torch.clamp(s, min=MINIMUM_SCALE)


def round_to_nearest(W: torch.Tensor, bits: int):
    """GPTQ's result shape for plain rounding: one symmetric scale per row."""
    s, z = group_params(W, bits, True)
    q = quantize_codes(W, s, z, bits)
    Q = s[:, None] * (q - z[:, None])
    return GPTQResult(q.to(torch.int32), s[None], z[None].to(torch.int32), torch.zeros(W.shape[1], dtype=torch.int32),
                      Q, 0.0, 0.0, 0.0)


class W8A8Observer(GPTQObserver):
    """GPTQ's method on the smoothed weights: when the first linear of a SmoothQuant group comes,
    its input's column ranges give the group's scales, folded into the norm here."""

    def __init__(self, out: CheckpointWriter):
        super().__init__(out)
        self.scales: dict[str, torch.Tensor] = {}  # linear -> the smoothing of its input, this layer
        self.modified: set[str] = set()
        self.smoothed: list[dict] = []
        self.smoothed_hessian: tuple | None = None  # (the statistics, the scales, H / s / s)

    def quantize(self, fw, hf: str, H: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
        lin, o = self.plan.linears[hf], self.plan.opts
        if hf not in self.scales:
            for group in fw.scale_groups(lin.layer):
                if group.prev[0] in SMOOTHED and group.linears[0] == hf:
                    s = smoothing_scales(ranges, [fw.linear_weight(h) for h in group.linears], o.smoothing)
                    self.modified |= fold(fw, group, s)
                    for h in group.linears:
                        self.scales[h] = s
                    self.smoothed.append({"layer": lin.layer, "norm": self.plan.names.get(group.prev[1],
                                                                                           group.prev[1]),
                                          "linears": [self.plan.linears[h].name for h in group.linears],
                                          "max_scale": float(s.max()), "min_scale": float(s.min())})
        s = self.scales.get(hf)
        W = self.weight(hf, fw)
        if o.gptq:
            if s is not None:
                hit = self.smoothed_hessian
                if hit is None or hit[0] is not self.input or hit[1] is not s:
                    hit = self.smoothed_hessian = (self.input, s, H / s[:, None] / s[None, :])
                H = hit[2]
            r = gptq(W if s is None else W * s, H, 8, -1, True, o.act_order, o.damp)
        else:
            r = round_to_nearest(W if s is None else W * s, 8)
        self.out.add_linear(lin, r.q.numpy(), r.scales.numpy(), r.zeros.numpy(), None)
        self.out.layers.setdefault(lin.layer, []).append({"name": lin.name, "gptq": r.error, "rtn": r.rtn_error,
                                                          "damp": r.damp, "smoothed": s is not None})
        return r.weight if s is None else r.weight / s

    def end(self, fw, i: int) -> None:
        for name in self.modified:
            out = self.plan.names.get(name, name)
            self.out.add(out, to_f16(out, _Array(fw.w(name))))
        self.modified.clear()
        self.scales.clear()
        self.smoothed_hessian = None
        super().end(fw, i)

    def report(self) -> list[dict]:
        layers = super().report() if self.plan.opts.gptq else \
            [{"layer": i, "linears": es} for i, es in sorted(self.out.layers.items())]
        smoothing = {}
        for e in self.smoothed:
            smoothing.setdefault(e["layer"], []).append(e)
        for x in layers:
            x["smoothing"] = smoothing.get(x["layer"], [])
        return layers
