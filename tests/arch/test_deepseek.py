"""DeepSeek-V2/V3 (GGUF "deepseek2"): kv_b_proj split into attn_k_b and attn_v_b as llama.cpp's
converter splits it, MLA written as one KV head, DeepSeek's routing (softmax or sigmoid with the
correction bias and expert groups) as transformers computes it, the importance matrix of the
absorbed attention's per-head matrices as llama-imatrix collects it, and llama-quantize's
mixtures from our matrix."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from qconvert.calibrate import imatrix
from qconvert.calibrate.text import Calibration
from qconvert.families import family_for
from qconvert.read.checkpoint import open_checkpoint
from tests.helpers import assert_expert_statistics, convert_to, mixture_from_our_imatrix, router_choices
from tests.quant.test_recipes import numpy_spared


def hf_model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_gguf_tensors_are_the_converters(family, tiny, tmp_path):
    """attn_k_b [heads, latent, nope] holds each head's key rows of kv_b_proj transposed,
    attn_v_b [heads, value, latent] its value rows; no attn_kv_b; experts stacked; the shared
    experts, router and V3's correction bias under llama.cpp's names (bias and router F32); the
    MLA keys as the converter writes them (one KV head, key length latent + rope)."""
    src = tiny(family)
    out = convert_to(src, "f16", tmp_path / "f16.gguf").outputs[0]["path"]
    r = GGUFReader(out)
    t = {x.name: x for x in r.tensors}
    kv = {k: f.contents() for k, f in r.fields.items()}
    ckpt = open_checkpoint(str(src))
    c = ckpt.config.data
    n, nope, vd, rank = c["num_attention_heads"], c["qk_nope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    for i in range(c["num_hidden_layers"]):
        kv_b = ckpt.tensors[f"model.layers.{i}.self_attn.kv_b_proj.weight"].array().reshape(n, nope + vd, rank)
        k_b, v_b = np.asarray(t[f"blk.{i}.attn_k_b.weight"].data), np.asarray(t[f"blk.{i}.attn_v_b.weight"].data)
        assert k_b.shape == (n, rank, nope) and v_b.shape == (n, vd, rank)
        assert np.array_equal(k_b, kv_b[:, :nope].transpose(0, 2, 1).astype(np.float16))
        assert np.array_equal(v_b, kv_b[:, nope:].astype(np.float16))
        assert f"blk.{i}.attn_kv_b.weight" not in t
    assert t["blk.1.ffn_gate_inp.weight"].tensor_type.name == "F32"
    assert t["blk.1.ffn_gate_exps.weight"].data.shape[0] == c["n_routed_experts"]
    assert {"blk.1.ffn_gate_shexp.weight", "blk.1.ffn_up_shexp.weight", "blk.1.ffn_down_shexp.weight",
            "blk.0.ffn_gate.weight", "blk.1.attn_kv_a_mqa.weight", "blk.1.attn_q_a.weight", "blk.1.attn_q_b.weight",
            "blk.1.attn_q_a_norm.weight", "blk.1.attn_kv_a_norm.weight"} <= set(t)
    assert ("blk.1.exp_probs_b.bias" in t) == (family == "deepseek_v3")
    if family == "deepseek_v3":
        assert t["blk.1.exp_probs_b.bias"].tensor_type.name == "F32"
        assert kv["deepseek2.expert_gating_func"] == 2 and kv["deepseek2.expert_group_count"] == 4
        assert kv["deepseek2.expert_weights_norm"] is True
    assert kv["deepseek2.attention.head_count_kv"] == 1
    assert kv["deepseek2.attention.key_length"] == rank + c["qk_rope_head_dim"]
    assert kv["deepseek2.attention.value_length"] == rank
    assert kv["deepseek2.attention.key_length_mla"] == nope + c["qk_rope_head_dim"]
    assert kv["deepseek2.attention.value_length_mla"] == vd
    assert kv["deepseek2.leading_dense_block_count"] == 1
    assert kv["deepseek2.rope.dimension_count"] == c["qk_rope_head_dim"]
    assert kv["deepseek2.expert_weights_scale"] == pytest.approx(c["routed_scaling_factor"])
    ckpt.close()


@pytest.mark.kernel_free
@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_routing_and_statistics_are_transformers(family, tiny):
    """Each expert's importance sums are the squares of exactly the inputs of the tokens that
    transformers' router (V2 softmax; V3 sigmoid with the bias and groups) sends to it."""
    d = tiny(family)
    tokens = np.random.default_rng(0).integers(1, 200, size=(3, 24)).astype(np.int64)
    ckpt = open_checkpoint(str(d))
    fam = family_for(ckpt)
    _, rec = imatrix.collect(fam, Calibration(tokens, "test"), threads=2, int8=False)
    seen = router_choices(hf_model(d), tokens, ".mlp.gate", lambda out: out[2])
    assert seen
    for name, (x, chosen) in seen.items():
        layer = int(name.split(".")[2])
        flat = x.reshape(-1, x.shape[-1])
        assert_expert_statistics(rec, layer, flat, chosen, fam.n_experts)
        # the shared experts see every token
        assert rec.counts[f"blk.{layer}.ffn_up_shexp.weight"].tolist() == [flat.shape[0]]
    ckpt.close()


