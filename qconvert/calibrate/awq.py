"""AWQ as an observer of the layer loop, as AutoAWQ runs it: the layer runs once on its float
weights, every sample together, with every linear layer's input captured (the float output
feeds the next layer); at the layer's end, for each group of linears sharing an input, the scale
search, the scales folded into the operation before them and into the linears, then the clipping
search and the zero-point quantization of every linear (quant/awq.py holds the maths; the
family's forward names the groups, the blocks the searches compare, and the linears left
unclipped)."""
from __future__ import annotations

import math

import numpy as np
import torch

from qconvert.calibrate.driver import UNIT, Observer, few_token_experts, samples_within
from qconvert.calibrate.gptq import Bands, gram_sum
from qconvert.calibrate.parallel import Tree, total
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


class AWQStatistics(Observer):
    """AWQ's part in the layer loop over the samples: every linear's input captured while the
    layer runs on its float weights; at the layer's end, group by group, each statistic the
    searches need over every sample, sent (`send`) for this share of the samples as per-unit
    sums in the units' tree: the input's mean magnitude per channel, each scale candidate's
    output error (the first part of the samples, then the rest for the candidates kept), each
    linear's clipping errors per (row, group) and shrink step, and whether clipping a block helps.
    The replies (the mean, the candidates kept, the winner, the clipping maxima, keep or not) are
    applied to this forward's weights and captured inputs, as the method applies them to its
    own. `shared`: the method runs on this same forward (one process) and has applied them."""

    all_samples = True

    def __init__(self, names, send, group: int, clip: bool, samples: int, expert_min_tokens: int | None = None,
                 shared: bool = False):
        self.names = frozenset(names)
        self.send = send
        self.group, self.clip, self.samples = group, clip, samples  # samples: all workers' together
        self.expert_min_tokens = expert_min_tokens
        self.shared = shared
        self.captured: dict[str, torch.Tensor] = {}
        self.units: list[tuple[int, slice]] = []

    def linear_input(self, fw, hf: str, x: torch.Tensor) -> None:
        self.captured[hf] = x
        if fw.chunk_units:
            self.units = list(fw.chunk_units)

    def end_layer(self, fw, i: int) -> bool:
        try:
            self.search_layer(fw, i)
        finally:
            self.captured.clear()
        return bool(self.send(fw, "end", i, None))  # False: AWQ feeds the float output forward, as AutoAWQ

    def pieces(self, x: torch.Tensor, parts: list[tuple[int, int]]) -> list[list[tuple[int, slice]]]:
        """For each part [first, last) of all the samples (or of an expert's token rows), the
        (unit, slice of x) pieces of it that x holds."""
        if x.dim() != 3 or not self.units:  # an expert's routed tokens: this process holds them all
            return [[(0, slice(a, b))] for a, b in parts]
        out = []
        for a, b in parts:
            mine = []
            for u, sl in self.units:
                first = u * UNIT - sl.start  # the global number of x's sample 0 in this unit's terms
                lo, hi = max(a - first, sl.start), min(b - first, sl.stop)
                if lo < hi:
                    mine.append((u, slice(lo, hi)))
            out.append(mine)
        return out

    def search_pieces(self, x: torch.Tensor) -> list[list[tuple[int, slice]]]:
        """The pieces of x in each part of the scale search (awq.search_parts)."""
        return self.pieces(x, awq.search_parts(self.samples if x.dim() == 3 else len(x)))

    def search_layer(self, fw, i: int) -> None:
        captured, g = self.captured, self.group
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

        def tree(pieces, value) -> list:
            t = Tree()
            for u, sl in pieces:
                t.add(u, value(sl))
            return t.blocks()

        searched = []  # (linears, run, their scaled input, the float block's output by piece)
        for gi, group in enumerate(fw.scale_groups(i)):
            x = captured[group.linears[0]]
            weights = [fw.linear_weight(hf).clone() for hf in group.linears]
            floats = frozenset(j for j, hf in enumerate(group.linears) if hf not in self.names)
            whole = self.pieces(x, [(0, self.samples if x.dim() == 3 else len(x))])[0]
            x_mean = self.send(fw, "awq x", (i, gi), {
                "sums": tree(whole, lambda sl: x[sl].abs().reshape(-1, x.shape[-1]).sum(0)),
                "rows": x.reshape(-1, x.shape[-1]).shape[0]})
            w_mean = awq.weight_mean(weights, g, floats)
            run = block(group.linears, group.inspect)
            if group.inspect is None and 0 not in floats:
                # a linear compared alone: its output error is a quadratic form in X^T X, so the
                # method judges every candidate on every token from the Gram matrix (no pruning)
                reply = self.send(fw, "awq search", (i, gi, 0), {"gram": tree(whole, lambda sl: gram_sum(x[sl]))})
                references = GRAM
            else:
                parts = self.search_pieces(x)
                references = {sl.start: run(weights, x[sl]) for part in parts for _, sl in part}  # by piece
                candidates = list(range(len(awq.GRID)))
                for p, part in enumerate(parts):
                    errors = {}
                    for c in candidates:
                        trial = awq.trial(weights, awq._scales(x_mean, w_mean, *awq.GRID[c]), g, floats)

                        def error(sl, trial=trial) -> float:
                            e = float((references[sl.start] - run(trial, x[sl])).double().pow(2).sum())
                            return e if math.isfinite(e) else math.inf
                        errors[c] = tree(part, error)
                    for hf, w in zip(group.linears, weights):  # the float weights, for the method to read
                        fw.set_linear_weight(hf, w)
                    reply = self.send(fw, "awq search", (i, gi, p), {"parts": len(parts), "errors": errors})
                    if "best" in reply:
                        break
                    candidates = reply["next"]
            s = awq._scales(x_mean, w_mean, *awq.GRID[reply["best"]])
            if not self.shared:  # (in one process the method has done it to this forward)
                for hf, w in zip(group.linears, weights):
                    fw.set_linear_weight(hf, w * s)
                fold(fw, group, s)
            scaled: dict[int, torch.Tensor] = {}  # each linear's own inputs (an expert's: its tokens), scaled once
            for hf in group.linears:
                t = captured[hf]
                if id(t) not in scaled:
                    scaled[id(t)] = t / s
                captured[hf] = scaled[id(t)]
            searched.append((group.linears, run, captured[group.linears[0]], references))
        if self.clip:
            self.clip_layer(fw, i, searched, block, tree)

    def clip_layer(self, fw, i: int, searched: list, block, tree) -> None:
        """The clipping search's errors for every linear but the ones AWQ leaves unclipped, then,
        per block the scale search inspected (or linear alone), the error of the block with its
        linears clipped, both weights quantized, against the float block, over every calibration
        token; the method decides (AWQObserver.keep)."""
        g, captured = self.group, self.captured
        layer = [hf for hf in self.names if hf.startswith(fw.family.layer_prefix(i))]
        candidates = {}
        for hf in sorted(layer):
            if hf.rsplit(".", 1)[-1] in fw.family.awq_no_clip:
                continue
            w, x = fw.linear_weight(hf), captured[hf]
            if x.dim() == 3:  # each piece's tokens among every sample's (clip_rows' stride is global)
                T = x.shape[1]
                pieces = [(u, awq.clip_rows(x[sl], _first_sample(self.units, sl) * T, self.samples * T))
                          for u, sl in self.pieces(x, [(0, self.samples)])[0]]
            else:
                pieces = [(0, awq.clip_rows(x))]
            t = Tree()
            for u, rows in pieces:
                t.add(u, awq.clip_errors(w, rows, g))
            sums, tokens = t.blocks(), sum(len(rows) for _, rows in pieces)
            best_max = self.send(fw, "awq clip", (i, hf), {"sums": sums, "tokens": tokens})
            candidates[hf] = awq.apply_clip(w, best_max, g)
        grouped = {hf for linears, *_ in searched for hf in linears}
        alone = [([hf], block([hf], None), captured[hf], None) for hf in candidates if hf not in grouped]
        for k, (linears, run, x, references) in enumerate(searched + alone):
            if not any(hf in candidates for hf in linears):
                continue
            if references is GRAM:  # the method judges it from the Gram matrix it holds
                self.send(fw, "awq keep", (i, k), {"gram": True})
                continue
            floats = [fw.linear_weight(hf) for hf in linears]
            pieces = [piece for part in self.search_pieces(x) for piece in part]  # a unit may come in two
            if references is None:
                references = {sl.start: run(floats, x[sl]) for _, sl in pieces}

            def error(weights, sl, run=run, x=x, references=references) -> float:
                return float((run(weights, x[sl]) - references[sl.start]).double().pow(2).sum())

            def rounded(hf, w):  # what the checkpoint holds: a float linear (a router) as it is
                return awq.pseudo_quantize(w, g)[0] if hf in self.names else w
            clip = [rounded(hf, candidates.get(hf, w)) for hf, w in zip(linears, floats)]
            plain = [rounded(hf, w) for hf, w in zip(linears, floats)]
            self.send(fw, "awq keep", (i, k), {
                "clip": tree(pieces, lambda sl: error(clip, sl)),
                "plain": tree(pieces, lambda sl: error(plain, sl)) if len(searched) <= k else None})
            for hf, w in zip(linears, floats):  # the float weights back: the method rounds them
                fw.set_linear_weight(hf, w)


