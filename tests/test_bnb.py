"""bitsandbytes' NF4, FP4 and LLM.int8() checkpoints: codes and statistics byte-identical to
bitsandbytes' own quantizers (its CPU backend) on awkward weights; whole checkpoints tensor for
tensor what transformers saves after loading the same model with a BitsAndBytesConfig, config
included; transformers loads ours and its logits are our dequantized forward's; eval and inspect
read them."""
from __future__ import annotations

import json

import pytest
import torch

from qconvert.quant import bnb
from tests.helpers import one_line_error, quantized_then_f32, replaced_only_when_ours, run_cli

pytestmark = pytest.mark.kernel_free  # no GGUF blocks: the C pass covers it
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def awkward(n: int, k: int, dtype) -> torch.Tensor:
    """Rows from 1e-6 to 10 in size, an all-zero row, zeros and -0.0, an outlier, values on the
    midpoints between NF4 levels (times a block's maximum), an all-negative row."""
    g = torch.Generator().manual_seed(n * 31 + k)
    w = torch.randn(n, k, generator=g) * torch.logspace(-6, 1, n)[:, None]
    w[1] = 0.0
    w[0, :7] = 0.0
    w[0, 7:9] = -0.0
    w[2, 3] = 50.0
    lv = bnb.levels("nf4")
    mids = torch.cat([(lv[1:] + lv[:-1]) / 2, torch.ones(1)])
    w[3, :min(k, 16)] = mids[:min(k, 16)]
    w[4] = -w[4].abs()
    return w.to(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits (torch.equal takes -0.0 for 0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and \
        bytes(a.reshape(-1).contiguous().view(torch.uint8).numpy()) == bytes(b.reshape(-1).contiguous().view(torch.uint8).numpy())


def theirs_4bit(w: torch.Tensor, block: int, kind: str, double_quant: bool) -> dict[str, torch.Tensor]:
    import bitsandbytes.functional as F

    q, state = F.quantize_4bit(w, blocksize=block, compress_statistics=double_quant, quant_type=kind)
    return {"weight": q, **{"weight." + k: v for k, v in state.as_dict(packed=True).items()}}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 128), (33, 96), (5, 51), (300, 64)])
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("backend", ["c", "torch"])
def test_4bit_is_bitsandbytes(dtype, shape, kind, backend, monkeypatch):
    """Every tensor QuantState.as_dict(packed=True) gives (codes, absmax or its 8-bit codes,
    nested scales and maps, the JSON state) equal to ours, for every block size and with and
    without double quantization; a last short block, an odd number of weights (5 x 51), absmax blocks of
    256 and a short last one; our dequantization is bitsandbytes' reference one."""
    from bitsandbytes.backends.default import ops

    w = awkward(*shape, DTYPES[dtype])
    for block in (32, 64, 128, 256):
        for double_quant in (False, True):
            ref = theirs_4bit(w, block, kind, double_quant)
            ours = bnb.quantize_linear_4bit(w, block, kind, double_quant)
            assert set(ours) == set(ref)
            for k, v in ref.items():
                assert same(ours[k], v), (block, k)
            state = bnb.read_state(ours[f"weight.quant_state.bitsandbytes__{kind}"].numpy())
            absmax = ref["weight.absmax"].float()
            if double_quant:
                absmax = (ref["weight.nested_quant_map"][ref["weight.absmax"].long()]
                          * ref["weight.nested_absmax"].repeat_interleave(256)[:absmax.numel()]
                          + state["nested_offset"])
            expect = ops._dequantize_4bit_compute(ref["weight"].reshape(-1), absmax, bnb.levels(kind), block,
                                                  list(shape), torch.float32)
            assert torch.equal(bnb.dequantize_4bit(ours, state), expect)


def test_nested_quantization_is_bitsandbytes():
    """The 8-bit blockwise quantizer double quantization uses (bitsandbytes' C kernel, its lookup
    table over [-1, 1]) on 300k values: dense near 0, on the map's levels and midpoints, blocks
    all zero, a short last block."""
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(3)
    code = bnb.dynamic_map()
    assert torch.equal(code, F.create_dynamic_map(signed=True))
    mids = (code[1:] + code[:-1]) / 2
    v = torch.cat([torch.rand(100_000, generator=g) * 2 - 1, (torch.rand(100_000, generator=g) * 2 - 1) * 1e-3,
                   code, mids, torch.zeros(512), (torch.rand(99_491, generator=g) - 0.5) * 7])
    q, state = F.quantize_blockwise(v, blocksize=256)
    ours, scales = bnb.quantize_nested(v)
    assert same(ours, q) and same(scales, state.absmax)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_is_bitsandbytes(dtype):
    """LLM.int8()'s codes and row scales as Int8Params makes them (through float16), a zero row
    included."""
    import bitsandbytes as B

    w = awkward(40, 96, DTYPES[dtype])
    p = B.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weight=False)._quantize("cpu")
    codes, scb = bnb.quantize_int8(w)
    assert same(codes, p.data) and same(scb, p.SCB)
    assert torch.allclose(bnb.dequantize_int8(codes, scb), codes.float() * scb[:, None] / 127)


