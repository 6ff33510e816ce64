"""HQQ checkpoints: codes, scales and zeros equal to hqq's own Quantizer on awkward weights (bit for
bit: the same float32 steps); whole checkpoints tensor for tensor what transformers 4.x saves
after loading the same model with an HqqConfig (hqq's HQQLinear made from every decoder linear,
as transformers' HQQ quantizer makes them; transformers 5.x no longer quantizes or loads HQQ);
hqq's own loader (HQQLinear.load_state_dict, what transformers 4.x calls for each linear) reads
ours and its logits are our forward's; eval, inspect and every target read them."""
from __future__ import annotations

import json

import pytest
import torch

from qconvert.quant import hqq
from tests.helpers import one_line_error, quantized_then_f32, replaced_only_when_ours, run_cli
from tests.test_bnb import DTYPES, same

pytestmark = pytest.mark.kernel_free  # no GGUF blocks: the C pass covers it


def awkward(n: int, k: int, dtype) -> torch.Tensor:
    """Rows from 1e-6 to 10 in size, an all-zero row, a constant row (max - min below hqq's 1e-4
    floor), an outlier, an all-negative row."""
    g = torch.Generator().manual_seed(n * 31 + k)
    w = torch.randn(n, k, generator=g) * torch.logspace(-6, 1, n)[:, None]
    w[1] = 0.0
    w[2] = 0.25
    w[3, 3] = 50.0
    w[4] = -w[4].abs()
    return w.to(dtype)


def hqq_linear(w: torch.Tensor, bits: int, group: int, bias: torch.Tensor | None = None):
    """hqq's HQQLinear of a weight, as transformers 4.x's HQQ quantizer makes it (HqqConfig's
    hqq_base_quant_config, the model's dtype as compute dtype, on the CPU)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=w.dtype)
    lin.weight.data = w
    if bias is not None:
        lin.bias.data = bias
    return HQQLinear(lin, BaseQuantizeConfig(nbits=bits, group_size=group), compute_dtype=w.dtype, device="cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,group", [((64, 128), 64), ((40, 96), 32), ((300, 64), 64), ((8, 80), 16)])
@pytest.mark.parametrize("bits", hqq.BITS)
def test_quantize_is_hqq(dtype, shape, group, bits):
    """Codes (packed), scale and zero bit for bit those of hqq's HQQLinear (its Quantizer with
    HqqConfig's settings), and the dequantized weight hqq's."""
    if not hqq.fits(*shape, group, bits):
        pytest.skip("hqq cannot pack it")
    from qconvert.layouts import HQQ, Params

    w = awkward(*shape, DTYPES[dtype])
    theirs = hqq_linear(w, bits, group)
    state = theirs.state_dict()
    p = Params(bits, group, dtype={"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[dtype])
    parts, dequantized = HQQ.quantized(w, p)
    for k, v in state.items():
        mine = torch.from_numpy(parts[k])
        if v.dtype == torch.bfloat16:
            mine = mine.view(torch.bfloat16)
        assert same(mine, v.data), k
    assert set(parts) == set(state)
    assert same(HQQ.decode(parts, p), theirs.dequantize()) and same(dequantized, theirs.dequantize())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_optimiser_stops_as_hqq_does(bits):
    """The proximal solver stops at the first iteration that does not lower the mean error and
    keeps that iteration's zero (hqq's quirk): these weights stop it early (counted with hqq's own
    step function), and ours equals hqq's optimize_weights_proximal_legacy."""
    from hqq.core.optimize import optimize_weights_proximal_legacy, optimize_weights_proximal_legacy_step

    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    W = w.reshape(-1, 64)
    lo, hi = W.min(1, keepdim=True)[0], W.max(1, keepdim=True)[0]
    top = 2 ** bits - 1
    scale = torch.where((hi - lo).abs() <= 1e-4, torch.ones_like(hi), top / (hi - lo)).clamp(max=2e4)
    zero = -lo * scale
    zero = torch.round(zero) if bits == 4 else zero
    best, steps, z = float("inf"), 0, zero
    for _ in range(hqq.ITERS):
        w_r, _, z, _ = optimize_weights_proximal_legacy_step(W, scale, z, [0, top], hqq.BETA, hqq.LP_NORM, 1)
        steps += 1
        err = float(torch.abs(W - w_r).mean())
        if not err < best:
            break
        best = err
    assert steps < hqq.ITERS
    q, _, zero = optimize_weights_proximal_legacy(W, scale, zero, [0, top], axis=1, device="cpu")
    mine_q, mine_scale, mine_zero = hqq.quantize(w, bits, 64)
    assert torch.equal(mine_q, q.to(torch.uint8)) and same(mine_zero, zero) and same(mine_scale, 1.0 / scale)


