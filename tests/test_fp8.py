"""FP8 (compressed-tensors float-quantized): codes and scales byte-identical to what
compressed-tensors 0.20 (the library llm-compressor saves with) makes from the same weights with
the FP8_DYNAMIC and FP8_BLOCK schemes, its own decompression equal to our dequantized weights,
its config schema accepting ours, and transformers loading the checkpoint (it decompresses on
CPU) with weights equal to ours."""
from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest
import torch

from qconvert.quant import fp8
from tests.helpers import copy_model, files_in, one_line_error, run_cli

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BLOCK = (128, 128)


def scheme(block: bool):
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import FP8_BLOCK, FP8_DYNAMIC

    return QuantizationScheme(targets=["Linear"], **(FP8_BLOCK if block else FP8_DYNAMIC))


def reference(w: torch.Tensor, block: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' (codes, scales) of w: its qparams from the channel's (block's) min and
    max as llm-compressor's min-max observer gives them, then its compressor, with the zero point
    llm-compressor's modules carry."""
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams
    from compressed_tensors.quantization.utils import maybe_pad_tensor_for_block_quant

    s = scheme(block)
    if block:
        p = maybe_pad_tensor_for_block_quant(w, BLOCK)
        b = p.reshape(p.shape[0] // 128, 128, p.shape[1] // 128, 128)
        lo, hi = b.amin((1, 3)), b.amax((1, 3))
    else:
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    scale, zp = calculate_qparams(lo, hi, s.weights)
    out = NaiveQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, s)
    assert set(out) == {"weight", "weight_scale"}
    return out["weight"], out["weight_scale"]


def awkward(n: int, k: int, dtype) -> torch.Tensor:
    """Rows from 1e-8 to 100 in size, an all-zero row, negative zeros, an all-negative row, a
    subnormal, values that saturate nothing but sit on E4M3 rounding ties."""
    g = torch.Generator().manual_seed(n * 7 + k)
    w = (torch.randn(n, k, generator=g) * torch.logspace(-8, 2, n)[:, None]).to(dtype)
    w[3] = 0
    w[5, :7] = -0.0
    w[6] = -w[6].abs()
    w[7, 3] = 1e-30
    w[8] = torch.tensor([448.0, -448.0, 1.0, 0.5625, 0.59375] * (k // 5) + [0.0] * (k % 5)).to(dtype)
    return w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("args,group", [(dict(num_bits=8, type="int", strategy="token"), None),
                                        (dict(num_bits=8, type="float", strategy="token"), None),
                                        (dict(num_bits=8, type="float", strategy="group", group_size=128), 128)])
def test_activation_quantization_is_compressed_tensors(dtype, args, group):
    """The run-time activation quantization eval simulates (quant/activations.py) equals
    compressed-tensors' forward_quantize with dynamic scales, which transformers runs for these
    checkpoints: tokens from 1e-6 to 1e3 in size, an all-zero token, saturating outliers, -0.0,
    tokens whose scale underflows in float16."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    from qconvert.quant.activations import ActivationQuant

    a = {**args, "dynamic": True}
    ours = ActivationQuant.from_compressed_tensors(a, "config.json")
    assert ours == ActivationQuant("int8" if args["type"] == "int" else "fp8", group)
    module = torch.nn.Linear(1, 1)
    module.quantization_status = QuantizationStatus.FROZEN
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 384, generator=g) * torch.logspace(-6, 3, 6)[None, :, None]
    x[0, 0] = 0
    x[1, 1, :7] = 6e4
    x[2, 2, 100] = -0.0
    x[2, 3] = x[2, 3] * 1e-4
    x = x.to(DTYPES[dtype])
    theirs = forward_quantize(module, x, "input", QuantizationArgs(**a))
    mine = ours(x)
    assert mine.dtype == x.dtype and torch.equal(mine, theirs)
    assert not torch.equal(mine, x)


def test_activation_quantization_refusals():
    from qconvert.errors import InputError
    from qconvert.quant.activations import ActivationQuant

    assert ActivationQuant.from_compressed_tensors(None, "c") is None
    static = ActivationQuant.from_compressed_tensors({"num_bits": 8, "type": "float", "strategy": "tensor",
                                                      "dynamic": False}, "c")
    assert not static.simulated and "not simulated" in static.label
    for bad in ({"num_bits": 4, "type": "int", "strategy": "token"}, {"num_bits": 8, "strategy": "channel"},
                {"num_bits": 8, "strategy": "group", "group_size": 0},
                {"num_bits": 8, "strategy": "token", "symmetric": False}):
        with pytest.raises(InputError, match="^c: input activations"):
            ActivationQuant.from_compressed_tensors(bad, "c")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block,shape", [(False, (96, 64)), (True, (300, 200)), (True, (256, 384))])
def test_codes_and_scales_are_compressed_tensors(dtype, block, shape):
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor

    w = awkward(*shape, DTYPES[dtype])
    q, s = fp8.blockwise(w, BLOCK) if block else fp8.channel(w)
    rq, rs = reference(w, block)
    assert s.dtype == rs.dtype == w.dtype and torch.equal(s, rs)
    assert q.dtype == rq.dtype == torch.float8_e4m3fn and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    theirs = NaiveQuantizationCompressor.decompress({"weight": q, "weight_scale": s}, scheme(block))["weight"]
    ours = fp8.dequantize(q, s, BLOCK if block else None)
    assert ours.dtype == theirs.dtype == w.dtype and torch.equal(ours, theirs)


def linears(path, dtype):
    """{prefix: weight} of the decoder linears of a tiny checkpoint, in its dtype."""
    from safetensors.torch import load_file

    ts = load_file(path / "model.safetensors")
    return {k[:-len(".weight")]: v for k, v in ts.items() if ".layers." in k and v.dim() == 2}, ts


@pytest.mark.parametrize("family,dtype,target", [("llama", "bfloat16", "fp8"), ("qwen3", "float16", "fp8"),
                                                 ("gemma3", "float32", "fp8"), ("granite", "bfloat16", "fp8"),
                                                 ("llama-wide", "bfloat16", "fp8-block")])
def test_checkpoint_is_compressed_tensors(tiny, tmp_path, capsys, family, dtype, target):
    """Every quantized linear byte-identical to compressed-tensors' compression of the source
    weight, every other tensor copied byte for byte, the config as compressed-tensors writes it;
    transformers loads it and decompresses to our dequantized weights; eval and inspect read it."""
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    src = tiny(family, dtype)
    out = tmp_path / "fp8"
    code, stdout, err = run_cli([src, "--to", target, "-o", out, "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)["outputs"][0]
    block = target == "fp8-block"
    source, everything = linears(src, DTYPES[dtype])
    got = load_file(out / "model.safetensors")
    assert report["n_linears"] == len(source) > 0
    for prefix, w in source.items():
        rq, rs = reference(w, block)
        assert torch.equal(got[prefix + ".weight"].view(torch.uint8), rq.view(torch.uint8)), prefix
        assert got[prefix + ".weight_scale"].dtype == w.dtype and torch.equal(got[prefix + ".weight_scale"], rs)
    others = {k: v for k, v in everything.items() if k[:-len(".weight")] not in source}
    assert set(got) == {*others, *(p + s for p in source for s in (".weight", ".weight_scale"))}
    for k, v in others.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    theirs = QuantizationConfig.model_validate(q)
    assert {k: v for k, v in q.items() if k not in ("meta", "version", "sparsity_config", "transform_config")} == \
        theirs.to_dict()
    group = scheme(block).model_copy(update={"format": "float-quantized"})  # as llm-compressor 0.14 records it
    assert theirs.to_dict() == QuantizationConfig(config_groups={"group_0": group}, format="float-quantized",
                                                  quantization_status="compressed", ignore=["lm_head"]).to_dict()
    assert q["meta"]["quantizer"][0].startswith("qconvert:") and q["sparsity_config"] == {}
    src_cfg = json.loads((src / "config.json").read_text())
    assert cfg.get("dtype") == src_cfg.get("dtype")
    assert "quantize_config.json" not in files_in(out)

    import transformers

    from qconvert.evaluate import open_model

    m = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 22, 40, 7]])
    with torch.no_grad():
        logits = m(ids).logits  # decompresses every layer; quantizes their inputs to fp8 per token (group)
    assert torch.isfinite(logits).all()
    ours = open_model(str(out))
    assert ours.acts.label == ("fp8 per group of 128" if block else "fp8 per token")
    if dtype == "float32":  # compressed-tensors' weights are ours (other dtypes: rounded to the scales' dtype)
        with torch.no_grad():
            simulated = ours.forward(True).logits(ids)
        assert torch.allclose(simulated, logits, rtol=0, atol=1e-5 * logits.abs().max())
    for prefix in source:  # ours: the exact products in float32; compressed-tensors rounds them to the scales' dtype
        name = prefix.replace("model.language_model.", "model.")
        theirs_w = m.get_submodule(name).weight.detach()
        mine = torch.from_numpy(ours.weights[prefix.replace("language_model.", "") + ".weight"].array())
        assert torch.equal(mine.to(theirs_w.dtype), theirs_w), prefix
        rq, rs = reference(source[prefix], block)
        assert torch.equal(mine, fp8.dequantize(rq.float(), rs.float(), BLOCK if block else None))
    ours.close()

    code, stdout, err = run_cli(["inspect", out, "--json"], capsys)
    assert code == 0, err
    info = json.loads(stdout)
    assert info["quant_method"] == "compressed-tensors" and info["quantized_linears"] == len(source)
    text = tmp_path / "text.txt"
    text.write_text(resources.files("qconvert.calibrate").joinpath("data/emma.txt").read_text(encoding="utf-8")[:8000],
                    encoding="utf-8")
    code, stdout, err = run_cli(["eval", out, "--text", text, "--base", src, "--ctx", "64", "--chunks", "4", "--json"],
                                capsys)
    assert code == 0, err
    scores = json.loads(stdout)
    assert scores["activations"] == ours.acts.label
    code, stdout, err = run_cli(["eval", out, "--text", text, "--base", src, "--ctx", "64", "--chunks", "4", "--json",
                                 "--weights-only"], capsys)
    assert code == 0, err
    weights_only = json.loads(stdout)
    assert weights_only["activations"] is None
    assert 0 < weights_only["kl_divergence"] < 0.1 and weights_only["top1_agreement"] > 0.5  # E4M3: 3 mantissa bits
    assert weights_only["kl_divergence"] < scores["kl_divergence"] < 0.2  # fp8 inputs add their own error


def test_fp8_from_one_command_with_gguf_and_gptq(tiny, tmp_path, capsys):
    """fp8 beside a GGUF file and a calibrated method: one read, one report; fp8 takes no
    calibration and none of the calibrated methods' options."""
    src = tiny("llama")
    code, stdout, err = run_cli([src, "--to", "q8_0,fp8,gptq", "--group-size", "32", "--calib-seq-len", "64",
                                 "-o", tmp_path, "--json"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    assert [o["target"] for o in r["outputs"]] == ["q8_0", "fp8", "gptq"]
    assert [p["method"] for p in r["calibration"]["passes"]] == ["gptq"]
    fp = r["outputs"][1]
    assert fp["scales"] == "per channel" and len(fp["layers"]) == 2
    assert all(0 < e["error"] < 1e-3 for x in fp["layers"] for e in x["linears"])
    code, _, err = run_cli([src, "--to", "fp8", "--group-size", "32", "-o", tmp_path / "x"], capsys)
    assert code == 2
    one_line_error(err, "--group-size", "not to --to fp8")
    code, _, err = run_cli([src, "--to", "fp8", "--calib-samples", "4", "-o", tmp_path / "x"], capsys)
    assert code == 2
    one_line_error(err, "--calib-samples")
    assert not (tmp_path / "x").exists()


def test_fp8_refusals_leave_nothing(tiny, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    code, _, err = run_cli([tiny("gpt2"), "--to", "fp8", "-o", tmp_path / "o"], capsys)
    assert code == 2
    one_line_error(err, "Conv1D", "Linear")
    code, _, err = run_cli([tiny("llama"), "--to", "fp8-block", "-o", tmp_path / "o"], capsys)
    assert code == 2
    one_line_error(err, "blocks of 128", "takes 64", "--to fp8")
    bad = copy_model(tiny("llama", "bfloat16"), tmp_path / "bad")
    ts = load_file(bad / "model.safetensors")
    ts["model.layers.1.mlp.up_proj.weight"][2, 5] = float("inf")
    save_file(ts, bad / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli([bad, "--to", "fp8", "-o", tmp_path / "o"], capsys)
    assert code == 3
    one_line_error(err, "up_proj", "non-finite")
    assert files_in(tmp_path) == ["bad"]


def test_force_replaces_a_previous_fp8_output_only(tiny, tmp_path, capsys):
    src = tiny("llama")
    out = tmp_path / "o"
    assert run_cli([src, "--to", "fp8", "-o", out], capsys)[0] == 0
    code, _, err = run_cli([src, "--to", "fp8", "-o", out], capsys)
    assert code == 4
    one_line_error(err, "already exists")
    code, _, err = run_cli([src, "--to", "fp8", "-o", out, "--force"], capsys)
    assert code == 0, err
    code, _, err = run_cli([src, "--to", "fp8", "-o", src, "--force"], capsys)
    assert code == 4
    assert (src / "model.safetensors").is_file()


def test_transformers_fp8_layout(tiny, tmp_path, capsys):
    """--format hf-fp8: codes and weight_scale_inv byte-identical to transformers' own Fp8Quantize
    on the same weights; transformers loads it on CPU (dequantizing) to our weights, and its
    logits equal our forward's on them."""
    from types import SimpleNamespace

    import transformers
    from safetensors.torch import load_file
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    from qconvert.evaluate import open_model

    src = tiny("llama-blocks", "bfloat16")
    out = tmp_path / "hf"
    code, stdout, err = run_cli([src, "--to", "fp8-block", "--format", "hf-fp8", "-o", out, "--json"], capsys)
    assert code == 0, err
    op = Fp8Quantize(SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=[128, 128],
                                                                         scale_fmt="float")))
    source, everything = linears(src, torch.bfloat16)
    got = load_file(out / "model.safetensors")
    for prefix, w in source.items():
        theirs = op._quantize_one(prefix + ".weight", w)
        assert torch.equal(got[prefix + ".weight"].view(torch.uint8), theirs[prefix + ".weight"].view(torch.uint8))
        assert got[prefix + ".weight_scale_inv"].dtype == torch.float32
        assert torch.equal(got[prefix + ".weight_scale_inv"], theirs[prefix + ".weight_scale_inv"]), prefix
    for k, v in everything.items():
        if k[:-len(".weight")] not in source:
            assert torch.equal(got[k], v), k
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: q[k] for k in ("quant_method", "activation_scheme", "weight_block_size", "modules_to_not_convert")} == \
        {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
         "modules_to_not_convert": ["lm_head"]}
    m = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # dequantizes on a CPU
    ours = open_model(str(out))
    for prefix in source:
        assert np.array_equal(ours.weights[prefix + ".weight"].array(), m.get_submodule(prefix).weight.detach().numpy())
    ids = torch.tensor([[1, 5, 9, 22, 40, 7, 3, 11]])
    with torch.inference_mode():
        theirs = m(ids).logits[0]
        mine = ours.forward().logits(ids)[0]
    ours.close()
    assert float((mine - theirs).pow(2).mean().sqrt() / theirs.pow(2).mean().sqrt()) < 1e-4
    code, _, err = run_cli([src, "--to", "fp8-block", "--format", "hf-fp8", "-o", out, "--force"], capsys)
    assert code == 0, err
    code, _, err = run_cli([tiny("llama-wide"), "--to", "fp8-block", "--format", "hf-fp8", "-o", tmp_path / "x"], capsys)
    assert code == 2
    one_line_error(err, "k_proj gives 64", "whole blocks of 128")
    code, _, err = run_cli([src, "--to", "fp8", "--format", "hf-fp8", "-o", tmp_path / "x"], capsys)
    assert code == 2
    one_line_error(err, "applies to --to fp8-block")
    code, _, err = run_cli([src, "--to", "gptq", "--format", "hf-fp8", "-o", tmp_path / "x"], capsys)
    assert code == 2
    one_line_error(err, "hf-fp8", "applies to --to fp8-block, not --to gptq")
    assert not (tmp_path / "x").exists()
