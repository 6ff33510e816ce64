"""Our layer-by-layer forward against transformers' on tiny random models of every family."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qconvert.arch import family_for
from qconvert.read.checkpoint import open_checkpoint
from tests.models import FAMILIES


@pytest.mark.parametrize("family", FAMILIES + ["llama-wide"])
def test_logits_equal_transformers(family, tiny):
    import transformers

    d = tiny(family)
    ids = torch.tensor([list(range(1, 40)), list(range(7, 46))])  # longer than gemma3's window of 16
    ckpt = open_checkpoint(str(d))
    ours = family_for(ckpt).forward().logits(ids)
    ckpt.close()
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        expect = ref(ids).logits
    assert torch.allclose(ours, expect, rtol=1e-4, atol=1e-4 * float(expect.abs().max()))


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "gpt_neox", "gpt2"])
def test_imatrix_equals_transformers_linear_inputs(family, tiny):
    """The collected statistics equal the mean squared inputs of transformers' own Linear layers."""
    import transformers

    from qconvert.calibrate import imatrix
    from qconvert.calibrate.text import Calibration

    d = tiny(family)
    tokens = np.random.default_rng(0).integers(1, 200, size=(6, 24)).astype(np.int64)
    ckpt = open_checkpoint(str(d))
    fam = family_for(ckpt)
    im, _ = imatrix.collect(fam, Calibration(tokens, "test"), threads=2)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def f(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            seen[name] = seen.get(name, 0) + (x * x).sum(0)
        return f
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D":
            m.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        model(torch.from_numpy(tokens))
    checked = 0
    for hf_name, total in seen.items():
        gguf_name = fam.map_name(hf_name + ".weight") if hf_name != "lm_head" else "output.weight"
        if not gguf_name.startswith("blk."):
            continue
        expect = (total / tokens.size).float().numpy()
        assert np.allclose(im.entries[gguf_name], expect, rtol=1e-4, atol=1e-7), gguf_name
        checked += 1
    assert checked == len(im.entries) and checked >= 4 * fam.n_layers
    ckpt.close()
