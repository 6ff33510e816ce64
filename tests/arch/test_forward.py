"""Our layer-by-layer forward against transformers' on tiny random models of every family."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qconvert.families import family_for
from qconvert.read.checkpoint import open_checkpoint
from tests.models import FAMILIES
from tests.oracles import assert_forward_equals_transformers

pytestmark = pytest.mark.kernel_free  # no GGUF blocks: the C pass covers it


@pytest.mark.parametrize("family", FAMILIES + ["llama-wide"])
def test_logits_equal_transformers(family, tiny):
    # longer than gemma3's window of 16
    assert_forward_equals_transformers(tiny(family), [list(range(1, 40)), list(range(7, 46))])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_yarn_rope(family, tiny, tmp_path, capsys):
    """YaRN rope scaling (Qwen2.5's long-context setting): our forward, llama.cpp on our GGUF file
    and our forward on that file (its rope.scaling keys read back) all give transformers' logits."""
    import json

    from tests.helpers import convert_to, copy_model, run_cli
    from tests.oracles import hf_logits, llama_logits, rel_rms

    d = copy_model(tiny(family), tmp_path / "yarn")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(max_position_embeddings=256, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                              "original_max_position_embeddings": 32})
    (d / "config.json").write_text(json.dumps(cfg))
    ids = list(range(1, 40))
    assert_forward_equals_transformers(d, [ids])
    f32 = convert_to(d, "f32", tmp_path / "yarn.gguf").outputs[0]["path"]
    assert rel_rms(llama_logits(f32, ids), hf_logits(d, ids)) < 2e-3
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 60), encoding="utf-8")
    code, out, err = run_cli(["eval", f32, "--text", text, "--base", d, "--chunks", "2", "--ctx", "64", "--json"],
                             capsys)
    assert code == 0, err
    assert json.loads(out)["kl_divergence"] < 1e-6


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "gpt_neox", "gpt2"])
@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_imatrix_equals_transformers_linear_inputs(family, int8, tiny):
    """The collected statistics equal the mean squared inputs of transformers' own Linear layers:
    to float rounding with float32 products, within 5% per tensor with int8 products (errors grow
    with depth; 1-2% on tiny random models, about 1% on Qwen2.5-0.5B)."""
    import transformers

    from qconvert.calibrate import imatrix
    from qconvert.calibrate.text import Calibration

    d = tiny(family)
    tokens = np.random.default_rng(0).integers(1, 200, size=(6, 24)).astype(np.int64)
    ckpt = open_checkpoint(str(d))
    fam = family_for(ckpt)
    im, _ = imatrix.collect(fam, Calibration(tokens, "test"), threads=2, int8=int8)
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
    checked = differs = 0
    for hf_name, total in seen.items():
        gguf_name = fam.map_name(hf_name + ".weight") if hf_name != "lm_head" else "output.weight"
        if not gguf_name.startswith("blk."):
            continue
        expect = (total / tokens.size).float().numpy()
        got = im.entries[gguf_name]
        if int8:
            assert np.linalg.norm(got - expect) < 0.05 * np.linalg.norm(expect), gguf_name
            differs += not np.allclose(got, expect, rtol=1e-4, atol=1e-7)
        else:
            assert np.allclose(got, expect, rtol=1e-4, atol=1e-7), gguf_name
        checked += 1
    assert checked == len(im.entries) and checked >= 4 * fam.n_layers
    assert differs > 0 if int8 else differs == 0  # the int8 products really ran (inputs after the first)
    ckpt.close()


def two_linears(g: torch.Generator):
    """A bare Forward holding linears "l" (with a bias) and "m" that share an input of width 40;
    their weights by name, and an input."""
    from qconvert.arch.forward import Forward

    class Fam:
        cfg = None

    w = {"l.weight": torch.randn(24, 40, generator=g), "l.bias": torch.randn(24, generator=g),
         "m.weight": torch.randn(8, 40, generator=g)}
    fw = Forward(Fam, {})
    for name, t in w.items():
        fw.set(name, t)
    return fw, w, torch.randn(3, 7, 40, generator=g)


