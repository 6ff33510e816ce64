"""Every byte of every output, for the tiny models of every family, equals what was recorded in
formats/outputs/golden.json (formats/outputs/make_golden.py): a change to the house, not the
maths, keeps them all. Uncalibrated GGUF outputs are compared wherever the tiny models come out
as recorded; calibrated ones (torch's float arithmetic) where torch and the CPU kind are also
the recorded ones."""
from __future__ import annotations

import json

import pytest

from tests.golden_outputs import GOLDEN, RUNS, environment, run, tree_hash
from qconvert.quant import blocks
from tests.models import build

DATA = json.loads(GOLDEN.read_text())
pytestmark = pytest.mark.skipif(blocks.PURE_PYTHON, reason="the same bytes as the C pass; too slow in numpy")


@pytest.mark.parametrize("family", sorted(DATA["families"]))
def test_outputs_are_byte_identical_to_the_recorded_ones(family, tmp_path):
    golden = DATA["families"][family]
    model = build(family, tmp_path / "models" / f"tiny-{family}")
    if tree_hash(model) != golden["input"]:
        pytest.skip("this environment builds another tiny model (transformers or tokenizers differ from the "
                    "recording's); rerun formats/outputs/make_golden.py where the recording was made")
    same_env = environment() == DATA["environment"]
    compared = 0
    for name, args, calibrated in RUNS:
        if calibrated and not same_env:
            continue
        got = run(model, name, args, tmp_path / "out" / name)
        assert got == golden["runs"][name]["outputs"], f"{family} {name}: outputs differ from the recorded bytes"
        compared += 1
    assert compared >= 1
