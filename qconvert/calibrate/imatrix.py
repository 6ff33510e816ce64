"""The importance matrix: for every linear layer, the sum over calibration tokens of each input
column's square, and the token count (llama-imatrix's in_sum2 and counts), collected while the
model runs one decoder layer at a time from the memory-mapped checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as GT
from gguf import GGUFValueType as VT
from gguf.gguf_writer import GGUFValue

from qconvert.arch.base import EXPERT, merged_expert
from qconvert.calibrate.driver import Observer, run_layers, unit_parts
from qconvert.calibrate.text import Calibration
from qconvert.read.imatrix import Imatrix
from qconvert.writers.gguf import GGUFWriter, TensorInfo

ROWS = 256  # rows squared and summed at a time: the block stays in cache


class Collector(Observer):
    """Sums of squares per input column and token counts, by GGUF weight name; an observer of
    the layer loop. Linears that share an input (q, k, v; gate, up) get the sums computed once.
    Each calibration unit's sums are summed in the units' tree (parallel.Tree); at a layer's end
    its tensors' blocks go to `send` ("end", layer, {name: (blocks, counts)}), which in the same
    process is this collector's own reduce (a worker's goes to the driver's collector)."""

    def __init__(self, family, send=None):
        self.family = family
        # GGUF name -> sums [columns], or [experts, columns] for a stacked *_exps tensor, whose
        # counts are per expert (llama-imatrix's MUL_MAT_ID statistics: each expert's sums over
        # the tokens routed to it)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.trees: dict[str, object] = {}  # this layer's: name -> the units' tree of sums
        self.tree_counts: dict[str, np.ndarray] = {}
        self.send = send or (lambda fw, kind, key, payload: self.handle(fw, kind, key, [payload]))
        self.where: dict | None = None  # where the samples ran, when over workers (collect)

    def linear_input(self, fw, hf: str, x: torch.Tensor) -> None:
        from qconvert.calibrate.parallel import Tree
        expert = None
        if self.family.n_experts and (m := EXPERT.match(hf + ".weight")):
            hf, expert = merged_expert(m), int(m["expert"])
        name = self.family.map_name(hf + ".weight")
        if not name.startswith("blk.") or self.family.joined_from_gguf(hf + ".weight") is not None:
            return  # llama-imatrix's default: decoder blocks only; a matrix the file holds split, not at all
        flat = x.reshape(-1, x.shape[-1])
        s = fw.per_input("imatrix", x, lambda: square_sums(flat))
        n_mat = 1 if expert is None else self.family.n_experts
        if name not in self.trees:
            self.trees[name] = Tree()
            self.tree_counts[name] = np.zeros(n_mat, dtype=np.int64)
        unit = unit_parts(fw, x)[0][0]  # a batch holds one unit's samples (the loop's batches for this observer)
        value = self.trees[name].at(unit, lambda: torch.zeros((n_mat, flat.shape[1]), dtype=torch.float64))
        value[expert or 0] += s
        self.tree_counts[name][expert or 0] += flat.shape[0]

    def stacked_input(self, fw, hf: str, x: torch.Tensor) -> None:
        """The input of a 3-D tensor of the GGUF file that is no linear of the checkpoint, one
        matrix per head (DeepSeek's attn_k_b and attn_v_b): x [matrices, samples, tokens, in],
        each matrix's sums over every token, one count (llama-imatrix's statistics of a dense 3-D
        MUL_MAT)."""
        from qconvert.calibrate.parallel import Tree
        name = self.family.map_name(hf + ".weight")
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        if name not in self.trees:
            self.trees[name] = Tree()
            self.tree_counts[name] = np.zeros(1, dtype=np.int64)
        unit = unit_parts(fw, x[0])[0][0]
        value = self.trees[name].at(unit, lambda: torch.zeros((flat.shape[0], flat.shape[2]), dtype=torch.float64))
        for m in range(flat.shape[0]):
            value[m] += square_sums(flat[m])
        self.tree_counts[name][0] += flat.shape[1]

    def end_layer(self, fw, i: int) -> bool:
        payload = {name: (tree.blocks(), self.tree_counts[name]) for name, tree in self.trees.items()}
        self.trees, self.tree_counts = {}, {}
        self.send(fw, "end", i, payload)
        return False

    def handle(self, fw, kind: str, key, payloads: list[dict]) -> None:  # noqa: ARG002
        """Every worker's blocks of the layer's sums, summed in the tree; the counts added."""
        from qconvert.calibrate.parallel import total
        for name in sorted({n for p in payloads for n in p}):
            shares = [p[name] for p in payloads if name in p]
            self.sums[name] = total([blocks for blocks, _ in shares])
            self.counts[name] = np.sum([c for _, c in shares], axis=0)

    def unreached(self) -> list[tuple[str, int]]:
        """(tensor, expert) for every expert no calibration token was routed to."""
        return [(n, int(e)) for n in sorted(self.counts) if len(self.counts[n]) > 1
                for e in np.flatnonzero(self.counts[n] == 0)]

    def to_imatrix(self, path: Path, dataset: str, chunk_count: int, chunk_size: int) -> Imatrix:
        """Means of the squares, as llama-quantize's load_imatrix makes them from the file: an
        expert no token reached gets 1 for every column."""
        entries = {}
        for n in sorted(self.sums):
            c = torch.from_numpy(self.counts[n]).to(torch.float64)[:, None]
            mean = torch.where(c > 0, self.sums[n] / c.clamp_min(1), torch.ones_like(self.sums[n]))
            entries[n] = mean.float().numpy().reshape(-1)
        return Imatrix(path, entries, [dataset], chunk_count, chunk_size)


