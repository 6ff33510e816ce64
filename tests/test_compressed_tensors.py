"""`--format compressed-tensors` for GPTQ and AWQ: the same codes, scales and zero points written
as compressed-tensors' pack-quantized (W4A16 and kin), checked with compressed-tensors 0.20
itself: its config schema reads ours, its decompressor gives exactly our dequantized weights
(with float32 scales: the exact products), its compressor makes the same bytes from them; and
transformers (with compressed-tensors) loads the symmetric ones and computes our logits."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from tests.helpers import one_line_error, run_cli

pytestmark = pytest.mark.kernel_free  # no GGUF blocks: the C pass covers it

PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def make(src, out, capsys, method, *extra) -> dict:
    code, stdout, err = run_cli([src, "--to", method, "--format", "compressed-tensors", "-o", out, "--calib-samples",
                                 "8", "--calib-seq-len", "64", "--json", *extra], capsys)
    assert code == 0, err
    return json.loads(stdout)["outputs"][0]


@pytest.mark.parametrize("family,method,extra", [
    ("llama", "gptq", ["--group-size", "32"]),
    ("qwen2", "gptq", ["--group-size", "64", "--bits", "8"]),
    ("qwen3", "gptq", ["--group-size", "-1", "--asym"]),
    ("llama", "awq", ["--group-size", "32"]),
    ("gemma3", "awq", ["--group-size", "64", "--no-clip"]),
])
def test_pack_quantized_is_compressed_tensors(tiny, tmp_path, capsys, family, method, extra):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor as Packed
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from safetensors.torch import load_file

    from qconvert.model import open_model

    out = tmp_path / "ct"
    r = make(tiny(family), out, capsys, method, *extra)
    assert r["checkpoint_format"] == "pack-quantized"
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    cfg = QuantizationConfig.model_validate(q)
    assert {k: v for k, v in q.items() if k not in ("meta", "version", "sparsity_config", "transform_config")} == \
        cfg.to_dict()
    scheme = cfg.config_groups["group_0"]
    bits = int(extra[extra.index("--bits") + 1]) if "--bits" in extra else 4
    group = int(extra[extra.index("--group-size") + 1])
    expected = QuantizationScheme(targets=["Linear"], weights={
        "num_bits": bits, "type": "int", "symmetric": method == "gptq" and "--asym" not in extra,
        "strategy": "channel" if group == -1 else "group", "group_size": None if group == -1 else group,
        "actorder": "weight" if method == "gptq" else None}, format="pack-quantized")
    assert scheme == expected
    assert ("quantize_config.json" in {p.name for p in out.iterdir()}) is False
    ts = load_file(out / "model.safetensors")
    m = open_model(str(out))
    decoded = 0
    for k in ts:
        if not k.endswith(".weight_packed"):
            continue
        prefix = k[:-len(".weight_packed")]
        sd = {p: ts[f"{prefix}.{p}"] for p in PARTS if f"{prefix}.{p}" in ts}
        assert ("weight_zero_point" in sd) == (not scheme.weights.symmetric)
        theirs = Packed.decompress({**sd, "weight_scale": sd["weight_scale"].float()}, scheme)
        ours = torch.from_numpy(m.ckpt.tensors[prefix + ".weight"].array())
        assert torch.equal(theirs["weight"], ours), prefix
        zp = theirs.get("weight_zero_point", torch.zeros(sd["weight_scale"].shape, dtype=torch.int8))
        again = Packed.compress({"weight": ours, "weight_scale": sd["weight_scale"].float(), "weight_zero_point": zp},
                                scheme)
        assert torch.equal(again["weight_packed"], sd["weight_packed"]), prefix
        if "weight_zero_point" in sd:
            assert torch.equal(again["weight_zero_point"], sd["weight_zero_point"]), prefix
        assert again["weight_shape"].tolist() == sd["weight_shape"].tolist()
        decoded += 1
    m.close()
    assert decoded == r["n_linears"]
    code, stdout, err = run_cli(["inspect", out, "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["quantized_linears"] == decoded


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_transformers_runs_symmetric_pack_quantized(tiny, tmp_path, capsys, family):
    """transformers 5 with compressed-tensors 0.20 loads the symmetric checkpoints and its
    logits equal our forward's on the dequantized weights. (Its 0.20 cannot initialise
    asymmetric pack-quantized modules, whose packed zero points it expects unpacked; 0.19,
    which llm-compressor 0.14 pins, loads our AWQ ones: see README.)"""
    import transformers

    from qconvert.model import open_model

    out = tmp_path / "ct"
    make(tiny(family), out, capsys, "gptq", "--group-size", "32")
    ids = torch.tensor([[1, 5, 9, 22, 40, 7, 3, 11]])
    hm = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        theirs = hm(ids).logits[0]
    m = open_model(str(out))
    with torch.inference_mode():
        ours = m.forward().logits(ids)[0]
    m.close()
    assert float((ours - theirs).pow(2).mean().sqrt() / theirs.pow(2).mean().sqrt()) < 1e-5


def test_pack_quantized_refusals(tiny, tmp_path, capsys):
    code, _, err = run_cli([tiny("gpt2"), "--to", "gptq", "--format", "compressed-tensors", "-o", tmp_path / "o"],
                           capsys)
    assert code == 2
    one_line_error(err, "Conv1D")
    code, _, err = run_cli([tiny("gpt_neox-64"), "--to", "awq", "--format", "compressed-tensors", "--group-size", "32",
                            "-o", tmp_path / "o"], capsys)
    assert code == 2
    one_line_error(err, "activation", "--format awq")
    code, _, err = run_cli([tiny("llama"), "--to", "gptq", "--format", "hf-fp8", "-o", tmp_path / "o"], capsys)
    assert code == 2
    one_line_error(err, "hf-fp8", "fp8-block")
    code, _, err = run_cli([tiny("llama"), "--to", "awq", "--format", "gptq", "-o", tmp_path / "o"], capsys)
    assert code == 2
    one_line_error(err, "--format gptq does not apply to --to awq")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family,extra", [("llama", []), ("qwen2", ["--no-gptq"]), ("gemma3", ["--smoothing", "0.8"]),
                                          ("gemma2", []), ("olmo2", []), ("gpt_neox-64", [])])
def test_w8a8_is_compressed_tensors_int8(tiny, tmp_path, capsys, family, extra):
    """--to w8a8: compressed-tensors' INT8_W8A8 config; its decompressor gives our weights and
    its compressor our bytes; transformers loads and runs it (quantizing activations per token
    as vLLM does) with our weights."""
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor as Naive
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import INT8_W8A8
    import transformers
    from safetensors.torch import load_file

    from qconvert.model import open_model

    out = tmp_path / "w8a8"
    code, stdout, err = run_cli([tiny(family), "--to", "w8a8", "-o", out, "--calib-samples", "8", "--calib-seq-len",
                                 "64", "--json", *extra], capsys)
    assert code == 0, err
    r = json.loads(stdout)["outputs"][0]
    assert r["checkpoint_format"] == "int-quantized" and r["gptq"] == ("--no-gptq" not in extra)
    smoothed = [s for x in r["layers"] for s in x["smoothing"]]
    per_layer = 0 if family == "olmo2" else 2  # OLMo 2 has no norm before its linears: nothing to smooth
    assert len(smoothed) == per_layer * len(r["layers"]) and all(s["min_scale"] >= 1e-5 for s in smoothed)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    cfg = QuantizationConfig.model_validate(q)
    scheme = cfg.config_groups["group_0"]
    preset = copy.deepcopy(INT8_W8A8)  # the library's own preset objects stay as they are
    if "--no-gptq" not in extra:
        preset["weights"] = preset["weights"].model_copy(update={"actorder": "weight"})
    expected = QuantizationScheme(targets=["Linear"], format="int-quantized", **preset)
    assert scheme == expected
    ts = load_file(out / "model.safetensors")
    m = open_model(str(out))
    hm = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 22, 40, 7, 3, 11]])
    with torch.no_grad():
        logits = hm(ids).logits  # decompresses every linear; quantizes their inputs per token
        simulated, weights_only = m.forward(True).logits(ids), m.forward().logits(ids)
    assert torch.isfinite(logits).all()
    assert m.acts.label == "int8 per token"
    assert torch.allclose(simulated, logits, rtol=0, atol=1e-5 * logits.abs().max())
    assert (weights_only - logits).abs().max() > 10 * (simulated - logits).abs().max()
    n = 0
    for k in ts:
        if not k.endswith(".weight_scale"):
            continue
        prefix = k[:-len(".weight_scale")]
        assert ts[prefix + ".weight"].dtype == torch.int8 and ts[k].shape == (ts[prefix + ".weight"].shape[0], 1)
        theirs = Naive.decompress({"weight": ts[prefix + ".weight"], "weight_scale": ts[k].float()}, scheme)["weight"]
        ours = torch.from_numpy(m.ckpt.tensors[prefix + ".weight"].array())
        assert torch.equal(theirs, ours), prefix
        again = Naive.compress({"weight": ours, "weight_scale": ts[k].float(),
                                "weight_zero_point": torch.zeros(ts[k].shape, dtype=torch.int8)}, scheme)
        assert torch.equal(again["weight"], ts[prefix + ".weight"]), prefix
        loaded = hm.get_submodule(prefix.replace("language_model.", "")).weight.detach()
        assert torch.equal(loaded.half(), ours.half()), prefix  # compressed-tensors decompresses in f16
        n += 1
    m.close()
    assert n == r["n_linears"]


def test_w8a8_smoothing_keeps_the_float_model_and_gptq_beats_rounding(tiny, tmp_path, capsys):
    """The smoothing is folded exactly (norm / s, W s): with GPTQ the 8-bit model is at least as
    close to the float model as round-to-nearest, and both are close."""
    from qconvert.calibrate.gptq import reduce, statistics
    from qconvert.calibrate.w8a8 import smoothing_scales
    from qconvert.model import open_model

    x = torch.randn(2, 16, 8) * torch.tensor([1, 2, 3, 50, 1, 1, 0.5, 4.0])
    w = [torch.randn(6, 8), torch.randn(4, 8)]
    shares = [statistics(type("Fw", (), {"chunk_units": [(u, slice(0, 1))], "chunk_samples": 1})(), x[u:u + 1])
              for u in (0, 1)]
    _, r = reduce(shares)  # the column ranges of two workers' shares
    assert torch.equal(r, x.reshape(-1, 8).amax(0) - x.reshape(-1, 8).amin(0))
    s = smoothing_scales(r, w, 0.5)
    ws = 2 * torch.cat(w).abs().amax(0)
    assert torch.allclose(s, (r.sqrt() / ws.sqrt()).clamp(min=1e-5))
    src = tiny("llama")
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 300, size=(2, 64)))
    logits, reports = {}, {}
    for name, extra in (("float", None), ("gptq", []), ("rtn", ["--no-gptq"])):
        path = src
        if extra is not None:
            path = tmp_path / name
            code, out, err = run_cli([src, "--to", "w8a8", "-o", path, "--calib-seq-len", "128", "--json", *extra],
                                     capsys)
            assert code == 0, err
            reports[name] = json.loads(out)["outputs"][0]
        m = open_model(str(path))
        with torch.inference_mode():
            logits[name] = m.forward().logits(ids)
        m.close()

    def rel(a, b):
        return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())
    assert rel(logits["gptq"], logits["float"]) < 0.02 and rel(logits["rtn"], logits["float"]) < 0.02
    layers = reports["gptq"]["layers"]  # GPTQ's output error on the smoothed inputs, against rounding's
    assert sum(x["gptq_error"] for x in layers) < 0.9 * sum(x["rtn_error"] for x in layers)