def transformers_save(src, out, target: str, double_quant: bool = True):
    """What transformers saves after loading `src` with the BitsAndBytesConfig `target` means."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if target == "int8":
        cfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=target, bnb_4bit_use_double_quant=double_quant)
    AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg).save_pretrained(out)
    return out


@pytest.mark.parametrize("family,dtype,target,args", [
    ("llama", "bfloat16", "nf4", []), ("qwen2", "float16", "fp4", ["--no-double-quant"]),
    ("gemma3", "float32", "nf4", []), ("granite", "bfloat16", "int8", []), ("qwen3", "float32", "int8", []),
    ("llama-tied", "float32", "fp4", [])])
def test_checkpoint_is_what_transformers_saves(tiny, tmp_path, capsys, family, dtype, target, args):
    """Every tensor of our checkpoint equal (dtype, shape, bytes) to transformers' own
    save_pretrained after loading the source with the matching BitsAndBytesConfig, its
    quantization_config equal to theirs; transformers loads ours, and its logits are our
    dequantized forward's within its own float noise; eval and inspect read it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src = tiny(family, dtype)
    out = tmp_path / target
    code, stdout, err = run_cli([src, "--to", target, "-o", out, "--json", *args], capsys)
    assert code == 0, err
    report = json.loads(stdout)["outputs"][0]
    assert report["method"] == target and report["checkpoint_format"] == "bitsandbytes"
    ref = transformers_save(src, tmp_path / "ref", target, double_quant="--no-double-quant" not in args)
    got, want = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert set(got) == set(want)
    for k, v in want.items():
        assert same(got[k], v), k
    cfg, ref_cfg = (json.loads((d / "config.json").read_text()) for d in (out, ref))
    assert cfg["quantization_config"] == ref_cfg["quantization_config"]
    assert cfg.get("dtype") == ref_cfg.get("dtype")

    from qconvert.evaluate import open_model

    ids = torch.tensor([[1, 5, 9, 22, 40, 7, 3, 11]])
    ours = open_model(str(out))
    with torch.no_grad():
        mine = ours.forward().logits(ids).float()
    ours.close()
    for exact in (True, False):
        m = AutoModelForCausalLM.from_pretrained(out)
        if exact:  # bitsandbytes' plain path: each weight dequantized to the model's dtype, then a product
            for mod in m.modules():
                if hasattr(mod, "support_avx512bf16_for_cpu"):
                    mod.support_avx512bf16_for_cpu = False
        with torch.no_grad():
            theirs = m(ids).logits.float()
        # transformers computes in the checkpoint's dtype, ours in float32; on CPUs with AVX512-BF16
        # bitsandbytes' default 4-bit path repacks the weights and multiplies in bfloat16; LLM.int8()
        # quantizes each token's activations to int8 (but for outlier columns) at run time
        tol = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}[dtype] if exact and target != "int8" else 5e-2
        assert ((theirs - mine).norm() / mine.norm()).item() < tol, exact

    code, stdout, err = run_cli(["inspect", out, "--json"], capsys)
    assert code == 0, err
    info = json.loads(stdout)
    assert info["quant_method"] == "bitsandbytes" and info["quantized_linears"] == report["n_linears"]
    assert {x["method"] for x in info["linears"]} == {target}


def test_block_size_and_compute_dtype(tiny, tmp_path, capsys):
    """--group-size is bitsandbytes' blocksize (transformers' config cannot choose it; its loader
    takes it from each linear's quant state), --compute-dtype its bnb_4bit_compute_dtype; values
    bitsandbytes refuses are usage errors; the options apply to nf4/fp4 only. (A model whose
    linears take whole blocks: bitsandbytes' CPU kernels misread blocks that span rows.)"""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qconvert.evaluate import open_model

    src = tiny("llama-wide", "float32")
    out = tmp_path / "nf4-128"
    code, stdout, err = run_cli([src, "--to", "nf4", "-o", out, "--group-size", "128", "--compute-dtype", "bfloat16",
                                 "--json"], capsys)
    assert code == 0, err
    got, weights = load_file(out / "model.safetensors"), load_file(src / "model.safetensors")
    prefix = "model.layers.1.mlp.down_proj"
    ref = theirs_4bit(weights[prefix + ".weight"], 128, "nf4", True)
    assert all(same(got[f"{prefix}.{k}"], v) for k, v in ref.items())
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["bnb_4bit_compute_dtype"] == "bfloat16" and json.loads(stdout)["outputs"][0]["group_size"] == 128
    m = AutoModelForCausalLM.from_pretrained(out)
    for mod in m.modules():
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False
    assert m.get_submodule(prefix).weight.quant_state.blocksize == 128
    assert m.get_submodule(prefix).compute_dtype == torch.bfloat16
    ids = torch.tensor([[1, 5, 9, 22, 40, 7, 3, 11]])
    ours = open_model(str(out))
    with torch.no_grad():
        theirs, mine = m(ids).logits.float(), ours.forward().logits(ids).float()
    ours.close()
    assert ((theirs - mine).norm() / mine.norm()).item() < 2e-2  # its products in bfloat16
    for bad, needle in ((["--group-size", "100"], "blocksize"), (["--compute-dtype", "int8"], "compute-dtype")):
        code, _, err = run_cli([src, "--to", "nf4", "-o", tmp_path / "x", *bad], capsys)
        assert code == 2
        one_line_error(err, needle)
    code, _, err = run_cli([src, "--to", "int8", "-o", tmp_path / "x", "--no-double-quant"], capsys)
    assert code == 2
    one_line_error(err, "--no-double-quant", "nf4")


