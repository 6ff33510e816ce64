"""gpt-oss (GGUF "gpt-oss"): the fused, interleaved experts split and transposed as llama.cpp's
converter splits them, biases stacked beside them, sinks; OpenAI's MXFP4 checkpoints read (their
blocks copied into GGUF's MXFP4 as the converter copies them) and decoded as transformers
decodes them; the mxfp4_moe mixture and the K-quant mixtures equal to llama-quantize's."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from qconvert.calibrate import imatrix
from qconvert.calibrate.text import Calibration
from qconvert.families import family_for
from qconvert.quant import blocks
from qconvert.read.checkpoint import open_checkpoint
from tests.helpers import (assert_expert_statistics, assert_same_gguf_tensors, convert_to, copy_model,
                           mixture_from_our_imatrix, one_line_error, router_choices, run_cli)
from tests.oracles import assert_forward_equals_transformers, hf_logits, llama_logits, rel_rms
from tests.quant.test_recipes import FTYPES, llama_quantize

IDS = list(range(1, 40))  # past the window of 16


def hf_model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def mxfp4_checkpoint(src, out):
    """The checkpoint as OpenAI ships gpt-oss: each layer's experts as MXFP4 blocks and scales
    (quantized by ggml's own quantizer, repacked into the checkpoint's nibble order), the rest
    as it was, quant_method mxfp4."""
    from safetensors.torch import load_file, save_file

    from tests.oracles import ggml_quantize

    out = copy_model(src, out)
    ts = load_file(str(out / "model.safetensors"))
    new = {}
    for name, a in ts.items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            new[name] = a
            continue
        w = np.ascontiguousarray(a.float().numpy().transpose(0, 2, 1))  # [experts, out, in]
        E, rows, cols = w.shape
        g = ggml_quantize(39, w.reshape(-1, cols)).reshape(E, rows, cols // 32, 17)  # GGML_TYPE_MXFP4
        codes = np.stack((g[..., 1:] & 0x0F, g[..., 1:] >> 4), axis=-2).reshape(E, rows, cols // 32, 32)
        new[name + "_blocks"] = torch.from_numpy(np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4),
                                                                      dtype=np.uint8))
        new[name + "_scales"] = torch.from_numpy(np.ascontiguousarray(g[..., 0], dtype=np.uint8))
    save_file(new, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4",
                                  "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                             "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_gguf_tensors_are_the_converters(tiny, tmp_path):
    """ffn_gate_exps / ffn_up_exps [experts, ff, hidden]: gate_up_proj's even and odd columns
    transposed; ffn_down_exps its down_proj transposed; each with its bias [experts, ff]; the
    router ffn_gate_inp with its bias; attn_sinks; post_attention_layernorm as post_attention_norm;
    the window and expert width in the metadata."""
    src = tiny("gpt_oss")
    out = convert_to(src, "f32", tmp_path / "f32.gguf").outputs[0]["path"]
    r = GGUFReader(out)
    t = {x.name: np.asarray(x.data) for x in r.tensors}
    kv = {k: f.contents() for k, f in r.fields.items()}
    ckpt = open_checkpoint(str(src))
    raw = {n: torch.from_numpy(np.asarray(x.array())).float().numpy() for n, x in ckpt.tensors.items()}
    for i in range(3):
        m = f"model.layers.{i}.mlp.experts."
        gate_up, bias = raw[m + "gate_up_proj"], raw[m + "gate_up_proj_bias"]
        assert np.array_equal(t[f"blk.{i}.ffn_gate_exps.weight"], gate_up[:, :, 0::2].transpose(0, 2, 1))
        assert np.array_equal(t[f"blk.{i}.ffn_up_exps.weight"], gate_up[:, :, 1::2].transpose(0, 2, 1))
        assert np.array_equal(t[f"blk.{i}.ffn_down_exps.weight"], raw[m + "down_proj"].transpose(0, 2, 1))
        assert np.array_equal(t[f"blk.{i}.ffn_gate_exps.bias"], bias[:, 0::2])
        assert np.array_equal(t[f"blk.{i}.ffn_up_exps.bias"], bias[:, 1::2])
        assert np.array_equal(t[f"blk.{i}.ffn_down_exps.bias"], raw[m + "down_proj_bias"])
        assert np.array_equal(t[f"blk.{i}.attn_sinks.weight"], raw[f"model.layers.{i}.self_attn.sinks"])
        assert np.array_equal(t[f"blk.{i}.ffn_gate_inp.bias"], raw[f"model.layers.{i}.mlp.router.bias"])
        assert f"blk.{i}.post_attention_norm.weight" in t
    assert kv["general.architecture"] == "gpt-oss"
    assert kv["gpt-oss.attention.sliding_window"] == 16 and kv["gpt-oss.expert_feed_forward_length"] == 32
    assert kv["gpt-oss.expert_count"] == 4 and kv["gpt-oss.expert_used_count"] == 2
    assert kv["gpt-oss.rope.scaling.type"] == "yarn"
    ckpt.close()


@pytest.mark.kernel_free  # no GGUF blocks: the C pass covers it
def test_forward_with_gpt_oss_own_rope_equals_transformers(tiny, tmp_path):
    """gpt-oss's published rope (YaRN 32x from 4096, correction range not rounded: truncate
    false), which llama.cpp rounds out; ours follows transformers on the checkpoint."""
    d = copy_model(tiny("gpt_oss"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                              "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096}
    cfg["max_position_embeddings"] = 131072
    (d / "config.json").write_text(json.dumps(cfg))
    assert_forward_equals_transformers(d, [IDS])


@pytest.mark.kernel_free  # no GGUF blocks: the C pass covers it
def test_routing_and_statistics_are_transformers(tiny):
    """Each expert's importance sums are the squares of exactly the inputs of the tokens that
    transformers' router (top k of the biased logits) sends to it, k of them per token."""
    d = tiny("gpt_oss")
    tokens = np.random.default_rng(0).integers(1, 200, size=(3, 24)).astype(np.int64)
    ckpt = open_checkpoint(str(d))
    fam = family_for(ckpt)
    _, rec = imatrix.collect(fam, Calibration(tokens, "test"), threads=2, int8=False)
    seen = router_choices(hf_model(d), tokens, ".mlp.router", lambda out: out[-1])
    assert len(seen) == 3
    for name, (x, chosen) in seen.items():
        layer = int(name.split(".")[2])
        flat = x.reshape(-1, x.shape[-1])
        assert rec.counts[f"blk.{layer}.ffn_gate_exps.weight"].sum() == flat.shape[0] * 2
        assert_expert_statistics(rec, layer, flat, chosen, fam.n_experts)
    ckpt.close()


