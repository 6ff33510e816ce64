"""optimum-quanto checkpoints (qint4, qint8): codes, scales and shifts bit for bit what quanto's own
quantize() + freeze() compute on awkward weights; whole checkpoints tensor for tensor, and
quanto_qmap.json entry for entry, what QuantizedModelForCausalLM.quantize(model, weights=...,
exclude="lm_head") + save_pretrained writes; its from_pretrained loads ours and its logits are
ours; eval, inspect and every target read them."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

from tests.helpers import one_line_error, quantized_then_f32, replaced_only_when_ours, run_cli
from tests.test_bnb import DTYPES, same

pytestmark = pytest.mark.kernel_free  # no GGUF blocks: the C pass covers it


def awkward(n: int, k: int, dtype) -> torch.Tensor:
    """Rows from 1e-6 to 10 in size, a constant row, an outlier, an all-negative row."""
    g = torch.Generator().manual_seed(n * 31 + k)
    w = torch.randn(n, k, generator=g) * torch.logspace(-6, 1, n)[:, None]
    w[2] = 0.25
    w[3, 3] = 50.0
    w[4] = -w[4].abs()
    return w.to(dtype)


def theirs(w: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """quanto's frozen QLinear state of a weight (quantize + freeze, as QuantizedModelForCausalLM.quantize)."""
    from optimum.quanto import freeze, qint4, qint8
    from optimum.quanto import quantize as quanto_quantize

    m = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype))
    m[0].weight.data = w.clone()
    quanto_quantize(m, weights=qint4 if bits == 4 else qint8)
    freeze(m)
    state: dict = {}
    m[0]._save_to_state_dict(state, "", False)
    return {k: v.data if hasattr(v, "data") else v for k, v in state.items()}, m[0].weight.dequantize()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 128), (40, 320), (30, 96), (48, 896), (33, 200), (32, 4864)])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_is_quanto(dtype, shape, bits):
    """Every tensor quanto keeps for the linear bit for bit (groups of 128, 96, 64 and none by its
    width rule; odd row counts; bfloat16's tinygemm round trip of the shift at groups of 128), and
    the dequantized weight quanto's."""
    from qconvert.layouts import Params, Quanto, from_numpy

    w = awkward(*shape, DTYPES[dtype])
    state, deq = theirs(w, bits)
    code = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[dtype]
    parts, mine = Quanto.quantized(w, Params(bits, -1, dtype=code))
    assert set(parts) == set(state)
    for k, v in state.items():
        got = from_numpy(parts[k], code) if parts[k].dtype.kind in "fu" and k not in ("weight._data._data",) \
            else torch.from_numpy(parts[k])
        assert same(got, v), k
    assert same(mine, deq)


def quanto_save(src, out, bits: int):
    """What quanto's own path writes: QuantizedModelForCausalLM.quantize(the float model, weights=qint4
    or qint8, exclude="lm_head") + save_pretrained."""
    from optimum.quanto import QuantizedModelForCausalLM, qint4, qint8
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    QuantizedModelForCausalLM.quantize(model, weights=qint4 if bits == 4 else qint8, exclude="lm_head") \
        .save_pretrained(out)
    return out


IDS = [[1, 5, 9, 22, 40, 7, 3, 11]]
QUANTO_LOGITS = """
import sys, torch
from optimum.quanto import QuantizedModelForCausalLM
ids = torch.tensor(%r)
with torch.no_grad():
    torch.save([QuantizedModelForCausalLM.from_pretrained(d)(ids).logits.float() for d in sys.argv[2:]], sys.argv[1])
""" % (IDS,)