GRAM = "gram"  # a searched group's references: none, the method holds its input's Gram matrix


def _first_sample(units: list[tuple[int, slice]], sl: slice) -> int:
    """The number, among all the samples, of x's sample sl.start."""
    for u, part in units:
        if part.start <= sl.start < part.stop:
            return u * UNIT + sl.start - part.start
    return sl.start


class AWQObserver:
    """AWQ's method: from the statistics of every sample, the scale of each group (folded into
    the operation before it and into its linears), each linear's clipping, whether it is kept,
    then each linear quantized and written (quant/awq.py holds the maths)."""

    all_samples = True
    feeds = "float outputs"
    fast_products = "float32"
    part = "awq"  # parallel: the statistics part the workers run

    def __init__(self, out: CheckpointWriter):
        self.out = out
        self.plan = out.plan
        self.expert_min_tokens = out.plan.opts.expert_min_tokens  # too few routed tokens: every token for the searches
        self.all_tokens: dict[int, list[dict]] = {}  # by layer: experts searched on every token
        self.layer = self._fresh()  # this layer's decisions: groups, scales, search errors, clipping

    def part_args(self, samples: int) -> dict:
        """What the workers' statistics part is made with (`samples`: all of them)."""
        o = self.plan.opts
        return {"names": sorted(self.plan.linears), "group": o.group_size, "clip": o.clip, "samples": samples,
                "expert_min_tokens": self.expert_min_tokens}

    def observer(self, samples: int) -> Observer:
        """The statistics part wired to this method in the same process."""
        return AWQStatistics(send=lambda fw, kind, key, p: self.handle(fw, kind, key, [p]), shared=True,
                             **self.part_args(samples))

    def handle(self, fw, kind: str, key, payloads: list):
        if kind == "awq x":
            rows = sum(p["rows"] for p in payloads)
            self.layer["x_mean"] = total([p["sums"] for p in payloads]) / rows
            return self.layer["x_mean"]
        if kind == "awq search":
            return self.search(fw, key, payloads)
        if kind == "awq clip":
            i, hf = key
            errors = total([p["sums"] for p in payloads]) / max(1, sum(p["tokens"] for p in payloads))
            best_max = awq.choose_clip(fw.linear_weight(hf), errors, self.plan.opts.group_size)
            self.layer["clip"][hf] = awq.apply_clip(fw.linear_weight(hf), best_max, self.plan.opts.group_size)
            return best_max
        if kind == "awq keep":
            return self.keep(fw, key, payloads)
        self.end(fw, key)
        return False

    def search(self, fw, key, payloads: list) -> dict:
        """The candidates' errors on a part of the samples: after the first of two parts the
        PRUNE_KEEP best go on to the second; then the winner, applied to this forward."""
        i, gi, p = key
        L = self.layer
        if L["groups"] is None:
            L["groups"] = fw.scale_groups(i)
        group = L["groups"][gi]
        H = None
        if "gram" not in payloads[0]:
            errors = {c: total([q["errors"][c] for q in payloads]) for c in payloads[0]["errors"]}
            if p == 0 and payloads[0]["parts"] == 2:
                L["errors"] = errors
                return {"next": sorted(errors, key=lambda c: (errors[c], c))[:awq.PRUNE_KEEP]}
            if p == 1:
                errors = {c: L["errors"][c] + e for c, e in errors.items()}
        weights = [fw.linear_weight(hf) for hf in group.linears]
        floats = frozenset(j for j, hf in enumerate(group.linears) if hf not in self.plan.linears)
        w_mean = awq.weight_mean(weights, self.plan.opts.group_size, floats)
        if "gram" in payloads[0]:
            H = total([q["gram"] for q in payloads])
            H = H.full() if isinstance(H, Bands) else H
            errors = awq.gram_scale_errors(weights[0], H, L["x_mean"], w_mean, self.plan.opts.group_size)
        best = min(errors, key=lambda c: (errors[c], c))
        if not math.isfinite(errors[best]):
            names = ", ".join(self.name_of(hf) for hf in group.linears)
            raise InputError(f"{self.plan.model.ckpt.path}: AWQ scale search for {names}: the block's output is not "
                             "finite for any scaling")
        s = awq._scales(L["x_mean"], w_mean, *awq.GRID[best])
        for hf, w in zip(group.linears, weights):
            fw.set_linear_weight(hf, w * s)
        L["modified"] |= fold(fw, group, s) | {group.linears[j] + ".weight" for j in floats}
        entry = {"linears": [self.name_of(hf) for hf in group.linears],
                 "ratio": awq.GRID[best][0] if awq.GRID[best][1] else None}
        self.out.layers.setdefault(i, []).append(entry)
        # the scaled linear's input is x / s: its Gram matrix, for the clipping check
        L["searched"].append((group.linears, errors[best], entry, None if H is None else H / s[:, None] / s))
        return {"best": best}

    def keep(self, fw, key, payloads: list) -> bool:  # noqa: ARG002
        """Clipping kept where it lowers the block's error over every calibration token (both
        weights quantized, against the float block). On Qwen2.5-0.5B two blocks of 72 (the MLPs
        of layers 2 and 3, where its massive activations arise) come out 20% worse clipped, and
        clipping them costs the whole model 5% in KL divergence; elsewhere clipping helps. A
        group's unclipped error is its scale search's winning one (the same products, up to
        rounding: x/s against Q(W s) there, x against Q(W s)/s here). A linear compared alone is
        judged from its scaled input's Gram matrix, both errors from it."""
        i, k = key
        L = self.layer
        grouped = {hf for linears, *_ in L["searched"] for hf in linears}
        alone = [([hf], None, None, None) for hf in L["clip"] if hf not in grouped]
        linears, plain, entry, H = (L["searched"] + alone)[k]
        if H is not None:
            g = self.plan.opts.group_size
            w = fw.linear_weight(linears[0])
            clip = awq.gram_error(awq.pseudo_quantize(L["clip"].get(linears[0], w), g)[0] - w, H)
            plain = awq.gram_error(awq.pseudo_quantize(w, g)[0] - w, H)
        else:
            clip = total([p["clip"] for p in payloads])
        if plain is None:
            plain = total([p["plain"] for p in payloads])
            entry = {"linears": [self.name_of(hf) for hf in linears]}
            self.out.layers.setdefault(i, []).append(entry)
        keep = clip < plain
        if keep:
            L["kept"].update({hf: L["clip"][hf] for hf in linears if hf in L["clip"]})
        entry["clip"] = bool(keep)
        entry["clip_error"] = round(clip / plain, 4) if plain > 0 else 1.0
        return bool(keep)

    def end(self, fw, i: int) -> None:
        """Every linear of the layer quantized and written, with the weights the scales changed."""
        plan, L, g = self.plan, self.layer, self.plan.opts.group_size
        for hf in [hf for hf in plan.linears if plan.linears[hf].layer == i]:
            r = awq.quantize(L["kept"].get(hf, fw.linear_weight(hf)), g)
            self.out.add_linear(plan.linears[hf], r.q.numpy(), r.scales.numpy(), r.zeros.numpy(), None)
        for name in L["modified"]:
            out = plan.names.get(name, name)
            self.out.add(out, to_f16(out, _Array(fw.w(name))))
        self.layer = self._fresh()
        few = few_token_experts(fw)
        if few:
            self.all_tokens[i] = few
        self.out.flush(i)

    @staticmethod
    def _fresh() -> dict:
        return {"groups": None, "x_mean": None, "modified": set(), "errors": {}, "clip": {}, "kept": {},
                "searched": []}

    def name_of(self, hf: str) -> str:
        """A linear's name in the checkpoint written (a float one's too: a mixture's router)."""
        lin = self.plan.linears.get(hf)
        return lin.name if lin is not None else self.plan.names.get(hf + ".weight", hf + ".weight")[:-len(".weight")]

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
