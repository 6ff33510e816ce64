"""AWQ as an observer of the layer loop, as AutoAWQ runs it: the layer runs once on its float
weights, every sample together, with every linear layer's input captured (the float output
feeds the next layer); at the layer's end, for each group of linears sharing an input, the scale
search, the scales folded into the operation before them and into the linears, then the clipping
search and the zero-point quantization of every linear (quant/awq.py holds the maths; the
family's forward names the groups, the blocks the searches compare, and the linears left
unclipped)."""
from __future__ import annotations

import numpy as np
import torch

from qconvert.calibrate.driver import Observer, samples_within
from qconvert.checkpoint import CheckpointWriter, to_f16
from qconvert.errors import InputError
from qconvert.quant import awq


class _Array:
    """A torch tensor where to_f16 expects a checkpoint tensor."""

    dtype = "F32"

    def __init__(self, t: torch.Tensor):
        self.t = t

    def array(self) -> np.ndarray:
        return self.t.numpy()

    def release(self) -> None:
        pass


class AWQObserver(Observer):
    all_samples = True

    def __init__(self, out: CheckpointWriter):
        self.out = out
        self.plan = out.plan
        self.captured: dict[str, torch.Tensor] = {}

    def linear_input(self, fw, hf: str, x: torch.Tensor) -> None:
        self.captured[hf] = x

    def end_layer(self, fw, i: int) -> bool:
        try:
            self.quantize_layer(fw, i)
        finally:
            self.captured.clear()
        self.out.flush(i)
        return False  # AWQ feeds the float output forward, as AutoAWQ

    def quantize_layer(self, fw, i: int) -> None:
        plan, captured = self.plan, self.captured
        g = plan.opts.group_size
        modified: set[str] = set()
        # sequences per forward of an inspected block, by its widest input (float32)
        widest = max(t.shape[-1] for t in captured.values())
        rows = samples_within(4 * widest * next(iter(captured.values())).shape[1])
        for group in fw.scale_groups(i):
            x = captured[group.linears[0]]
            originals = [fw.linear_weight(hf).clone() for hf in group.linears]
            inspect = group.inspect or (lambda t, hf=group.linears[0]: fw.apply_linear(hf, t))

            def run(weights, xs, group=group, inspect=inspect):
                for hf, w in zip(group.linears, weights):
                    fw.set_linear_weight(hf, w)
                return torch.cat([inspect(xs[j:j + rows]) for j in range(0, len(xs), rows)])
            try:
                s, ratio = awq.best_scale(x, originals, g, run)
            except FloatingPointError as e:
                names = ", ".join(plan.linears[hf].name for hf in group.linears)
                raise InputError(f"{plan.model.ckpt.path}: AWQ scale search for {names}: {e}") from None
            for hf, w in zip(group.linears, originals):
                fw.set_linear_weight(hf, w * s)
            modified |= fold(fw, group, s)
            scaled = x / s
            for hf in group.linears:
                captured[hf] = scaled
            self.out.layers.setdefault(i, []).append({"linears": [plan.linears[hf].name for hf in group.linears],
                                                      "ratio": ratio})
        for hf in [hf for hf in plan.linears if plan.linears[hf].layer == i]:
            w = fw.linear_weight(hf)
            if plan.opts.clip and hf.rsplit(".", 1)[-1] not in fw.family.awq_no_clip:
                w = awq.apply_clip(w, awq.best_clip(w, captured[hf], g), g)
            r = awq.quantize(w, g)
            self.out.add_linear(plan.linears[hf], r.q.numpy(), r.scales.numpy(), r.zeros.numpy(), None)
        for name in modified:
            out = plan.names.get(name, name)
            self.out.add(out, to_f16(out, _Array(fw.w(name))))

    def report(self) -> list[dict]:
        return [{"layer": i, "groups": es} for i, es in sorted(self.out.layers.items())]


def fold(fw, group, s: torch.Tensor) -> set[str]:
    """Fold 1/s into the operation before the group's linears; the names of the weights changed."""
    kind, name = group.prev
    if kind == "norm":
        fw.set(name, fw.w(name) / s)
        return {name}
    if kind == "norm1p":  # Gemma's (1 + w) norms
        fw.set(name, (1 + fw.w(name)) / s - 1)
        return {name}
    if kind == "act":  # a new scale after the activation (act(x) / s)
        fw.set(name, s.clone())
        return {name}
    if kind == "layernorm":
        for part in (".weight", ".bias"):
            fw.set(name + part, fw.w(name + part) / s)
        return {name + ".weight", name + ".bias"}
    # a linear before: its output rows that feed the group (the consumers' input channels) take 1/s
    rows = group.rows or slice(None)
    w = fw.linear_weight(name).clone()
    w[rows] /= s[:, None]
    fw.set_linear_weight(name, w)
    changed = set()
    if fw.has(name + ".bias"):
        b = fw.w(name + ".bias").clone()
        b[rows] /= s
        fw.set(name + ".bias", b)
        changed.add(name + ".bias")
    return changed