def transformers4_save(src, dtype: torch.dtype, bits: int, group: int) -> dict[str, torch.Tensor]:
    """The state dict transformers 4.x saves after from_pretrained(src, quantization_config=
    HqqConfig(nbits=bits, group_size=group), dtype=dtype): every Linear but lm_head an HQQLinear
    of its weight and bias, everything in `dtype`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    for name, mod in list(model.named_modules()):
        for child, lin in list(mod.named_children()):
            if isinstance(lin, torch.nn.Linear) and f"{name}.{child}" != "lm_head" and child != "lm_head":
                setattr(mod, child, hqq_linear(lin.weight.data, bits, group, lin.bias.data if lin.bias is not None
                                               else None))
    return model.state_dict()


def hqq_loaded(out, dtype: torch.dtype):
    """Our checkpoint loaded as transformers 4.x loads a pre-quantized HQQ one: the float model
    built from config.json, each quantized linear an HQQLinear(None, None) that reads its tensors
    with hqq's load_state_dict."""
    from hqq.core.quantize import HQQLinear
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(out)
    del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    tensors = load_file(out / "model.safetensors")
    prefixes = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".W_q")}
    for prefix in prefixes:
        parent, child = prefix.rsplit(".", 1)
        layer = HQQLinear(None, None, compute_dtype=dtype, device="cpu")
        layer.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
        setattr(model.get_submodule(parent), child, layer)
    rest = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in prefixes}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    assert not unexpected and all(".W_q" in k or k.rsplit(".", 1)[0] in prefixes or "lm_head" in k for k in missing)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


@pytest.mark.parametrize("family,dtype,bits,group", [
    ("llama", "bfloat16", 4, 64), ("qwen2", "float16", 4, 64), ("gemma3", "float32", 3, 32),
    ("granite", "bfloat16", 2, 64), ("qwen3", "float32", 8, 64), ("llama-tied", "float32", 4, 16)])
