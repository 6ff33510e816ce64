"""Whole-file parity of qconvert's GGUF files with llama.cpp's convert_hf_to_gguf.py for the
families added after the first six: tiny random Qwen3-MoE, Mixtral, Qwen2-MoE, OLMoE, DeepSeek-V2
(V2-Lite's shape) and V3 (also as DeepSeek ships it: FP8 with 128 x 128 block scales, which the
converter dequantizes itself), gpt-oss (also as OpenAI ships it: experts as MXFP4 blocks, which
the converter copies into GGUF's MXFP4), Granite, SmolLM3, OLMo 2, Gemma 2 and Phi-3 checkpoints
(transformers' own configs, bf16, saved as transformers saves them; Phi-3 twice: as Phi-3 with
LongRoPE and a sentencepiece tokenizer, and shaped as Phi-4-mini with a GPT2Tokenizer) that carry
a tokenizer the converter knows (Qwen2.5's for the Qwens, OLMoE, Granite, OLMo 2 and Phi-4,
SmolLM2's for Mixtral, DeepSeek, gpt-oss and SmolLM3, from ../shared/tools/real-models.sh; small
sentencepiece models for Gemma 2 and Phi-3, whose converters read tokenizer.model), converted by
both to f32, f16, bf16 and q8_0; every tensor (name, type, shape, bytes) and every key/value
compared (bench/parity.py's compare). Then the importance matrices both ways (the mixtures of
experts at 8 experts per layer; the Qwens once more with their experts saved fused, as
transformers 5 holds them): llama-imatrix's matrix of the converter's f32 file, given to
`qconvert --imatrix` and to llama-quantize, and qconvert's own (`qconvert imatrix`), given to both
again: q4_k_m and iq3_m files whole-file identical.

usage: python bench/parity_families.py [FAMILY ...]
"""
from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# transformers imports the `kernels` package, which bench/kernels.py would shadow: import its
# modules before bench/ is on the path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
import transformers  # noqa: E402
import transformers.activations  # noqa: E402,F401

sys.path.insert(0, str(ROOT / "bench"))
from common import IMATRIX, QUANTIZE, REAL, need_reference, qconvert_cmd, reference_convert_cmd  # noqa: E402
from parity import compare  # noqa: E402


MOE = ("qwen3moe", "mixtral", "qwen2moe", "olmoe", "qwen3moe-fused", "qwen2moe-fused", "deepseek_v2-lite",
       "deepseek_v3", "deepseek_v3-fp8", "gpt_oss", "gpt_oss-mxfp4")
DENSE = ("granite", "smollm3", "olmo2", "olmo3", "gemma2", "phi3", "phi4")


