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

from qconvert.calibrate.driver import Observer, few_token_experts, samples_within
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
        self.expert_min_tokens = out.plan.opts.expert_min_tokens  # too few routed tokens: every token for the searches
        self.captured: dict[str, torch.Tensor] = {}
        self.all_tokens: dict[int, list[dict]] = {}  # by layer: experts searched on every token

    def linear_input(self, fw, hf: str, x: torch.Tensor) -> None:
        self.captured[hf] = x

    def end_layer(self, fw, i: int) -> bool:
        try:
            self.quantize_layer(fw, i)
        finally:
            self.captured.clear()
        few = few_token_experts(fw)
        if few:
            self.all_tokens[i] = few
        self.out.flush(i)
        return False  # AWQ feeds the float output forward, as AutoAWQ

    def quantize_layer(self, fw, i: int) -> None:
        plan, captured = self.plan, self.captured
        g = plan.opts.group_size
        modified: set[str] = set()
        # sequences per forward of an inspected block, by its widest input (float32); an expert's
        # inputs are rows of tokens: as many tokens as that many sequences hold
        widest = max(t.shape[-1] for t in captured.values())
        seq = max(t.shape[1] for t in captured.values() if t.dim() == 3)
        rows = samples_within(4 * widest * seq)

        def block(linears: list[str], inspect):
            """run(weights, xs): the inspected block's output on inputs xs with those weights of
            the linears (the first linear alone when there is no block)."""
            inspect = inspect or (lambda t: fw.apply_linear(linears[0], t))

            def run(weights, xs):
                for hf, w in zip(linears, weights):
                    fw.set_linear_weight(hf, w)
                step = rows if xs.dim() == 3 else rows * seq
                return torch.cat([inspect(xs[j:j + step]) for j in range(0, len(xs), step)])
            return run

        # per group: (its linears, its inspected block, the scale search's float output and best
        # error, its report entry)
        searched = []
        for group in fw.scale_groups(i):
            x = captured[group.linears[0]]
            originals = [fw.linear_weight(hf).clone() for hf in group.linears]
            floats = frozenset(j for j, hf in enumerate(group.linears) if hf not in plan.linears)
            try:
                found: dict = {}
                s, ratio = awq.best_scale(x, originals, g, block(group.linears, group.inspect), floats=floats,
                                          found=found)
            except FloatingPointError as e:
                names = ", ".join(self.name_of(hf) for hf in group.linears)
                raise InputError(f"{plan.model.ckpt.path}: AWQ scale search for {names}: {e}") from None
            for hf, w in zip(group.linears, originals):
                fw.set_linear_weight(hf, w * s)
            modified |= fold(fw, group, s) | {group.linears[j] + ".weight" for j in floats}
            scaled: dict[int, torch.Tensor] = {}  # each linear's own inputs (an expert's: its tokens), scaled once
            for hf in group.linears:
                t = captured[hf]
                if id(t) not in scaled:
                    scaled[id(t)] = t / s
                captured[hf] = scaled[id(t)]
            entry = {"linears": [self.name_of(hf) for hf in group.linears], "ratio": ratio}
            self.out.layers.setdefault(i, []).append(entry)
            searched.append((group.linears, group.inspect, found, entry))
        layer = [hf for hf in plan.linears if plan.linears[hf].layer == i]
        clipped = self.clip_layer(fw, i, layer, searched, block) if plan.opts.clip else {}
        for hf in layer:
            r = awq.quantize(clipped.get(hf, fw.linear_weight(hf)), g)
            self.out.add_linear(plan.linears[hf], r.q.numpy(), r.scales.numpy(), r.zeros.numpy(), None)
        for name in modified:
            out = plan.names.get(name, name)
            self.out.add(out, to_f16(out, _Array(fw.w(name))))

    def name_of(self, hf: str) -> str:
        """A linear's name in the checkpoint written (a float one's too: a mixture's router)."""
        lin = self.plan.linears.get(hf)
        return lin.name if lin is not None else self.plan.names.get(hf + ".weight", hf + ".weight")[:-len(".weight")]

    def clip_layer(self, fw, i: int, layer: list[str], searched: list, block) -> dict[str, torch.Tensor]:
        """The clipped weights of the layer's linears whose clipping is kept. AutoAWQ's search
        picks each (row, group)'s clipping range by the linear's output on a sample of tokens; it
        is kept only where it lowers the error of the block the scale search inspects (or of the
        linear's own output, for a linear in no scale group) over every calibration token, both
        weights quantized, against the float block. On Qwen2.5-0.5B two blocks of 72 (the MLPs of
        layers 2 and 3, where its massive activations arise) come out 20% worse clipped, and
        clipping them costs the whole model 5% in KL divergence; elsewhere clipping helps. A
        group's float output and unclipped error are the scale search's (the same products, up
        to rounding: x/s against Q(W s) there, x against Q(W s)/s here), so the check costs one
        block forward per group."""
        g, captured = self.plan.opts.group_size, self.captured
        candidates = {hf: awq.apply_clip(fw.linear_weight(hf), awq.best_clip(fw.linear_weight(hf), captured[hf], g), g)
                      for hf in layer if hf.rsplit(".", 1)[-1] not in fw.family.awq_no_clip}
        grouped = {hf for linears, *_ in searched for hf in linears}
        alone = [([hf], None, None, None) for hf in candidates if hf not in grouped]
        entries = self.out.layers.setdefault(i, [])
        kept: dict[str, torch.Tensor] = {}
        for linears, inspect, found, entry in searched + alone:
            if not any(hf in candidates for hf in linears):
                continue
            run, x = block(linears, inspect), captured[linears[0]]
            floats = [fw.linear_weight(hf) for hf in linears]

            def error(weights, ref, run=run, x=x) -> float:
                return float((run(weights, x) - ref).double().pow(2).sum())

            def rounded(hf, w):  # what the checkpoint holds: a float linear (a router) as it is
                return awq.pseudo_quantize(w, g)[0] if hf in self.plan.linears else w
            ref = found["reference"] if found else run(floats, x)
            plain = found["error"] if found else error([rounded(hf, w) for hf, w in zip(linears, floats)], ref)
            clip = error([rounded(hf, candidates.get(hf, w)) for hf, w in zip(linears, floats)], ref)
            run(floats, x)  # the float weights back: quantize_layer rounds them
            keep = clip < plain
            if keep:
                kept.update({hf: candidates[hf] for hf in linears if hf in candidates})
            if entry is None:
                entry = {"linears": [self.name_of(hf) for hf in linears]}
                entries.append(entry)
            entry["clip"] = keep
            entry["clip_error"] = round(clip / plain, 4) if plain > 0 else 1.0
        return kept

    def report(self) -> list[dict]:
        return [{"layer": i, "groups": es,
                 **({"experts_from_all_tokens": self.all_tokens[i]} if i in self.all_tokens else {})}
                for i, es in sorted(self.out.layers.items())]


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