def test_checkpoint_is_what_transformers_saves(tiny, tmp_path, capsys, family, dtype, bits, group):
    """Every tensor of our checkpoint equal (dtype, shape, bytes) to what transformers 4.x saves
    with an HqqConfig, config.json's quantization_config as HqqConfig writes it; hqq's loader reads
    ours and its logits are our dequantized forward's; eval and inspect read it."""
    from safetensors.torch import load_file

    src = tiny(family, dtype)
    out = tmp_path / "hqq"
    args = [src, "--to", "hqq", "-o", out, "--json", "--bits", str(bits), "--group-size", str(group)]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    report = json.loads(stdout)["outputs"][0]
    assert report["method"] == "hqq" and report["checkpoint_format"] == "hqq" and report["bits"] == bits
    got, want = load_file(out / "model.safetensors"), transformers4_save(src, DTYPES[dtype], bits, group)
    want = {k: v for k, v in want.items() if not (k == "lm_head.weight" and k not in got)}  # tied: not saved
    assert set(got) == set(want)
    for k, v in want.items():
        assert same(got[k], v.data), k
    cfg = json.loads((out / "config.json").read_text())
    rope = json.loads((src / "config.json").read_text()).get("rope_parameters")
    if rope:  # transformers 4.x, the only one that loads HQQ, reads rope_theta, not rope_parameters
        full = rope.get("full_attention", rope)
        assert cfg["rope_theta"] == full["rope_theta"] and cfg["rope_parameters"] == rope
        if "sliding_attention" in rope:
            assert cfg["rope_local_base_freq"] == rope["sliding_attention"]["rope_theta"]
    q = cfg["quantization_config"]
    assert q == {"quant_config": {"offload_meta": False, "scale_quant_params": None, "zero_quant_params": None,
                                  "weight_quant_params": {"nbits": bits, "channel_wise": True, "group_size": group,
                                                          "optimize": True, "round_zero": bits == 4, "axis": 1,
                                                          "view_as_float": False}},
                 "quant_method": "hqq", "skip_modules": ["lm_head"]}

    from qconvert.evaluate import open_model

    ids = torch.tensor([[1, 5, 9, 22, 40, 7, 3, 11]])
    ours = open_model(str(out))
    with torch.no_grad():
        mine = ours.forward().logits(ids).float()
        theirs = hqq_loaded(out, DTYPES[dtype])(ids).logits.float()
    ours.close()
    # hqq computes in the checkpoint's dtype, ours in float32 from the same dequantized weights
    tol = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}[dtype]
    assert ((theirs - mine).norm() / mine.norm()).item() < tol

    code, stdout, err = run_cli(["inspect", out, "--json"], capsys)
    assert code == 0, err
    info = json.loads(stdout)
    assert info["quant_method"] == "hqq" and info["quantized_linears"] == report["n_linears"]
    assert {x["method"] for x in info["linears"]} == {"hqq"}


def test_hqq_checkpoint_as_input(tiny, tmp_path, capsys):
    """Our checkpoint read as the source of another target: F32 GGUF tensors equal hqq's
    dequantization of each linear exactly, and the report says the source was quantized."""
    from hqq.core.quantize import HQQLinear
    from safetensors.torch import load_file

    q, gguf = quantized_then_f32(tiny("llama", "float32"), "hqq", tmp_path, capsys, "hqq")

    prefix = "model.layers.1.mlp.down_proj"
    layer = HQQLinear(None, None, compute_dtype=torch.float32, device="cpu")
    layer.load_state_dict({k[len(prefix) + 1:]: v for k, v in load_file(q / "model.safetensors").items()
                           if k.startswith(prefix + ".")})
    expect = layer.dequantize()
    assert torch.equal(gguf["blk.1.ffn_down.weight"].reshape(expect.shape), expect)


def test_usage_errors_force_and_refusals(tiny, tmp_path, capsys):
    """Bits and group sizes hqq does not take, and groups that do not pack, are usage errors that
    say what would; --force replaces our own HQQ output only; mixtures of experts are refused;
    nothing is written."""
    from tests.helpers import files_in

    src = tiny("llama", "float32")
    for bad, needles in ((["--bits", "5"], ("--bits", "2, 3, 4, 8")), (["--group-size", "12"], ("multiple of 8",)),
                         (["--group-size", "56"], ("group sizes that fit",)),
                         (["--double-quant"], ("--double-quant",))):
        code, _, err = run_cli([src, "--to", "hqq", "-o", tmp_path / "x", *bad], capsys)
        assert code == 2, bad
        one_line_error(err, *needles)
    assert "x" not in files_in(tmp_path)
    assert run_cli([src, "--to", "int8", "-o", tmp_path / "int8"], capsys)[0] == 0
    code, _, err = run_cli([src, "--to", "hqq", "-o", tmp_path / "int8", "--force"], capsys)
    assert code != 0
    one_line_error(err, "BITSANDBYTES")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text("{}")
    replaced_only_when_ours(src, "hqq", theirs, tiny("qwen3moe", "float32"), tmp_path, capsys)