def build(family: str, out: Path) -> Path:
    import torch

    if family.endswith("-fp8"):  # the same model as DeepSeek-V3 ships its weights: FP8, 128 x 128 block scales
        from tests.arch.test_deepseek import deepseek_fp8_checkpoint

        deepseek_fp8_checkpoint(build(family.removesuffix("-fp8"), out.with_name(out.name + "-float")), out)
        return out
    if family.endswith("-mxfp4"):  # the same model as OpenAI ships gpt-oss: experts as MXFP4 blocks
        from tests.arch.test_gpt_oss import mxfp4_checkpoint

        return mxfp4_checkpoint(build(family.removesuffix("-mxfp4"), out.with_name(out.name + "-float")), out)
    if family.endswith("-fused"):  # the same model, its experts saved fused
        from tests.models import fuse_experts

        build(family.removesuffix("-fused"), out)
        fuse_experts(out)
        return out

    out.mkdir(parents=True, exist_ok=True)
    if family in ("gemma2", "phi3"):
        from tests.models import build as tiny_model, spm_tokenizer

        if family == "phi3":  # the tests' tiny Phi-3 tokenizer: added tokens past the sentencepiece model
            tiny_model("phi3", out)
            vocab = json.loads((out / "config.json").read_text())["vocab_size"]
        else:
            vocab = spm_tokenizer(out)["vocab_size"]
    else:
        small = family in ("mixtral", "smollm3") or family.startswith(("deepseek", "gpt_oss"))
        tok = REAL / "hf" / ("smollm2-135m" if small else "qwen2.5-0.5b")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok / f, out / f)
        vocab = 49152 if small else 151936
        if family == "phi4":  # Phi-4's GPT2Tokenizer path of the converter
            tcfg = json.loads((out / "tokenizer_config.json").read_text())
            (out / "tokenizer_config.json").write_text(json.dumps({**tcfg, "tokenizer_class": "GPT2Tokenizer"}))
    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=4096, tie_word_embeddings=False)
    moe = dict(common, num_experts_per_tok=2)
    torch.manual_seed(0)
    if family == "olmoe":  # as many kv heads as heads: llama.cpp loads OLMoE's k norm as [hidden]
        model = transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
            intermediate_size=32, num_experts=8, **{**moe, "num_key_value_heads": 4}))
    elif family == "qwen2moe":
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8, **moe))
    elif family == "qwen3moe":
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            intermediate_size=128, moe_intermediate_size=32, num_experts=8, head_dim=16, norm_topk_prob=True, **moe))
    elif family == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(intermediate_size=32, num_local_experts=8,
                                                                           **moe))
    elif family == "deepseek_v2-lite":  # DeepSeek-V2-Lite's shape: no query bottleneck, 26 layers (llama.cpp
        # reads q_lora_rank but for the Lite models' 26/27), softmax routing, 2 shared experts
        model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(
            intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2,
            first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=24, qk_rope_head_dim=16,
            v_head_dim=32, **{**moe, "num_hidden_layers": 26, "num_key_value_heads": 4}))
    elif family == "deepseek_v3":  # DeepSeek-V3's: query bottleneck, sigmoid routing over expert groups with
        # the correction bias, YaRN as its config.json writes it (rope_scaling, mscale_all_dim)
        model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
            intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, n_group=4,
            topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=64, kv_lora_rank=32,
            qk_nope_head_dim=24, qk_rope_head_dim=16, v_head_dim=32, **{**moe, "num_hidden_layers": 3,
                                                                          "num_key_value_heads": 4}))
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.copy_(torch.randn(b.shape) * 0.05)
    elif family == "gpt_oss":  # sinks, windows of 16, gpt-oss's own YaRN (truncate false), 8 experts with biases
        model = transformers.GptOssForCausalLM(transformers.GptOssConfig(
            intermediate_size=32, num_local_experts=8, head_dim=16, sliding_window=16,
            **{**moe, "num_hidden_layers": 3}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("bias", "sinks")):
                    p.copy_(torch.randn(p.shape) * 0.1)
    elif family == "granite":  # Granite 3.3 2B's multipliers
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(
            intermediate_size=128, embedding_multiplier=12.0, attention_multiplier=0.015625,
            residual_multiplier=0.22, logits_scaling=8.0, **common))
    elif family == "smollm3":  # 4 layers: the 4th without rope
        model = transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(
            intermediate_size=128, pad_token_id=None, bos_token_id=None, eos_token_id=None,
            **{**common, "num_hidden_layers": 4}))
    elif family == "olmo2":
        model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(intermediate_size=128, pad_token_id=None,
                                                                       **common))
    elif family == "olmo3":  # 3 sliding layers and a full one, rope set per layer type
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 500000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 500000.0}}
        model = transformers.Olmo3ForCausalLM(transformers.Olmo3Config(
            intermediate_size=128, pad_token_id=None, sliding_window=16, rope_parameters=rope,
            **{**common, "num_hidden_layers": 4}))
    elif family == "phi3":  # LongRoPE on half of each head, as many kv heads as heads
        cfg = json.loads((out / "config.json").read_text())
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**{
            **common, "intermediate_size": 128, "num_key_value_heads": 4, "max_position_embeddings": 1024,
            "original_max_position_embeddings": 256, "rope_parameters": cfg["rope_parameters"], "pad_token_id": 0,
            "bos_token_id": 2, "eos_token_id": 1, "sliding_window": None}))
    elif family == "phi4":  # Phi-4-mini's shape: rope on 3/4 of each head, grouped kv heads, tied head
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**{
            **common, "intermediate_size": 128, "rope_parameters": {"rope_type": "default", "rope_theta": 250000.0,
                                                                    "partial_rotary_factor": 0.75},
            "original_max_position_embeddings": 4096, "pad_token_id": None, "bos_token_id": None,
            "eos_token_id": None, "sliding_window": None, "tie_word_embeddings": True}))
    else:
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            intermediate_size=128, head_dim=16, query_pre_attn_scalar=16, sliding_window=16, pad_token_id=0,
            eos_token_id=1, bos_token_id=2, **{**common, "num_hidden_layers": 3, "tie_word_embeddings": True}))
    model.to(torch.bfloat16).save_pretrained(out)
    if family == "deepseek_v3":
        cfg = json.loads((out / "config.json").read_text())
        cfg.pop("rope_parameters", None)
        cfg.update(rope_theta=10000, max_position_embeddings=163840, scoring_func="sigmoid", topk_method="noaux_tc",
                   rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                                 "original_max_position_embeddings": 4096, "type": "yarn"})
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def main() -> int:
    need_reference()
    from tests.helpers import convert_to

    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for family in sys.argv[1:] or MOE + DENSE:
            src = build(family, tmp / family)
            for outtype in ("f32", "f16", "bf16", "q8_0"):
                ref = tmp / f"{family}-ref-{outtype}.gguf"
                subprocess.run(reference_convert_cmd(src, outtype, ref), check=True, capture_output=True)
                ours = convert_to(src, outtype, tmp / f"{family}-ours-{outtype}.gguf").outputs[0]["path"]
                problems = compare(ours, ref)
                bad += bool(problems)
                print(f"{family:9s} {outtype:5s} {'identical, tensor for tensor and key for key' if not problems else problems[:5]}")
            bad += imatrices(src, tmp / f"{family}-ref-f32.gguf", tmp / family)
    return 1 if bad else 0


