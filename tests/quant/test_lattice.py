"""The i-quant lattices: the C kernels' neighbour maps equal the numpy reference's, and the
grids come out of the gguf package's tables whole (every value one of the type's levels)."""
from __future__ import annotations

import numpy as np
import pytest

from qconvert import _kernels
from qconvert.quant.reference import lattice


@pytest.mark.parametrize("name", sorted(lattice.SPECS))
def test_c_lattice_is_reference(name):
    spec = lattice.SPECS[name]
    lv = lattice.levels(name)
    assert lv.shape == (spec.size, spec.dim) and lv.max() < (1 << spec.bits)
    assert len({bytes(r) for r in lv}) == spec.size  # distinct points
    kmap, neighbours = _kernels.lattice(name, lv.tobytes())
    ref_map, ref_neighbours = lattice.tables(name)
    assert np.array_equal(np.frombuffer(kmap, np.int32), ref_map)
    assert np.array_equal(np.frombuffer(neighbours, np.uint16), ref_neighbours)
    # every off-grid point has neighbours, and they are grid points
    off = ref_map[ref_map < 0]
    counts = ref_neighbours[-off - 1]
    assert counts.min() >= 1 and ref_neighbours.max() < spec.size


def test_lattice_refuses_wrong_levels():
    with pytest.raises(ValueError, match="levels expected"):
        _kernels.lattice("IQ3_S", b"\0" * 10)
    with pytest.raises(ValueError, match="unknown lattice"):
        _kernels.lattice("IQ9", b"")
