"""The lattices the i-quants search: grid points and the neighbour map of every point off the grid.

Oracle: ggml's iq2xs_init_impl (IQ2_XXS 256 points, IQ2_XS 512, IQ2_S 1024, IQ1_S/IQ1_M 2048;
eight coordinates of 2-bit levels) and iq3xs_init_impl (IQ3_XXS 256, IQ3_S 512; four coordinates
of 3-bit levels), ggml/src/ggml-quants.c. A point's coordinates are 2l+1 for its levels l; its
index in the map is sum l_k << (bits * k). The grids are the gguf package's dequantization
tables (`gguf.quants.IQ2_XXS.grid` ...), whose values are the levels' images, in ggml's order,
so a level is a value's position in the table's `grid_map`. For each index not on the grid,
ggml sorts the grid by (squared distance, grid index) and keeps the points at its `nwant`
smallest distinct distances; the map holds the grid index of a point on the grid and
-(1 + offset) of a neighbour list (count, then indexes) otherwise. kmap_size is 43692 for the
eight-coordinate grids (not 4^8: ggml sizes it for levels up to 2) and 4096 for the others.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np


class Spec(NamedTuple):
    source: str  # the gguf.quants class holding the grid
    size: int
    dim: int
    bits: int
    map_size: int
    nwant: int


SPECS = {
    "IQ2_XXS": Spec("IQ2_XXS", 256, 8, 2, 43692, 2),
    "IQ2_XS": Spec("IQ2_XS", 512, 8, 2, 43692, 2),
    "IQ2_S": Spec("IQ2_S", 1024, 8, 2, 43692, 1),
    "IQ1": Spec("IQ1_S", 2048, 8, 2, 43692, 3),
    "IQ3_XXS": Spec("IQ3_XXS", 256, 4, 3, 4096, 2),
    "IQ3_S": Spec("IQ3_S", 512, 4, 3, 4096, 3),
}


@functools.cache
def levels(name: str) -> np.ndarray:
    """uint8 [size, dim]: each grid point's level per coordinate."""
    import gguf.quants

    spec = SPECS[name]
    table = getattr(gguf.quants, spec.source)
    table.init_grid()
    values = np.asarray(table.grid, dtype=np.float32).reshape(spec.size, spec.dim)
    grid_map = np.asarray(table.grid_map, dtype=np.float32)
    out = np.searchsorted(grid_map, values).astype(np.uint8)
    assert np.array_equal(grid_map[out], values), name
    return out


def grid(name: str) -> np.ndarray:
    """int8 [size, dim]: the coordinates 2l+1 ggml searches with."""
    return (2 * levels(name).astype(np.int8) + 1).astype(np.int8)


def _index(spec: Spec, lv: np.ndarray) -> np.ndarray:
    return (lv.astype(np.int64) << (spec.bits * np.arange(spec.dim))).sum(axis=-1)


@functools.cache
def tables(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(map int32 [map_size], neighbours uint16) exactly as ggml lays them out."""
    spec = SPECS[name]
    g = grid(name).astype(np.int32)
    kmap = np.full(spec.map_size, -1, dtype=np.int64)
    kmap[_index(spec, levels(name))] = np.arange(spec.size)
    off = np.flatnonzero(kmap < 0)
    mask = (1 << spec.bits) - 1
    pieces: list[np.ndarray] = []
    offset = 0
    for lo in range(0, off.size, 2048):
        idx = off[lo:lo + 2048]
        pos = 2 * ((idx[:, None] >> (spec.bits * np.arange(spec.dim))) & mask) + 1
        d2 = ((g[None, :, :] - pos[:, None, :]) ** 2).sum(axis=2)
        order = np.argsort(d2, axis=1, kind="stable")  # by distance, then grid index
        ds = np.take_along_axis(d2, order, axis=1)
        rank = np.concatenate([np.zeros((len(idx), 1), np.int64), np.cumsum(np.diff(ds, axis=1) > 0, axis=1)],
                              axis=1)  # which distinct distance each sorted entry is at
        for r, i in enumerate(idx):
            keep = order[r][rank[r] < spec.nwant]
            kmap[i] = -(offset + 1)
            pieces.append(np.concatenate([[keep.size], keep]))
            offset += keep.size + 1
    return kmap.astype(np.int32), np.concatenate(pieces).astype(np.uint16)