def mean_ratios(name: str, theirs: Path, ours: Path) -> None:
    """Per kind of tensor (attn_q, ffn_down_exps ...), the range over layers of the mean of
    llama-imatrix's entries over the mean of ours, on the same text: the two matrices' scale
    (their columns differ as the tools' token streams do)."""
    from qconvert.read.imatrix import load_imatrix

    a, b = load_imatrix(theirs).entries, load_imatrix(ours).entries
    kinds: dict[str, list[float]] = {}
    for k in sorted(set(a) & set(b)):
        kinds.setdefault(k.split(".", 2)[2], []).append(float(a[k].mean() / b[k].mean()))
    only = sorted(set(a) ^ set(b))
    print(f"{name:9s} importance matrices: {len(a)} tensors each{', differing in ' + str(only[:3]) if only else ''}; "
          "mean ratio llama-imatrix / qconvert by kind: "
          + ", ".join(f"{kind.removesuffix('.weight')} {min(r):.3f}-{max(r):.3f}" for kind, r in sorted(kinds.items())))


def imatrices(src: Path, f32: Path, tmp: Path) -> int:
    """llama-imatrix's matrix and ours, each given to llama-quantize and to qconvert: the same files."""
    calib = ROOT / "qconvert" / "calibrate" / "data" / "emma.txt"
    theirs, ours = tmp / "llama.imatrix.gguf", tmp / "ours.imatrix.gguf"
    subprocess.run([str(IMATRIX), "-m", str(f32), "-f", str(calib), "-o", str(theirs), "-c", "128", "--chunks", "8",
                    "-t", "2"], check=True, capture_output=True)
    subprocess.run(qconvert_cmd() + ["imatrix", str(src), "-o", str(ours), "-q", "--calib-samples", "8",
                                     "--calib-seq-len", "128"], check=True, capture_output=True)
    mean_ratios(src.name, theirs, ours)
    bad = 0
    for im in (theirs, ours):
        for recipe in ("q4_k_m", "iq3_m") + (("mxfp4_moe",) if src.name.startswith("gpt_oss") else ()):
            ref, mine = tmp / f"ref-{im.stem}-{recipe}.gguf", tmp / f"ours-{im.stem}-{recipe}.gguf"
            # --allow-requantize: gpt-oss's MXFP4 experts are already quantized in the converter's file
            subprocess.run([str(QUANTIZE), "--allow-requantize", "--imatrix", str(im), str(f32), str(ref),
                            recipe.upper(), "2"], check=True, capture_output=True)
            subprocess.run(qconvert_cmd() + [str(src), "--to", recipe, "-o", str(mine), "-q", "--imatrix", str(im)],
                           check=True, capture_output=True)
            same = filecmp.cmp(ref, mine, shallow=False)
            bad += not same
            who = "llama-imatrix's" if im == theirs else "qconvert's"
            print(f"{src.name:9s} {recipe:6s} from {who} importance matrix: whole file "
                  f"{'identical to llama-quantize' if same else 'DIFFERS'}")
    return bad


if __name__ == "__main__":
    sys.exit(main())