def quanto_logits(tmp_path, *dirs) -> list[torch.Tensor]:
    """The logits of quanto's from_pretrained model of each checkpoint directory on IDS, from a
    child process: on an AVX-512 Xeon torch 2.13's _weight_int8pack_mm, which quanto's int8
    linear calls, has crashed the process (SIGSEGV) in one of these cases (the same call on the
    same tensors in a fresh process did not); there the oracle is lost for that case, not the suite."""
    out = tmp_path / "quanto-logits.pt"
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", QUANTO_LOGITS, str(out), *map(str, dirs)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode == -signal.SIGSEGV:
        frames = [line.strip() for line in r.stderr.splitlines() if line.strip().startswith('File "')]
        pytest.skip(f"quanto's forward crashed (SIGSEGV) on this CPU at {frames[0] if frames else '?'}")
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("family,dtype,bits", [
    ("llama", "bfloat16", 4), ("qwen2", "float16", 4), ("gemma3", "float32", 8), ("granite", "bfloat16", 8),
    ("qwen3", "float32", 4), ("llama-tied", "float32", 4), ("llama-wide", "bfloat16", 4)])
def test_checkpoint_is_what_quanto_saves(tiny, tmp_path, capsys, family, dtype, bits):
    """Every tensor of our checkpoint equal (dtype, shape, bytes) to quanto's own save from the same
    source, quanto_qmap.json the same map, no quantization_config (quanto writes none); quanto's
    from_pretrained loads ours with logits equal to its own checkpoint's, and ours match within
    its dtype's noise; eval and inspect read it."""
    from safetensors.torch import load_file

    src = tiny(family, dtype)
    out = tmp_path / "mine"
    code, stdout, err = run_cli([src, "--to", f"quanto-int{bits}", "-o", out, "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)["outputs"][0]
    assert report["method"] == f"quanto-int{bits}" and report["checkpoint_format"] == "quanto"
    ref = quanto_save(src, tmp_path / "ref", bits)
    got, want = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert set(got) == set(want)
    for k, v in want.items():
        assert same(got[k], v), k
    qmap, ref_qmap = (json.loads((d / "quanto_qmap.json").read_text()) for d in (out, ref))
    assert qmap == ref_qmap
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    from qconvert.evaluate import open_model

    ours = open_model(str(out))
    with torch.no_grad():
        mine = ours.forward().logits(torch.tensor(IDS)).float()
    ours.close()
    loaded, reference = quanto_logits(tmp_path, out, ref)
    assert torch.equal(loaded, reference)
    tol = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}[dtype]  # quanto computes in the model's dtype
    assert ((loaded - mine).norm() / mine.norm()).item() < tol

    code, stdout, err = run_cli(["inspect", out, "--json"], capsys)
    assert code == 0, err
    info = json.loads(stdout)
    assert info["quant_method"] == "quanto" and info["quantized_linears"] == report["n_linears"]


def test_quanto_checkpoint_as_input(tiny, tmp_path, capsys):
    """Our qint4 checkpoint read as the source of another target: F32 GGUF tensors equal quanto's
    dequantization of each linear exactly (down_proj's codes fit two shapes alone; the config
    decides), and the report says the source was quantized."""
    from optimum.quanto import QuantizedModelForCausalLM

    q, gguf = quantized_then_f32(tiny("llama", "float32"), "quanto-int4", tmp_path, capsys, "quanto")
    model = QuantizedModelForCausalLM.from_pretrained(str(q))
    for name, key in (("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj"),
                      ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj")):
        expect = model.get_submodule(key).weight.dequantize().float()
        assert torch.equal(gguf[name].reshape(expect.shape), expect), name


def test_usage_errors_force_and_refusals(tiny, tmp_path, capsys):
    """quanto's group size and bits are its own (options for them are usage errors); --force
    replaces our own quanto output of the same type only; mixtures of experts are refused."""
    src = tiny("llama", "float32")
    code, _, err = run_cli([src, "--to", "quanto-int4", "-o", tmp_path / "x", "--group-size", "64"], capsys)
    assert code == 2
    one_line_error(err, "--group-size")
    replaced_only_when_ours(src, "quanto-int8", quanto_save(src, tmp_path / "theirs", 8), tiny("qwen3moe", "float32"),
                            tmp_path, capsys)