@pytest.mark.kernel_free
def test_absorbed_attention_statistics_are_per_head(tiny):
    """attn_k_b's sums: per head, each token's query without rope squared (what llama.cpp
    multiplies attn_k_b by); attn_v_b's: per head, the attention-weighted latent squared; one
    count each, the tokens (llama-imatrix's statistics of a dense 3-D matrix product). Computed
    here from transformers' own modules: q_b_proj's output, kv_a_layernorm's, the attention weights."""
    d = tiny("deepseek_v3")
    tokens = np.random.default_rng(1).integers(1, 200, size=(2, 20)).astype(np.int64)
    ckpt = open_checkpoint(str(d))
    fam = family_for(ckpt)
    _, rec = imatrix.collect(fam, Calibration(tokens, "test"), threads=2, int8=False)
    c = ckpt.config.data
    n, nope, rope = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"]
    model = hf_model(d)
    got: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if name.endswith(("q_b_proj", "kv_a_layernorm")):
            m.register_forward_hook(lambda mod, args, out, name=name: got.__setitem__(name, out))
        if name.endswith("self_attn"):
            m.register_forward_hook(lambda mod, args, out, name=name: got.__setitem__(name, out[1]))
    with torch.no_grad():
        model(torch.from_numpy(tokens), output_attentions=True)
    B, T = tokens.shape
    for i in range(c["num_hidden_layers"]):
        a = f"model.layers.{i}.self_attn"
        q_nope = got[a + ".q_b_proj"].view(B, T, n, nope + rope)[..., :nope]  # [B, T, heads, nope]
        expect_k = (q_nope.double() ** 2).sum((0, 1))  # [heads, nope]
        weighted = got[a] @ got[a + ".kv_a_layernorm"][:, None]  # [B, heads, T, latent]
        expect_v = (weighted.double() ** 2).sum((0, 2))
        for name, expect in ((f"blk.{i}.attn_k_b.weight", expect_k), (f"blk.{i}.attn_v_b.weight", expect_v)):
            assert torch.allclose(rec.sums[name], expect, rtol=1e-4, atol=1e-7), name
            assert rec.counts[name].tolist() == [B * T]
        assert f"blk.{i}.attn_kv_b.weight" not in rec.sums
    ckpt.close()


@pytest.mark.parametrize("recipe", numpy_spared(["q4_k_m", "q3_k_m", "iq3_m", "q2_k", "iq4_xs"]))
def test_mixtures_equal_llama_quantize_from_our_imatrix(recipe, tiny, tmp_path):
    """Our importance matrix given to llama_model_quantize with our f32 file: the same bytes as
    qconvert's one step, attn_k_b and attn_v_b quantized per head with their heads' rows of the
    matrix (their rows of 128 and 64 columns fall back from the K-quants as llama-quantize's)."""
    mixture_from_our_imatrix(tiny("deepseek_v3-wide"), recipe, tmp_path)


