"""`--method gptq` for the GGUF mixtures: the layer loop of GPTQ (every sample through a layer
together, each linear quantized just before it runs, from the Hessian of its actual input, its
dequantized weight used by the rest of the layer, the quantized layer's output feeding the next),
with each linear rounded by quant/feedback.py in the type the output's recipe gives its GGUF
tensor. The blocks go to a spill file beside the output (unlinked: it disappears with the
process), from which the GGUF stream writes them in their place.

A linear's GGUF tensor is its weight with the rows perhaps reordered (llama's rope permutation of
q and k, GPT-NeoX's regrouped qkv) or transposed back (GPT-2's Conv1D): row_order() finds the
order by running the family's own transform over row and column numbers, and a tensor whose
transform is anything else keeps the stream's importance-weighted rounding. Types without a
per-weight grid (the lattice i-quants, ternary, float types) are written as the stream would
write them (the weight rounded with the same importance weights), here, so that the layer runs
on what the file holds.
"""
from __future__ import annotations

from pathlib import Path
from tempfile import TemporaryFile

import numpy as np
import torch

from qconvert.calibrate.gptq import GPTQObserver, finite_weight
from qconvert.errors import InputError
from qconvert.plan import OutputPlan, Plan
from qconvert.quant import feedback
from qconvert.quant.blocks import Blocks
from qconvert.read.imatrix import Imatrix
from qconvert.writers.atomic import output_error


class Spill:
    """Quantized tensors by GGUF name, on disk until the stream writes them."""

    def __init__(self, directory: Path):
        self.directory = directory
        try:
            self.file = TemporaryFile(dir=directory, prefix=".qconvert-spill-")
        except OSError as e:
            raise output_error(directory, e) from None
        self.where: dict[str, tuple[int, int]] = {}

    def put(self, name: str, data: np.ndarray) -> None:
        """Append a tensor's blocks; a full disk or any write error is the output's error."""
        data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        try:
            self.file.seek(0, 2)
            self.where[name] = (self.file.tell(), data.size)
            self.file.write(memoryview(data))
            self.file.flush()
        except OSError as e:
            raise output_error(self.directory, e) from None

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> np.ndarray:
        at, size = self.where[name]
        self.file.seek(at)
        data = np.frombuffer(self.file.read(size), dtype=np.uint8)
        if data.size != size:
            raise InputError(f"{self.file.name}: the spill file of quantized tensors was cut short")
        return data

    def close(self) -> None:
        self.file.close()


def row_order(plan: Plan, i: int, transposed: bool) -> torch.Tensor | None:
    """The GGUF tensor i's rows as rows of its linear's weight [N, K] (GGUF row r is weight row
    order[r]), or None when its transform is not a reordering of whole rows."""
    t = plan.tensors[i]
    if t.source is None or t.parts or t.rows is not None or len(t.shape) != 2:
        return None
    N, K = t.shape
    if t.transform is None:
        return torch.arange(N)
    if N >= 1 << 24 or K >= 1 << 24:  # the numbers must be exact in float32
        return None
    rows = np.broadcast_to(np.arange(N, dtype=np.float32)[:, None], (N, K))
    cols = np.broadcast_to(np.arange(K, dtype=np.float32)[None, :], (N, K))
    stored = (lambda a: np.ascontiguousarray(a.T)) if transposed else np.ascontiguousarray
    stored_rows = stored(rows)
    if tuple(t.source.shape) != stored_rows.shape:
        return None
    try:
        r = np.asarray(t.transform(stored_rows, t.source.dtype), dtype=np.float32).reshape(N, K)
        c = np.asarray(t.transform(stored(cols), t.source.dtype), dtype=np.float32).reshape(N, K)
    except Exception:  # noqa: BLE001 - a transform that needs real data: not a reordering
        return None
    order = r[:, 0]
    if not (r == order[:, None]).all() or not (c == np.arange(K, dtype=np.float32)[None, :]).all():
        return None
    if not np.array_equal(np.sort(order), np.arange(N, dtype=np.float32)):
        return None
    return torch.from_numpy(order.astype(np.int64))