def test_mxfp4_checkpoint_reads_as_transformers_and_copies_its_blocks(tiny, tmp_path):
    """OpenAI's layout: our forward on the MXFP4 checkpoint equals transformers' (which decodes
    the blocks itself); a GGUF of any float type copies the experts' blocks into GGUF's MXFP4
    (the converter's repack), which llama.cpp runs to the same logits, and whose values are
    the checkpoint's decoded experts; mxfp4_moe copies them too, Q8_0 elsewhere."""
    src = tiny("gpt_oss")
    mx = mxfp4_checkpoint(src, tmp_path / "mx")
    assert_forward_equals_transformers(mx, [IDS])
    files = {o["target"]: o["path"] for o in convert_to(mx, "f32,mxfp4_moe", tmp_path / "out").outputs}
    ref = hf_logits(mx, IDS)
    # llama.cpp multiplies MXFP4 matrices with activations rounded to Q8_0 (MXFP4's vec_dot
    # type): about 1% RMS here, measured; a wrong nibble order or exponent is tens of percent
    got = llama_logits(files["f32"], IDS)
    assert rel_rms(got, ref) < 0.03 and (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
    quant = {t.name: t for t in GGUFReader(files["mxfp4_moe"]).tensors}
    for t in GGUFReader(files["f32"]).tensors:
        q = quant[t.name]
        if "_exps.weight" in t.name:
            assert t.tensor_type.name == q.tensor_type.name == "MXFP4", t.name
            assert np.array_equal(np.asarray(t.data), np.asarray(q.data)), t.name
        elif t.tensor_type.name == "F32" and len(t.shape) > 1 and t.name.endswith(".weight") \
                and "norm" not in t.name and "ffn_gate_inp" not in t.name:
            assert q.tensor_type.name == "Q8_0", t.name
    # the copied blocks hold exactly the checkpoint's decoded experts
    ckpt = open_checkpoint(str(mx))
    fam = family_for(ckpt)
    gate = ckpt.tensors["model.layers.1.mlp.experts.2.gate_proj.weight"].array()
    f32 = {t.name: t for t in GGUFReader(files["f32"]).tensors}["blk.1.ffn_gate_exps.weight"]
    data = np.asarray(f32.data)[2]
    assert np.array_equal(blocks.MXFP4.dequantize(data.view(np.uint8), gate.shape), gate)
    assert fam.n_experts == 4
    ckpt.close()


def test_mxfp4_moe_equals_llama_quantize(tiny, tmp_path):
    """mxfp4_moe from a float checkpoint: llama_model_quantize's bytes from our f32 file
    (experts quantized to MXFP4 by ggml's rule, everything else Q8_0, the output too)."""
    src = tiny("gpt_oss-wide")
    f32 = convert_to(src, "f32", tmp_path / "f32.gguf").outputs[0]["path"]
    ref = tmp_path / "ref.gguf"
    llama_quantize(f32, ref, FTYPES["mxfp4_moe"])
    ours = convert_to(src, "mxfp4_moe", tmp_path / "ours.gguf").outputs[0]["path"]
    got = assert_same_gguf_tensors(ours, ref)
    assert got["blk.0.ffn_down_exps.weight"].tensor_type.name == "MXFP4"
    assert got["output.weight"].tensor_type.name == "Q8_0"


@pytest.mark.parametrize("recipe", ["q4_k_m", "q3_k_m", "iq4_xs"])
def test_mixtures_equal_llama_quantize_from_our_imatrix(recipe, tiny, tmp_path):
    """Our importance matrix given to llama_model_quantize with our f32 file: the same bytes as
    qconvert's one step (the experts per expert from their routed tokens' rows)."""
    mixture_from_our_imatrix(tiny("gpt_oss-wide"), recipe, tmp_path)


@pytest.mark.kernel_free
@pytest.mark.parametrize("edit,needle", [
    ({"swiglu_limit": 5.0}, "swiglu_limit"),
    ({"layer_types": ["full_attention", "sliding_attention", "full_attention"]}, "layer_types"),
])
def test_configs_llama_cpp_cannot_run_are_input_errors(edit, needle, tiny, tmp_path, capsys):
    d = copy_model(tiny("gpt_oss"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(edit)
    (d / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli([str(d), "--to", "q8_0", "-o", str(tmp_path / "x.gguf")], capsys)
    assert code == 3
    one_line_error(err, needle)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.kernel_free  # no GGUF blocks: the C pass covers it
def test_gptq_and_awq_are_refused(tiny, tmp_path, capsys):
    """Not built yet: a usage error naming the family, before any compute."""
    for method in ("gptq", "awq"):
        code, _, err = run_cli([str(tiny("gpt_oss")), "--to", method, "-o", str(tmp_path / method)], capsys)
        assert code == 2, err
        one_line_error(err, "gpt-oss")
        assert not (tmp_path / method).exists()


@pytest.mark.kernel_free  # no GGUF blocks: the C pass covers it
def test_broken_mxfp4_checkpoints_are_input_errors(tiny, tmp_path, capsys):
    """Scales missing, blocks of the wrong type or shape, and a NaN exponent (E8M0's 255): one
    line naming the file and the tensor, exit 3, no output left."""
    from safetensors.torch import load_file, save_file

    mx = mxfp4_checkpoint(tiny("gpt_oss"), tmp_path / "mx")
    good = load_file(str(mx / "model.safetensors"))
    name = "model.layers.1.mlp.experts.down_proj"
    nan_scales = good[name + "_scales"].clone()
    nan_scales[2, 5, 0] = 255
    for case, edit, needle in (
            ("no-scales", lambda t: t.pop(name + "_scales"), "down_proj_scales"),
            ("int8-blocks", lambda t: t.__setitem__(name + "_blocks", t[name + "_blocks"].to(torch.int8)), "MXFP4 tensor"),
            ("short-scales", lambda t: t.__setitem__(name + "_scales", t[name + "_scales"][:, :-1].contiguous()), "MXFP4 tensor"),
            ("nan-exponent", lambda t: t.__setitem__(name + "_scales", nan_scales), "experts.2.down_proj")):
        d = copy_model(mx, tmp_path / case)
        ts = dict(good)
        edit(ts)
        save_file(ts, str(d / "model.safetensors"), metadata={"format": "pt"})
        out = tmp_path / f"{case}.gguf"
        code, _, err = run_cli([str(d), "--to", "f16", "-o", str(out)], capsys)
        assert code == 3, (case, err)
        one_line_error(err, needle)
        assert str(d) in err
        assert not out.exists() and not list(tmp_path.glob(f"{case}.gguf*"))


@pytest.mark.kernel_free  # no GGUF blocks: the C pass covers it
def test_inspect_reads_an_mxfp4_checkpoint(tiny, tmp_path, capsys):
    """`qconvert inspect` names the method and counts two weights per byte of blocks: the
    checkpoint's parameters are the float one's, its bits per weight below 16."""
    src = tiny("gpt_oss")
    mx = mxfp4_checkpoint(src, tmp_path / "mx")
    code, out, err = run_cli(["inspect", str(mx), "--json"], capsys)
    assert code == 0, err
    got = json.loads(out)
    code, out, err = run_cli(["inspect", str(src), "--json"], capsys)
    base = json.loads(out)
    assert got["quant_method"] == "mxfp4" and got["n_params"] == base["n_params"]
    assert got["bits_per_weight"] < base["bits_per_weight"]