def test_multi_token_prediction_layers_are_left_out(tiny, tmp_path):
    """DeepSeek-V3's checkpoints carry a multi-token-prediction layer after the decoder's
    (model.layers.N with num_nextn_predict_layers 1): the converter leaves it out, and so do we."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    d = tmp_path / "mtp"
    shutil.copytree(tiny("deepseek_v3"), d)
    cfg = json.loads((d / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    cfg["num_nextn_predict_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    ts = load_file(d / "model.safetensors")
    ts.update({k.replace(f"layers.{n - 1}.", f"layers.{n}."): v for k, v in ts.items() if f"layers.{n - 1}." in k})
    ts[f"model.layers.{n}.eh_proj.weight"] = np.zeros((64, 128), np.float32)
    save_file(ts, d / "model.safetensors")
    a = convert_to(d, "f32", tmp_path / "a.gguf").outputs[0]["path"]
    b = convert_to(tiny("deepseek_v3"), "f32", tmp_path / "b.gguf").outputs[0]["path"]
    ta, tb = GGUFReader(a).tensors, GGUFReader(b).tensors
    assert [t.name for t in ta] == [t.name for t in tb]
    for x, y in zip(ta, tb):
        assert np.array_equal(np.asarray(x.data), np.asarray(y.data)), x.name


@pytest.mark.kernel_free
@pytest.mark.parametrize("family,method", [("deepseek_v3", "gptq"), ("deepseek_v2", "awq"), ("deepseek_v3", "awq")])
def test_gptq_and_awq_checkpoints_load_in_gptqmodel(family, method, tiny, tmp_path, capsys):
    """Every linear of the attention (q_a, q_b, kv_a, kv_b, o), the dense layer's MLP, every
    expert (per-expert names) and the shared experts quantized; the router and V3's correction
    bias kept float; GPTQModel loads the checkpoint and its logits equal our dequantized forward's
    (float16 noise). AWQ's groups: the input norm -> q_a and kv_a_proj_with_mqa, q_a's norm ->
    q_b, the latent's norm -> kv_b, then the mixture's. transformers 5.25 alone cannot load it:
    it holds DeepSeek's experts fused (3-D parameters, no Linear to quantize) and defuser, which
    GPTQModel applies, has no class patch for them; the README says so."""
    from safetensors import safe_open

    from tests.arch.test_moe_checkpoints import PARTS, decisive_ids, load_in_child
    from tests.test_gptq import make_gptq, our_logits, rel

    out = tmp_path / method
    r = make_gptq(tiny(family), out, capsys, "--group-size", "32", method=method)
    ckpt = open_checkpoint(str(tiny(family)))
    fam = family_for(ckpt)
    ckpt.close()
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        for i in range(1, fam.n_layers):
            p = f"model.layers.{i}.mlp."
            assert f.get_tensor(p + "gate.weight").dtype == torch.float16
            for e in range(fam.n_experts):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    assert {f"{p}experts.{e}.{proj}.{k}" for k in PARTS[method]} <= names
                    assert {f"{p}shared_experts.{proj}.{k}" for k in PARTS[method]} <= names
            if family == "deepseek_v3":
                assert f.get_tensor(p + "gate.e_score_correction_bias").dtype == torch.float32
        for proj in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
            assert f"model.layers.0.self_attn.{proj}.qweight" in names
    assert not any(n.endswith("gate.qweight") for n in names)
    assert r["n_linears"] == 5 * fam.n_layers + 3 + (fam.n_layers - 1) * (3 * fam.n_experts + 3)
    if method == "awq":
        groups = [g["linears"] for g in r["layers"][1]["groups"]]
        a = "model.layers.1.self_attn."
        assert [a + "q_a_proj", a + "kv_a_proj_with_mqa"] in groups
        assert [a + "q_b_proj"] in groups and [a + "kv_b_proj"] in groups
    # V2's softmax: its log's (the logits') gaps; V3's sigmoid scores plus bias, and its group ranks, as they are
    ids = decisive_ids(out, margin=0.05, log=True) if family == "deepseek_v2" else \
        decisive_ids(out, margin=0.01, log=False)
    ours = our_logits(out, ids)
    theirs = load_in_child(out, family, ids, False)
    assert rel(ours, torch.tensor(theirs["gptqmodel"])) < 5e-3


def deepseek_fp8_checkpoint(src, out):
    """`src` (a float V3 checkpoint, experts fused as transformers 5 saves them) as DeepSeek-V3
    ships it: experts one matrix each, every linear of the decoder layers F8_E4M3 with float32
    `weight_scale_inv` per 128 x 128 block (kv_a_proj_with_mqa's last row of blocks partial, as
    the real model's 576 rows make it), norms, router and embeddings as they were. Returns the
    float32 weights it decodes to: codes times their block's scale, the blocks cropped."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    ts = load_file(src / "model.safetensors")
    flat = {}
    for k, v in ts.items():
        if k.endswith("experts.gate_up_proj"):
            half = v.shape[1] // 2
            for e in range(v.shape[0]):
                flat[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = v[e, :half]
                flat[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = v[e, half:]
        elif k.endswith("experts.down_proj"):
            for e in range(v.shape[0]):
                flat[k.replace("down_proj", f"{e}.down_proj.weight")] = v[e]
        else:
            flat[k] = v
    out.mkdir()
    stored, decoded = {}, {}
    for k, v in flat.items():
        if not (k.startswith("model.layers.") and k.endswith(".weight") and "_proj" in k):
            stored[k] = v.contiguous()
            continue
        w = v.float()
        n, m = w.shape
        blocks = torch.nn.functional.pad(w, (0, -m % 128, 0, -n % 128)).view(-(-n // 128), 128, -(-m // 128), 128)
        scale = blocks.abs().amax((1, 3)).clamp_min(1e-12) / 448
        full = scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :m]
        codes = (w / full).to(torch.float8_e4m3fn)
        stored[k], stored[k + "_scale_inv"] = codes, scale
        decoded[k] = codes.float() * full
    assert stored["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape[0] * 128 > \
        stored["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].shape[0]  # a partial block row
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                  "weight_block_size": [128, 128]}
    (out / "config.json").write_text(json.dumps(cfg))
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, out / f.name)
    return {**{k: v for k, v in stored.items() if k not in decoded and not k.endswith("_scale_inv")}, **decoded}


def test_fp8_checkpoint_as_deepseek_ships_it(tiny, tmp_path, capsys):
    """DeepSeek-V3's own FP8 layout as input (per-expert FP8 matrices, 128 x 128 block scales,
    the partial last row of blocks of kv_a_proj_with_mqa): the GGUF files and the GPTQ checkpoint
    are those of the float checkpoint it decodes to, and the report says the source was FP8."""
    import json

    from safetensors.torch import save_file

    from tests.helpers import run_cli

    src = tiny("deepseek_v3-wide", "bfloat16")
    fp8 = tmp_path / "fp8"
    decoded = deepseek_fp8_checkpoint(src, fp8)
    ref = tmp_path / "float"
    ref.mkdir()
    save_file({k: v.contiguous() for k, v in decoded.items()}, ref / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((fp8 / "config.json").read_text())
    del cfg["quantization_config"]
    (ref / "config.json").write_text(json.dumps(cfg))
    for f in fp8.iterdir():
        if f.name.startswith("tokenizer"):
            (ref / f.name).write_bytes(f.read_bytes())
    reports = []
    for d, name in ((fp8, "a"), (ref, "b")):
        code, out, err = run_cli([d, "--to", "f16,q8_0,q4_k_m", "-o", tmp_path / name, "--json", "--calib-samples",
                                  "4", "--calib-seq-len", "64"], capsys)
        assert code == 0, err
        reports.append(json.loads(out))
    assert reports[0]["source_quantization"]["quant_method"] == "fp8"
    assert reports[0]["source_quantization"]["linears"] == 4 * 5 + 3 + 3 * (3 * 8 + 3)
    for a, b in zip(reports[0]["outputs"], reports[1]["outputs"]):
        ra, rb = GGUFReader(a["path"]), GGUFReader(b["path"])
        assert [t.name for t in ra.tensors] == [t.name for t in rb.tensors]
        for ta, tb in zip(ra.tensors, rb.tensors):
            assert ta.tensor_type == tb.tensor_type and np.array_equal(ta.data, tb.data), (a["path"], ta.name)


@pytest.mark.kernel_free
def test_forward_variants_equal_transformers(tmp_path):
    """The variants the tiny models leave out: V2-Lite's query without a bottleneck (q_proj) with
    V2-236B's group_limited_greedy routing (groups ranked by their best expert), and V3 with
    rope_interleave false (rotate-half): our forward equals transformers'."""
    import transformers as tf

    from tests.models import bpe_tokenizer
    from tests.oracles import assert_forward_equals_transformers

    ids = [list(range(1, 40))]
    common = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1, kv_lora_rank=32,
                  qk_nope_head_dim=24, qk_rope_head_dim=16, v_head_dim=32, num_experts_per_tok=2,
                  max_position_embeddings=256, initializer_range=0.08, tie_word_embeddings=False)
    for name, model in (
            ("v2-lite", lambda v: tf.DeepseekV2ForCausalLM(tf.DeepseekV2Config(
                vocab_size=v, q_lora_rank=None, n_routed_experts=8, n_shared_experts=2, topk_method="group_limited_greedy",
                n_group=4, topk_group=2, routed_scaling_factor=16.0, **common))),
            ("v3-halves", lambda v: tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(
                vocab_size=v, q_lora_rank=64, n_routed_experts=8, n_shared_experts=1, n_group=4, topk_group=2,
                rope_interleave=False, scoring_func="sigmoid", **common)))):
        d = tmp_path / name
        d.mkdir()
        vocab = bpe_tokenizer(d, "llama3", "<|begin_of_text|>", "<|end_of_text|>")["vocab_size"]
        torch.manual_seed(0)
        m = model(vocab).eval()
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("mlp.gate.weight"):
                    p.mul_(10)
        m.save_pretrained(d)
        ckpt = open_checkpoint(str(d))
        assert ("self_attn.q_proj" in str(list(ckpt.tensors))) == (name == "v2-lite")
        ckpt.close()
        assert_forward_equals_transformers(d, ids)


@pytest.mark.parametrize("family", ["deepseek_v3"])
def test_yarn_as_deepseek_v3_sets_it(family, tiny, tmp_path):
    """DeepSeek-V3's YaRN (factor 40 over 4096 positions, mscale = mscale_all_dim = 1, here
    factor 4 over 32): transformers folds mscale_all_dim into the softmax scale, llama.cpp reads it
    from rope.scaling.yarn_log_multiplier; our forward and llama.cpp on our f32 file both give
    transformers' logits."""
    import json

    from tests.helpers import copy_model
    from tests.oracles import assert_forward_equals_transformers, hf_logits, llama_logits, rel_rms

    d = copy_model(tiny(family), tmp_path / "yarn")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                              "mscale_all_dim": 1.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                              "beta_slow": 1}
    (d / "config.json").write_text(json.dumps(cfg))
    ids = list(range(1, 40))
    assert_forward_equals_transformers(d, [ids])
    f32 = convert_to(d, "f32", tmp_path / "yarn.gguf").outputs[0]["path"]
    assert GGUFReader(f32).fields["deepseek2.rope.scaling.yarn_log_multiplier"].contents() == pytest.approx(0.1)
    assert rel_rms(llama_logits(f32, ids), hf_logits(d, ids)) < 2e-3