def square_sums(flat: torch.Tensor) -> torch.Tensor:
    """Sum over rows of flat [rows, cols] squared: float32 within a block of ROWS rows, float64
    across blocks (a sixth of the time of summing all in float64, a temporary float64 copy of
    the input, with 256-term float32 sums)."""
    s = torch.zeros(flat.shape[1], dtype=torch.float64)
    for i in range(0, flat.shape[0], ROWS):
        rows = flat[i:i + ROWS]
        s += (rows * rows).sum(0)
    return s


def collect(family, calib: Calibration, threads: int, progress: Callable[[int, int], None] | None = None,
            path: Path = Path("(in memory)"), int8: bool = True, spread=None) -> tuple[Imatrix, Collector]:
    """Run the calibration samples through the model layer by layer; returns the imatrix.
    `int8`: the forward's linear layers run as int8 products (Forward.int8_linear), about 1.5x
    the speed of the whole calibration on CPUs with int8 dot products (the callers ask for it
    only there: driver.native_int8); the statistics move by about 1%, as they would computed from
    a Q8_0 model. `spread`: (model, revision, parallel.Parallel) to run the samples over workers
    (the same sums); the collector's `where` says where it ran."""
    torch.set_num_threads(max(1, threads))
    rec = Collector(family)
    products = "int8" if int8 else "float32"
    if spread is not None:
        from qconvert.calibrate import parallel
        model, revision, how = spread
        rec.where = parallel.run(model, revision, calib.tokens, rec.handle, "imatrix", {}, products, how, threads,
                                 progress)
    else:
        fw = family.forward()
        fw.use_products(products)
        run_layers(fw, torch.from_numpy(calib.tokens), (rec,), progress)
    n, T = calib.tokens.shape
    return rec.to_imatrix(path, calib.dataset, n, T), rec


def write_imatrix(path: Path, rec: Collector, datasets: list[str], chunk_count: int, chunk_size: int,
                  force: bool = False) -> tuple[int, str]:
    """A GGUF imatrix file as llama-imatrix writes it; llama-quantize --imatrix accepts it."""
    kv = {
        "general.type": GGUFValue("imatrix", VT.STRING),
        "imatrix.datasets": GGUFValue(list(datasets), VT.ARRAY, VT.STRING),
        "imatrix.chunk_count": GGUFValue(chunk_count, VT.UINT32),
        "imatrix.chunk_size": GGUFValue(chunk_size, VT.UINT32),
    }
    infos, data = [], []
    for name in sorted(rec.sums):
        s = rec.sums[name].float().numpy()  # [experts or 1, columns]
        c = rec.counts[name].astype(np.float32).reshape(-1, 1)
        infos += [TensorInfo(f"{name}.in_sum2", s.shape, int(GT.F32), s.nbytes),
                  TensorInfo(f"{name}.counts", c.shape, int(GT.F32), c.nbytes)]
        data += [s, c]
    w = GGUFWriter(path, kv, infos, force=force)
    w.open()
    try:
        for info, arr in zip(infos, data):
            w.begin_tensor(info.name)
            w.write(arr)
            w.end_tensor()
        return w.finish()
    except BaseException:
        w.abort()
        raise