def test_int8_linear_close_to_float():
    """int8 products: rows scaled to int8 on both sides, shared input quantized once."""
    from qconvert.arch.layers import int8_rows

    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 40, generator=g) * torch.linspace(0.1, 10, 40)
    codes, scale = int8_rows(a)
    assert codes.dtype == torch.int8 and codes.abs().max() == 127
    assert torch.allclose(codes * scale, a, atol=float(scale.max()) / 2 + 1e-7)

    fw, w, x = two_linears(g)
    assert fw.use_products("int8") == "int8"
    y = fw.linear(x, "l")
    ref = torch.nn.functional.linear(x, w["l.weight"], w["l.bias"])
    assert y.shape == ref.shape and 0 < float((y - ref).norm() / ref.norm()) < 0.02
    shared = fw.per_input("int8", x, lambda: None)  # the rows of x, made by the first linear
    fw.linear(x, "m")
    assert fw.per_input("int8", x, lambda: None) is shared and set(fw._int8) == {"l.weight", "m.weight"}
    assert "l.weight" not in fw._cache  # the float copy went once the int8 one was made
    fw.clear()
    assert not fw._per_input and not fw._int8


def test_bf16_linear_close_to_float():
    """bfloat16 products (GPTQ's forward where the CPU has them): float32 out, within bfloat16's
    rounding of the float32 product; the input converted once for the linears that share it; a
    weight an observer replaces is converted anew."""
    fw, w, x = two_linears(torch.Generator().manual_seed(0))
    assert fw.use_products("bfloat16") == "bfloat16"
    y = fw.linear(x, "l")
    ref = torch.nn.functional.linear(x, w["l.weight"], w["l.bias"])
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert 0 < float((y - ref).norm() / ref.norm()) < 0.01
    shared = fw.per_input("bf16", x, lambda: None)
    fw.linear(x, "m")
    assert fw.per_input("bf16", x, lambda: None) is shared and set(fw._bf16) == {"l.weight", "m.weight"}
    fw.set_linear_weight("l", torch.zeros(24, 40))
    assert torch.equal(fw.linear(x, "l"), w["l.bias"].expand(3, 7, 24))
    assert fw.use_products("float8") == "float32"  # what a forward cannot run falls back to float32


def test_transformers_forward_runs_float32_only(tiny):
    """The forward built from transformers' modules computes its own products: asked for
    bfloat16 or int8 it says float32, so reports name what ran."""
    from qconvert.arch.generic import TransformersForward
    from qconvert.model import open_model

    m = open_model(str(tiny("qwen2")))
    try:
        fw = TransformersForward(m.family)
        assert fw.use_products("bfloat16") == "float32" and fw.use_products("int8") == "float32"
        assert m.forward().use_products("bfloat16") == "bfloat16"  # the hand-written one can
    finally:
        m.close()


def test_native_products_read_cpu_flags(monkeypatch, tmp_path):
    """bfloat16 and int8 products only where the CPU has the instructions (x86 flags, Arm
    features): without int8 dot products torch._int_mm is about 3x slower than float32."""
    import builtins

    from qconvert.calibrate import driver

    real_open = builtins.open
    for text, bf16, int8 in (("flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n", True, True),
                             ("flags : fpu avx2 avx512f\n", False, False), ("flags : fpu avx2 avx_vnni\n", False, True),
                             ("Features\t: fp asimd asimddp bf16\n", True, True), ("processor : 0\n", False, False)):
        f = tmp_path / "cpuinfo"
        f.write_text(text)
        monkeypatch.setattr(builtins, "open", lambda p, *a, _f=f, **k: real_open(_f if p == "/proc/cpuinfo" else p,
                                                                                 *a, **k))
        assert (driver.native_bf16(), driver.native_int8()) == (bf16, int8), text


def test_observers_see_every_linear_and_may_replace_weights(tiny):
    """The layer loop: an observer sees each linear's input before it runs, and a weight it
    replaces there is what the rest of the layer uses; end_layer asking for a rerun recomputes
    the layer's output on the changed weights."""
    from qconvert.calibrate.driver import Observer, run_layers

    ckpt = open_checkpoint(str(tiny("llama")))
    fam = family_for(ckpt)
    ids = torch.tensor([list(range(1, 30))])
    plain = run_layers(fam.forward(), ids)

    class Zero(Observer):
        seen: list[str] = []

        def linear_input(self, fw, hf, x):
            self.seen.append(hf)
            if hf.endswith("o_proj"):
                fw.set_linear_weight(hf, torch.zeros_like(fw.linear_weight(hf)))

    z = Zero()
    zeroed = run_layers(fam.forward(), ids, (z,))
    assert len(z.seen) == 7 * fam.n_layers and not torch.equal(zeroed, plain)

    class Rerun(Observer):
        def end_layer(self, fw, i):
            fw.set_linear_weight(f"model.layers.{i}.self_attn.o_proj",
                                 torch.zeros_like(fw.linear_weight(f"model.layers.{i}.self_attn.o_proj")))
            return True
    assert torch.allclose(run_layers(fam.forward(), ids, (Rerun(),)), zeroed, atol=1e-6)
    ckpt.close()
