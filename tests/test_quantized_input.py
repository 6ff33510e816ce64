"""Quantized checkpoints as input: FP8 (compressed-tensors and transformers' layout), GPTQ and
AWQ checkpoints convert to every target as the float checkpoint of their dequantized weights
does. The dequantized weights come from the formats' own libraries where they exist
(compressed-tensors' decompression with float32 scales: the exact products, as llama.cpp's
converter takes them; transformers' Fp8Dequantize into float32; AutoAWQ's dequantize_gemm); for
GPTQ from our decoder, which tests/test_gptq.py holds equal to GPTQModel's."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tests.helpers import run_cli
from tests.test_fp8 import scheme


def float_checkpoint(src, out, decoded: dict[str, torch.Tensor], parts: tuple[str, ...]):
    """`src` (a quantized checkpoint directory) as a float one in `out`: each quantized linear's
    weight from `decoded` (float32), its parts dropped, every other tensor as it is."""
    from safetensors.torch import load_file, save_file

    ts = load_file(src / "model.safetensors")
    prefixes = {k[:-len(".weight")] for k in decoded}
    keep = {k: v for k, v in ts.items() if not any(k == f"{p}.{x}" for p in prefixes for x in parts)}
    out.mkdir()
    save_file({**keep, **{k: v.contiguous() for k, v in decoded.items()}}, out / "model.safetensors",
              metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    del cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            shutil.copy(f, out / f.name)
    return out


def compressed_tensors_decoded(d, block: bool) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
    from safetensors.torch import load_file

    ts = load_file(d / "model.safetensors")
    return {k[:-len("_scale")]: NaiveQuantizationCompressor.decompress(
        {"weight": ts[k[:-len("_scale")]], "weight_scale": v.float()}, scheme(block))["weight"]
        for k, v in ts.items() if k.endswith(".weight_scale")}


def pack_quantized_decoded(d) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    q = json.loads((d / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(q).config_groups["group_0"]
    ts = load_file(d / "model.safetensors")
    out = {}
    for k, v in ts.items():
        if k.endswith(".weight_packed"):
            p = k[:-len("_packed")]
            sd = {n: ts[p + n] for n in ("_packed", "_scale", "_shape", "_zero_point") if p + n in ts}
            sd = {"weight" + n: t.float() if n == "_scale" else t for n, t in sd.items()}
            out[p] = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
    return out


def int_quantized_decoded(d) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    q = json.loads((d / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(q).config_groups["group_0"]
    ts = load_file(d / "model.safetensors")
    return {k[:-len("_scale")]: NaiveQuantizationCompressor.decompress(
        {"weight": ts[k[:-len("_scale")]], "weight_scale": v.float()}, scheme)["weight"]
        for k, v in ts.items() if k.endswith(".weight_scale")}


def transformers_decoded(d) -> dict[str, torch.Tensor]:
    from types import SimpleNamespace

    from safetensors.torch import load_file
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    op = Fp8Dequantize(SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=[128, 128])))
    ts = load_file(d / "model.safetensors")
    return {k[:-len("_scale_inv")]: op._dequantize_one(ts[k[:-len("_scale_inv")]], v, torch.float32)
            for k, v in ts.items() if k.endswith(".weight_scale_inv")}


def autoawq_decoded(d, group: int) -> dict[str, torch.Tensor]:
    from awq.utils.packing_utils import dequantize_gemm
    from safetensors.torch import load_file

    ts = load_file(d / "model.safetensors")
    return {k[:-len(".qweight")] + ".weight": dequantize_gemm(v, ts[k[:-8] + ".qzeros"], ts[k[:-8] + ".scales"].float(),
                                                               4, group).T.contiguous()
            for k, v in ts.items() if k.endswith(".qweight")}


def ours_decoded(d) -> dict[str, torch.Tensor]:
    from qconvert.model import open_model
    from qconvert.read.quantized import DequantizedLinear

    m = open_model(str(d))
    try:
        return {n: torch.from_numpy(np.array(t.array())) for n, t in m.ckpt.tensors.items()
                if isinstance(t, DequantizedLinear)}
    finally:
        m.close()


def convert(capsys, src, to, out, *extra) -> dict:
    code, stdout, err = run_cli([src, "--to", to, "-o", out, "--json", *extra], capsys)
    assert code == 0, err
    return json.loads(stdout)


CASES = {  # name: (tiny family, dtype, how it is made, the independent decoder, the parts it replaces)
    "fp8": ("llama", "bfloat16", ["--to", "fp8"], lambda d: compressed_tensors_decoded(d, False),
            ("weight", "weight_scale")),
    "fp8-block": ("llama-wide", "bfloat16", ["--to", "fp8-block"], lambda d: compressed_tensors_decoded(d, True),
                  ("weight", "weight_scale")),
    "hf-fp8": ("llama-blocks", "bfloat16", ["--to", "fp8-block", "--format", "hf-fp8"], transformers_decoded,
               ("weight", "weight_scale_inv")),
    "gptq": ("qwen3", "float32", ["--to", "gptq", "--group-size", "32", "--calib-seq-len", "64"], ours_decoded,
             ("qweight", "qzeros", "scales", "g_idx")),
    "gptq-pack-quantized": ("llama", "bfloat16", ["--to", "gptq", "--format", "compressed-tensors", "--group-size",
                                                  "32", "--calib-seq-len", "64"], pack_quantized_decoded,
                            ("weight_packed", "weight_scale", "weight_shape")),
    "awq-pack-quantized": ("qwen2", "float32", ["--to", "awq", "--format", "compressed-tensors", "--group-size", "32",
                                                "--calib-seq-len", "64"], pack_quantized_decoded,
                           ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")),
    "w8a8": ("gemma3", "float32", ["--to", "w8a8", "--calib-seq-len", "64"], int_quantized_decoded,
             ("weight", "weight_scale")),
    "awq": ("llama", "float32", ["--to", "awq", "--group-size", "32", "--calib-seq-len", "64"],
            lambda d: autoawq_decoded(d, 32), ("qweight", "qzeros", "scales")),
}


@pytest.mark.parametrize("case", CASES)
def test_quantized_source_converts_as_its_dequantized_float_checkpoint(tiny, tmp_path, capsys, case):
    family, dtype, make, decoder, parts = CASES[case]
    quantized = tmp_path / "quantized"
    code, _, err = run_cli([tiny(family, dtype), *make, "-o", quantized, "-q"], capsys)
    assert code == 0, err
    reference = float_checkpoint(quantized, tmp_path / "float", decoder(quantized), parts)
    args = ["f16,q8_0,gptq" if case != "hf-fp8" else "bf16,q8_0,gptq", "--group-size", "64",
            "--calib-samples", "4", "--calib-seq-len", "64"]
    ours = convert(capsys, quantized, *args[:1], tmp_path / "from-quantized", *args[1:])
    theirs = convert(capsys, reference, *args[:1], tmp_path / "from-float", *args[1:])
    q = ours["source_quantization"]
    assert q["linears"] == ours["outputs"][-1]["n_linears"] > 0 and theirs["source_quantization"] is None
    assert q["quant_method"] == {"gptq": "gptq", "awq": "awq", "hf-fp8": "fp8"}.get(case, "compressed-tensors")
    for a, b in zip(ours["outputs"], theirs["outputs"]):
        assert a["kind"] == b["kind"]
        if a["kind"] == "gguf":  # the same tensors (general.name differs: the directories' names)
            from gguf import GGUFReader

            ra, rb = GGUFReader(a["path"]), GGUFReader(b["path"])
            assert len(ra.tensors) == len(rb.tensors)
            for ta, tb in zip(ra.tensors, rb.tensors):
                assert (ta.name, ta.tensor_type) == (tb.name, tb.tensor_type), case
                assert np.array_equal(ta.data, tb.data), (case, ta.name)
        else:
            from safetensors.torch import load_file

            ta, tb = load_file(f"{a['path']}/model.safetensors"), load_file(f"{b['path']}/model.safetensors")
            assert ta.keys() == tb.keys()
            for k in ta:
                assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)), k


def test_gptq_from_a_quantized_source_and_the_plan_says_so(tiny, tmp_path, capsys):
    src = tmp_path / "awq"
    assert run_cli([tiny("llama"), "--to", "awq", "--group-size", "32", "--calib-seq-len", "64", "-o", src, "-q"],
                   capsys)[0] == 0
    code, out, err = run_cli([src, "--to", "gptq,q8_0", "--group-size", "32", "-o", tmp_path / "o", "--dry-run"],
                             capsys)
    assert code == 0, err
    assert "source: awq checkpoint" in " ".join(out.split()) and "14 quantized linears are dequantized" in " ".join(out.split())
    assert not (tmp_path / "o").exists()


def test_per_tensor_fp8_with_static_activation_scales(tiny, tmp_path, capsys):
    """llm-compressor's static FP8 scheme: one weight scale per tensor and an input_scale per
    linear (which a weight-only reader leaves out), made here with compressed-tensors itself."""
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import FP8
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import load_file, save_file

    src = tiny("llama", "bfloat16")
    s = QuantizationScheme(targets=["Linear"], **FP8)
    ts = load_file(src / "model.safetensors")
    out, decoded = {}, {}
    for k, w in ts.items():
        if ".layers." in k and w.dim() == 2:
            scale, zp = calculate_qparams(w.amin().reshape(1), w.amax().reshape(1), s.weights)
            c = NaiveQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, s)
            out[k], out[k + "_scale"] = c["weight"], c["weight_scale"]
            out[k[:-len("weight")] + "input_scale"] = torch.tensor([0.02], dtype=w.dtype)
            decoded[k] = NaiveQuantizationCompressor.decompress(
                {"weight": c["weight"], "weight_scale": c["weight_scale"].float()}, s)["weight"]
        else:
            out[k] = w
    fp8_dir = tmp_path / "fp8-static"
    fp8_dir.mkdir()
    save_file(out, fp8_dir / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = QuantizationConfig(config_groups={"group_0": s}, format="float-quantized",
                                                    quantization_status="compressed", ignore=["lm_head"]).to_dict()
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, fp8_dir / f.name)
    reference = float_checkpoint(fp8_dir, tmp_path / "float", decoded, ("weight", "weight_scale", "input_scale"))
    ours = convert(capsys, fp8_dir, "q8_0", tmp_path / "a.gguf")
    theirs = convert(capsys, reference, "q8_0", tmp_path / "b.gguf")
    assert ours["source_quantization"]["linears"] == 14
    from gguf import GGUFReader

    ra, rb = GGUFReader(ours["outputs"][0]["path"]), GGUFReader(theirs["outputs"][0]["path"])
    assert [t.name for t in ra.tensors] == [t.name for t in rb.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ra.tensors, rb.tensors))