class FeedbackObserver(GPTQObserver):
    """The method's side of the layer loop (GPTQStatistics sends each linear's statistics): the
    linear's GGUF tensor quantized for one output, its blocks spilled, its dequantized weight
    returned."""

    def __init__(self, plan: Plan, output: OutputPlan, damp: float, act_order: bool, threads: int):
        self.plan, self.output = plan, output
        self.damp, self.act_order, self.threads = damp, act_order, threads
        self.expert_min_tokens = None
        self.input = None
        family = plan.family
        self.tensors: dict[str, tuple[int, torch.Tensor]] = {}  # hf linear -> (plan tensor, row order)
        self.kept: list[str] = []  # linears whose GGUF tensor is not a reordering of the weight's rows
        for i, t in enumerate(plan.tensors):
            if not (t.name.startswith("blk.") and t.name.endswith(".weight") and t.source is not None
                    and t.source.name.endswith(".weight") and len(t.shape) == 2 and not t.force_f32):
                continue
            hf = t.source.name[:-len(".weight")]
            order = row_order(plan, i, family.transposed(t.source.name))
            if order is None:
                self.kept.append(t.name)
            else:
                self.tensors[hf] = (i, order)
        self.spill = Spill(output.path.parent)
        self.layers: dict[int, list[dict]] = {}
        self.means: dict[str, np.ndarray] = {}  # GGUF name -> the importance weights its scales were searched with

    def imatrix(self, samples) -> Imatrix:
        """The importance weights the pass used, as the file's matrix."""
        n, T = samples.tokens.shape
        return Imatrix(Path("qconvert:calibration"), dict(self.means), [samples.dataset], n, T)

    def part_args(self, samples: int) -> dict:  # noqa: ARG002 - every method's signature
        return {"names": sorted(self.tensors), "expert_min_tokens": None, "gram": True}

    def quantize(self, fw, hf: str, H: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        i, order = self.tensors[hf]
        t, ty = self.plan.tensors[i], self.output.types[i]
        weights = self.output.weights[i] if self.output.weights is not None else None
        if weights is None:  # each column's mean square input (llama-imatrix's statistic, here on these inputs)
            weights = (torch.diag(H) / 2).numpy()
        self.means[t.name] = weights
        Wg = finite_weight(fw, hf, self.plan.ckpt.path, t.hf_name)[order]
        N, K = Wg.shape
        entry = {"name": t.name, "type": ty.name}
        if feedback.supports(ty):
            r = feedback.quantize(Wg, H, ty, weights, self.damp, self.act_order, self.threads)
            data, deq = r.data, r.weight
            entry.update(error=r.error, rtn_error=r.rtn_error, damp=r.damp)
        else:  # no per-weight grid: the stream's rounding, here so that the layer runs on it
            rows = np.ascontiguousarray(Wg.numpy())
            data = ty.quantize(rows, self.threads, weights if issubclass(ty, Blocks) else None)
            deq = torch.from_numpy(np.asarray(ty.dequantize(data, (N, K), self.threads), dtype=np.float32))
            entry["rounding"] = "nearest"
        self.spill.put(t.name, data)
        self.layers.setdefault(int(t.name.split(".")[1]), []).append(entry)
        out = torch.empty_like(deq)
        out[order] = deq
        return out

    def end(self, fw, i: int) -> None:  # noqa: ARG002
        self.input = None

    def report(self) -> list[dict]:
        out = []
        for i, es in sorted(self.layers.items()):
            fed = [e for e in es if "error" in e]
            out.append({"layer": i, **({"error": sum(e["error"] for e in fed),
                                        "rtn_error": sum(e["rtn_error"] for e in fed)} if fed else {}),
                        "tensors": es})
        return out
