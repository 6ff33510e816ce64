"""Mixture-of-experts families (Qwen3-MoE, Mixtral): experts stacked as llama.cpp stacks them, the
importance matrix per expert as llama-imatrix keeps it, and llama-quantize's expert rules."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from qconvert.calibrate import imatrix
from qconvert.calibrate.text import Calibration
from qconvert.families import family_for
from qconvert.pipeline import CalibrationOptions, make_imatrix
from qconvert.read.checkpoint import open_checkpoint
from tests.helpers import assert_expert_statistics, convert_to, mixture_from_our_imatrix
from tests.quant.test_recipes import numpy_spared


@pytest.mark.parametrize("family", ["qwen3moe", "mixtral", "qwen2moe", "olmoe"])
def test_experts_are_stacked_in_expert_order(family, tiny, tmp_path):
    """blk.N.ffn_{gate,up,down}_exps.weight [experts, rows, columns] (GGUF lists them reversed),
    expert e's slice being the checkpoint's experts.e matrix; the router stays F32."""
    src = tiny(family)
    out = convert_to(src, "f32", tmp_path / "f32.gguf").outputs[0]["path"]
    tensors = {t.name: t for t in GGUFReader(out).tensors}
    ckpt = open_checkpoint(str(src))
    names = {"qwen3moe": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj"),
             "mixtral": ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3",
                         "block_sparse_moe.experts.{e}.w2")}.get(family, ("mlp.experts.{e}.gate_proj",
                                                                        "mlp.experts.{e}.up_proj",
                                                                        "mlp.experts.{e}.down_proj"))
    n = ckpt.config.data.get("num_experts") or ckpt.config.data["num_local_experts"]
    for layer in range(2):
        for kind, hf in zip(("gate", "up", "down"), names):
            t = tensors[f"blk.{layer}.ffn_{kind}_exps.weight"]
            data = np.asarray(t.data)
            assert data.shape[0] == n
            for e in range(n):
                expect = ckpt.tensors[f"model.layers.{layer}.{hf.format(e=e)}.weight"].array()
                assert np.array_equal(data[e], expect), (t.name, e)
        assert tensors[f"blk.{layer}.ffn_gate_inp.weight"].tensor_type == 0  # F32
    ckpt.close()
    assert not any(".experts." in name for name in tensors)


@pytest.mark.parametrize("family", ["qwen3moe", "mixtral", "qwen2moe", "olmoe"])
def test_expert_statistics_are_their_routed_tokens(family, tiny):
    """Each expert's importance statistics: the sums of squares of the inputs of exactly the tokens
    transformers routes to it, and their count (float32 products, so routing is the model's)."""
    import transformers

    d = tiny(family)
    tokens = np.random.default_rng(0).integers(1, 200, size=(3, 24)).astype(np.int64)
    ckpt = open_checkpoint(str(d))
    fam = family_for(ckpt)
    _, rec = imatrix.collect(fam, Calibration(tokens, "test"), threads=2, int8=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    blocks = {}
    for name, m in model.named_modules():
        if name.endswith((".mlp", ".block_sparse_moe")) and hasattr(m, "experts"):
            m.register_forward_pre_hook(lambda mod, args, name=name: blocks.__setitem__(name, args[0]))
    with torch.no_grad():
        model(torch.from_numpy(tokens))
    k = model.config.num_experts_per_tok
    for name, x in blocks.items():
        layer = int(name.split(".")[2])
        moe = model.get_submodule(name)
        flat = x.reshape(-1, x.shape[-1])
        router = getattr(moe, "gate", None) or moe.router
        w = router.weight if hasattr(router, "weight") else router.linear.weight
        chosen = torch.topk(torch.softmax(flat @ w.T, -1), k, -1).indices
        assert tuple(rec.sums[f"blk.{layer}.ffn_gate_exps.weight"].shape) == (fam.n_experts, flat.shape[1])
        assert_expert_statistics(rec, layer, flat, chosen, fam.n_experts)
        assert rec.counts[f"blk.{layer}.ffn_gate_inp.weight"].tolist() == [flat.shape[0]]
    ckpt.close()


def test_imatrix_file_has_llama_imatrix_layout(tiny, tmp_path):
    """in_sum2 [experts, columns] and counts [experts, 1] for an expert tensor (ne0 = columns,
    ne1 = experts in GGUF's order), [1, columns] and [1, 1] for the others."""
    path = tmp_path / "m.imatrix.gguf"
    make_imatrix(str(tiny("qwen3moe")), path, CalibrationOptions(samples=4, seq_len=32), 2, False)
    t = {x.name: x for x in GGUFReader(path).tensors}
    assert [int(v) for v in t["blk.0.ffn_down_exps.weight.in_sum2"].shape] == [32, 4]
    assert [int(v) for v in t["blk.0.ffn_down_exps.weight.counts"].shape] == [1, 4]
    assert [int(v) for v in t["blk.0.attn_q.weight.in_sum2"].shape] == [64, 1]
    counts = np.asarray(t["blk.0.ffn_gate_exps.weight.counts"].data).reshape(-1)
    assert counts.sum() == 4 * 32 * 2  # every token reaches 2 experts


@pytest.mark.parametrize("family,recipe", numpy_spared(
    [("qwen3moe-wide", r) for r in ("q4_k_m", "q2_k", "iq2_xxs", "iq3_m")]
    + [("mixtral-wide", r) for r in ("q4_k_m", "q3_k_m", "iq2_xs", "iq3_m", "q4_0")]
    + [("qwen2moe-wide", r) for r in ("q4_k_m", "q2_k_s", "iq2_m")]))
def test_mixtures_equal_llama_quantize_from_our_imatrix(family, recipe, tiny, tmp_path):
    """Our importance matrix file, read as llama-quantize reads it, given to llama_model_quantize
    with our f32 file: the same bytes as qconvert's one step from that file. Mixtral's 8 experts
    fire llama-quantize's 8-expert rules (attn_v and attn_k Q8_0, attn_output Q5_K), Qwen3-MoE's
    4 the IQ2 family's attn_v rule; expert FFN rules take the layer from the tensor's name."""
    a = mixture_from_our_imatrix(tiny(family), recipe, tmp_path)
    types = {name: t.tensor_type.name for name, t in a.items()}
    if family == "mixtral-wide" and recipe == "q4_k_m":
        assert types["blk.0.attn_v.weight"] == types["blk.0.attn_k.weight"] == "Q8_0"
        assert types["blk.0.attn_output.weight"] == "Q5_K"


def test_unreached_experts_weigh_one_and_are_reported(tiny, tmp_path):
    """An expert that no calibration token reaches: llama-quantize gives its columns importance 1
    (llama-imatrix writes the entry with count 0); qconvert does the same and says which."""
    src = tiny("qwen3moe")
    fam = family_for(open_checkpoint(str(src)))
    rec = imatrix.Collector(fam)
    rec.sums["blk.0.ffn_up_exps.weight"] = torch.full((4, 64), 8.0, dtype=torch.float64)
    rec.counts["blk.0.ffn_up_exps.weight"] = np.array([2, 0, 4, 1])
    im = rec.to_imatrix(tmp_path / "x", "test", 1, 8)
    w = im.for_tensor("blk.0.ffn_up_exps.weight", 64, 4)
    assert w[:, 0].tolist() == [4.0, 1.0, 2.0, 8.0]
    assert rec.unreached() == [("blk.0.ffn_up_exps.weight", 1)]


def test_checkpoint_targets_are_refused_for_experts(tiny, tmp_path, capsys):
    """FP8 and W8A8 checkpoints of a mixture of experts, and GPTQ and AWQ in compressed-tensors'
    layout, are not written yet: a usage error naming the target, before anything is computed or
    written (GGUF files alongside too)."""
    from tests.helpers import run_cli

    for target in ("fp8", "w8a8", "gptq --format compressed-tensors", "awq --format compressed-tensors"):
        code, _, err = run_cli([tiny("mixtral"), "--to", f"q8_0,{target.split()[0]}", *target.split()[1:],
                                "-o", tmp_path / "out"], capsys)
        assert code == 2 and f"--to {target}: MixtralForCausalLM is a mixture of experts" in err
    assert not (tmp_path / "out").exists()


def test_a_missing_or_misshapen_expert_is_an_input_error(tiny, tmp_path, capsys):
    """An expert's matrix missing, or of another shape than the config gives: one line naming it,
    exit 3, nothing written."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from tests.helpers import one_line_error, run_cli

    for case, edit in (("missing", lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.weight")),
                       ("shape", lambda t: t.__setitem__("model.layers.0.mlp.experts.3.down_proj.weight",
                                                         np.zeros((64, 16), np.float32)))):
        d = tmp_path / case
        shutil.copytree(tiny("qwen3moe"), d)
        tensors = load_file(d / "model.safetensors")
        edit(tensors)
        save_file(tensors, d / "model.safetensors")
        code, _, err = run_cli([d, "--to", "q8_0", "-o", tmp_path / f"out-{case}.gguf"], capsys)
        assert code == 3
        one_line_error(err, "experts.2.up_proj" if case == "missing" else "experts.3.down_proj")
        assert not (tmp_path / f"out-{case}.gguf").exists()


@pytest.mark.parametrize("family", ["qwen3moe", "qwen2moe", "olmoe", "mixtral"])
def test_fused_experts_read_as_their_matrices(family, tiny, tmp_path):
    """Experts saved fused, as transformers 5 holds them (mlp.experts.gate_up_proj [experts,
    2 ff, hidden], gate rows first; mlp.experts.down_proj [experts, hidden, ff]; Mixtral's
    block_sparse_moe renamed mlp, as transformers 5 names it): transformers
    loads that file, our forward gives its logits, llama.cpp runs our GGUF of it, and the GGUF
    tensors equal those made from the per-expert checkpoint."""
    from tests.helpers import copy_model
    from tests.models import fuse_experts
    from tests.oracles import hf_logits, llama_logits, rel_rms

    src = tiny(family)
    fused = copy_model(src, tmp_path / "fused")
    fuse_experts(fused)

    ids = list(range(1, 40))
    ref = hf_logits(fused, ids)
    assert rel_rms(hf_logits(src, ids), ref) < 1e-6  # transformers reads the fused file as the original
    ckpt = open_checkpoint(str(fused))
    ours = family_for(ckpt).forward().logits(torch.tensor([ids]))[0].numpy()
    ckpt.close()
    assert rel_rms(ours, ref) < 1e-5
    a = convert_to(fused, "f32", tmp_path / "a.gguf").outputs[0]["path"]
    b = convert_to(src, "f32", tmp_path / "b.gguf").outputs[0]["path"]
    assert rel_rms(llama_logits(a, ids), ref) < 2e-3
    ta, tb = GGUFReader(a).tensors, GGUFReader(b).tensors
    assert [t.name for t in ta] == [t.name for t in tb]
    for x, y in zip(ta, tb):
        assert np.array_equal(np.asarray(x.data), np.asarray(y.data)), x.name