@pytest.mark.kernel_free
@pytest.mark.parametrize("family,edit,needle", [
    ("deepseek_v3", {"n_group": "x"}, "n_group"),
    ("deepseek_v3", {"n_group": 3}, "must divide n_routed_experts"),
    ("deepseek_v3", {"topk_group": 5}, "topk_group (5) is more than n_group (4)"),
    ("deepseek_v3", {"scoring_func": [1]}, "scoring_func"),
    ("deepseek_v3", {"scoring_func": "relu"}, "scoring_func 'relu'"),
    ("deepseek_v3", {"num_experts_per_tok": 9}, "num_experts_per_tok (9) is more than the 8 experts"),
    ("qwen3moe", {"num_experts_per_tok": 9}, "num_experts_per_tok (9) is more than the 4 experts"),
])
def test_inconsistent_routing_configs_are_input_errors(family, edit, needle, tiny, tmp_path, capsys):
    """A router the config makes impossible: one line naming the config and the key, exit 3,
    nothing written (it was a torch error inside the calibration, exit 1)."""
    import json

    from tests.helpers import copy_model, one_line_error, run_cli

    d = copy_model(tiny(family), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **edit}))
    code, _, err = run_cli([d, "--to", "q4_k_m", "-o", tmp_path / "out.gguf", "--calib-samples", "2",
                            "--calib-seq-len", "32"], capsys)
    assert code == 3
    one_line_error(err, "config.json", needle)
    assert not (tmp_path / "out.gguf").exists()