def test_replaced_with_force_and_refused_for_experts(tiny, tmp_path, capsys):
    """--force replaces a previous qconvert bitsandbytes output (its shards' metadata names
    qconvert: the config has no room for it), not someone else's; a mixture of experts is
    refused in one line."""
    src = tiny("llama", "float32")
    replaced_only_when_ours(src, "int8", transformers_save(src, tmp_path / "theirs", "int8"),
                            tiny("qwen3moe", "float32"), tmp_path, capsys)
    code, _, err = run_cli([tiny("qwen3moe", "float32"), "--to", "nf4", "-o", tmp_path / "moe-nf4"], capsys)
    assert code == 2
    one_line_error(err, "mixture of experts")


def test_refuses_other_towers(tiny, tmp_path, capsys):
    """A checkpoint with a vision tower: transformers' bitsandbytes path would quantize its linears
    too, which qconvert does not yet; refused in one line, nothing written."""
    from safetensors.torch import load_file, save_file

    from tests.helpers import copy_model, files_in

    src = copy_model(tiny("llama", "float32"), tmp_path / "mm")
    tensors = load_file(src / "model.safetensors")
    tensors["model.vision_tower.encoder.fc.weight"] = torch.zeros(8, 8)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli([src, "--to", "nf4", "-o", tmp_path / "out"], capsys)
    assert code == 2
    one_line_error(err, "vision_tower", "nf4")
    assert files_in(tmp_path) == ["mm"]


@pytest.mark.parametrize("target", ["nf4", "int8"])
def test_bitsandbytes_checkpoint_as_input(tiny, tmp_path, capsys, target):
    """Our checkpoint (the bytes transformers saves) read as the source of another target: F32 GGUF
    tensors equal bitsandbytes' dequantization of each linear, exactly, and the report says the
    source was quantized."""
    from safetensors.torch import load_file

    q, gguf = quantized_then_f32(tiny("llama", "float32"), target, tmp_path, capsys, "bitsandbytes")
    parts = load_file(q / "model.safetensors")
    prefix = "model.layers.1.mlp.down_proj"
    mine = {k[len(prefix) + 1:]: v for k, v in parts.items() if k.startswith(prefix + ".")}
    if target == "int8":
        expect = bnb.dequantize_int8(mine["weight"], mine["SCB"])
    else:
        expect = bnb.dequantize_4bit(mine, bnb.read_state(mine["weight.quant_state.bitsandbytes__nf4"].numpy()))
    assert torch.equal(gguf["blk.1.ffn_down.weight"].reshape(expect.shape), expect)


@pytest.mark.parametrize("damage", ["nested_absmax", "nested_offset", "quant_map"])
def test_damaged_quant_state_is_an_input_error(tiny, tmp_path, capsys, damage):
    """A 4-bit linear whose double-quantization tensors or state do not fit (a short nested
    scale vector, a non-numeric offset, a short level table) is a one-line input error naming the
    linear, not a traceback from the dequantizer."""
    from safetensors.torch import load_file, save_file

    src = tiny("llama", "float32")
    q = tmp_path / "nf4"
    assert run_cli([src, "--to", "nf4", "-o", q], capsys)[0] == 0
    tensors = load_file(q / "model.safetensors")
    prefix = "model.layers.0.mlp.up_proj.weight"
    if damage == "nested_absmax":
        tensors[prefix + ".nested_absmax"] = torch.zeros(3)
    elif damage == "quant_map":
        tensors[prefix + ".quant_map"] = torch.zeros(8)
    else:
        key = prefix + ".quant_state.bitsandbytes__nf4"
        state = bnb.read_state(tensors[key].numpy())
        state["nested_offset"] = "x"
        tensors[key] = torch.frombuffer(bytearray(json.dumps(state).encode()), dtype=torch.uint8)
    save_file(tensors, q / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli([q, "--to", "f32", "-o", tmp_path / "out.gguf"], capsys)
    assert code == 3
    one_line_error(err, "model.layers.0.mlp.up_proj")


def test_force_refuses_a_directory_whose_shard_header_is_not_an_object(tiny, tmp_path, capsys):
    """--force looks for qconvert in the shard's metadata when the config has no `meta` (as
    bitsandbytes' has not); a header that is valid JSON but not an object names no quantizer, so
    the directory is left alone, in one line."""
    src = tiny("llama", "float32")
    other = transformers_save(src, tmp_path / "theirs", "int8")
    raw = b"[]      "
    (other / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    code, _, err = run_cli([src, "--to", "int8", "-o", other, "--force"], capsys)
    assert code != 0
    one_line_error(err, "qconvert")
    assert (other / "model.safetensors").read_bytes()[8:] == raw
