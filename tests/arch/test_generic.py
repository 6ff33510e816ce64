"""The generic forward (transformers' own decoder-layer modules, one layer at a time) against the
hand-written ones, on the tiny models of today's six families: the same logits, the same
importance-matrix statistics, and the same GPTQ and AWQ checkpoints, within float noise."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qconvert.arch.generic import TransformersForward
from qconvert.calibrate import imatrix
from qconvert.calibrate.driver import run_layers
from qconvert.calibrate.text import Calibration
from qconvert.model import open_model
from tests.golden_outputs import tree_hash
from tests.helpers import run_cli
from tests.models import DENSE_NEW

pytestmark = pytest.mark.kernel_free  # no GGUF blocks: the C pass covers it

SIX = ["llama", "qwen2", "qwen3", "gemma3", "gpt_neox-64", "gpt2"]
IDS = torch.tensor([list(range(1, 40)), list(range(7, 46))])  # longer than gemma3's window of 16


@pytest.mark.parametrize("family", SIX + ["mistral", "llama-tied"] + DENSE_NEW)
def test_logits_equal_the_hand_written_forward(tiny, family):
    m = open_model(str(tiny(family)))
    try:
        with torch.inference_mode():
            hand = m.forward().logits(IDS)
            g = TransformersForward(m.family)
            ours = g.head(run_layers(g, IDS))
        assert float((ours - hand).abs().max()) <= 1e-5 * float(hand.abs().max())
    finally:
        m.close()


@pytest.mark.parametrize("family", SIX)
def test_importance_statistics_equal(tiny, family, monkeypatch):
    tokens = np.random.default_rng(0).integers(1, 200, size=(6, 24)).astype(np.int64)
    m = open_model(str(tiny(family)))
    try:
        hand, _ = imatrix.collect(m.family, Calibration(tokens, "t"), threads=2, int8=False)
        monkeypatch.setenv("QCONVERT_FORWARD", "transformers")
        generic, _ = imatrix.collect(m.family, Calibration(tokens, "t"), threads=2, int8=False)
    finally:
        m.close()
    assert set(hand.entries) == set(generic.entries) and len(hand.entries) >= 4 * m.family.n_layers
    for name, want in hand.entries.items():
        assert np.allclose(generic.entries[name], want, rtol=1e-4, atol=1e-7), name


def _checkpoint(src, out, method, capsys, generic, monkeypatch):
    if generic:
        monkeypatch.setenv("QCONVERT_FORWARD", "transformers")
    else:
        monkeypatch.delenv("QCONVERT_FORWARD", raising=False)
    exact = ["--exact-calib"] if method == "gptq" else []  # float32 products, as transformers' modules compute
    code, stdout, err = run_cli([src, "--to", method, "--group-size", "32", "--calib-samples", "4",
                                 "--calib-seq-len", "64", "-j", "2", "-o", out, "--json", *exact], capsys)
    assert code == 0, err
    return json.loads(stdout)["outputs"][0]


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("family", SIX)
def test_gptq_and_awq_checkpoints_equal(tiny, tmp_path, capsys, monkeypatch, family, method):
    """The same checkpoint within float noise: every linear decodes to the same weights but for
    codes that rounding ties may flip (at most 1 in 1000), and the logits agree."""
    from safetensors.numpy import load_file

    src = tiny(family)
    hand = _checkpoint(src, tmp_path / "hand", method, capsys, False, monkeypatch)
    generic = _checkpoint(src, tmp_path / "generic", method, capsys, True, monkeypatch)
    monkeypatch.delenv("QCONVERT_FORWARD", raising=False)
    if tree_hash(tmp_path / "hand") == tree_hash(tmp_path / "generic"):
        return  # the very same bytes
    a, b = load_file(tmp_path / "hand" / "model.safetensors"), load_file(tmp_path / "generic" / "model.safetensors")
    assert set(a) == set(b)
    differ = total = 0
    for k in a:
        if k.endswith(".qweight"):
            differ += int((a[k] != b[k]).sum())
            total += a[k].size
    assert differ <= total / 1000, (differ, total)
    ma, mb = open_model(hand["path"]), open_model(generic["path"])
    try:
        with torch.inference_mode():
            la, lb = ma.forward().logits(IDS), mb.forward().logits(IDS)
        assert float((la - lb).norm() / la.norm()) < 1e-2
    finally:
        ma.close()
        mb.close()
