"""Tiny random models of every family, built the way their authors' tools save them:
transformers writes config.json and safetensors, a tokenizer is trained on the spot."""
from __future__ import annotations

import json
import re
from pathlib import Path

from tests.text import TEXT

LLAMA3_RE = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
             "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_RE = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
            "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bpe_tokenizer(out: Path, style: str, bos: str | None, eos: str, vocab_size: int = 400) -> dict[str, int]:
    """Train a byte-level BPE tokenizer.json in one of the pre-tokenizer styles llama.cpp knows."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style in ("gpt2", "smollm"))
    if style == "gpt2":
        tok.pre_tokenizer = byte_level
    elif style == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        regex = {"llama3": LLAMA3_RE, "qwen2": QWEN2_RE}[style]
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    specials = [s for s in (bos, eos, "<|im_start|>", "<|im_end|>") if s]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 4, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": bos,
           "add_bos_token": bool(bos), "add_eos_token": False, "clean_up_tokenization_spaces": False,
           "model_max_length": 256, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    ids = {s: tok.token_to_id(s) for s in specials}
    ids["vocab_size"] = tok.get_vocab_size()
    return ids


def spm_tokenizer(out: Path, vocab_size: int = 320) -> dict[str, int]:
    """Train a SentencePiece tokenizer.model (Gemma/Llama-2 style: <pad> <eos> <bos> <unk>)."""
    import io

    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.splitlines() * 3), model_writer=buf,
                                   vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
                                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, character_coverage=1.0, add_dummy_prefix=False,
                                   minloglevel=2)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    cfg = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
           "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return {"vocab_size": vocab_size, "<s>": 2, "</s>": 1, "<pad>": 0}


def fuse_experts(out: Path) -> None:
    """Rewrite a saved checkpoint's experts fused, as transformers 5 holds them: per layer
    mlp.experts.gate_up_proj [experts, 2 ff, hidden] (gate rows first) and mlp.experts.down_proj."""
    import torch
    from safetensors.torch import load_file, save_file

    ts = load_file(str(out / "model.safetensors"))
    # Mixtral's legacy names (block_sparse_moe.gate, experts.E.w1/w3/w2) as transformers 5 names them
    proj = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    ts = {re.sub(r"\.experts\.(\d+)\.(w[123])\.", lambda m: f".experts.{m[1]}.{proj[m[2]]}.",
                 k.replace(".block_sparse_moe.", ".mlp.")): v for k, v in ts.items()}
    n = 1 + max(int(k.split(".experts.")[1].split(".")[0]) for k in ts if ".experts." in k)
    fused = {}
    for name, a in ts.items():
        if ".mlp.experts." not in name:
            fused[name] = a
        elif name.endswith(".0.gate_proj.weight"):
            p = name[:-len(".0.gate_proj.weight")]
            fused[p + ".gate_up_proj"] = torch.stack([torch.cat([ts[f"{p}.{e}.gate_proj.weight"],
                                                                 ts[f"{p}.{e}.up_proj.weight"]]) for e in range(n)])
            fused[p + ".down_proj"] = torch.stack([ts[f"{p}.{e}.down_proj.weight"] for e in range(n)])
    save_file(fused, str(out / "model.safetensors"), metadata={"format": "pt"})


def _save(model, out: Path, seed: int, router_scale: float = 10) -> None:
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:  # random norms catch a wrong norm mapping
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith("self_attn.sinks"):  # sinks as large as trained ones: their softmax share matters
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "mlp.router.weight")):
                # a decisive router, as trained ones are: random ones leave near ties between
                # experts that Q8_0's rounding flips, and one flipped choice moves a token's logits by 30%
                p.mul_(router_scale)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's router bias: a buffer, zero when built
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    model.save_pretrained(out, safe_serialization=True)


ROUTER_SCALE = {"deepseek_v3": 1, "deepseek_v3-wide": 1}
# DeepSeek-V3's sigmoid router over 4 groups leaves one or two of the tests' 39 tokens within
# Q8_0's noise of a tie with seeds 0, 1, 2 and 4 (a flipped choice moves a token's logits by
# 40%, measured by hand with a scratch script); seed 3's routing has none
# gpt-oss's top 2 of 4 by raw logits: seed 18 keeps every router's second and third logit for the
# tests' tokens at least 2.6% of the logits' spread apart (seeds 0-39 measured by hand with a
# scratch script; seed 0 has a near tie at 0.7% that Q8_0's activation rounding flips)
SEED = {"deepseek_v3": 3, "gpt_oss": 18}


def build(family: str, out: Path, seed: int = 0, dtype: str = "float32") -> Path:
    """A tiny random checkpoint of `family` in `out`; returns `out`."""
    import torch
    import transformers as tf

    seed += SEED.get(family, 0)
    torch.manual_seed(seed)
    common = dict(initializer_range=0.08, tie_word_embeddings=False)
    if family in ("llama", "llama-tied", "mistral", "mistral-nemo", "llama-wide", "llama-blocks", "llama-80"):
        style = "llama3" if family in ("llama", "llama-wide", "llama-blocks", "llama-80") else "smollm"
        ids = bpe_tokenizer(out, style, "<|begin_of_text|>", "<|end_of_text|>")
        mistral = family.startswith("mistral")
        cls = tf.MistralConfig if mistral else tf.LlamaConfig
        # mistral-nemo: Mistral-Nemo's explicit head_dim (128 with hidden 5120 and 32 heads), here
        # 32 with hidden 64 and 4 heads
        extra = {"sliding_window": None} if family == "mistral" else {}
        if family == "mistral-nemo":
            extra = {"sliding_window": None, "head_dim": 32}
        # llama-wide: rows of 256 and 512 so the K-quants apply, 8 layers so llama-quantize's
        # per-layer choices vary, 4 query heads per KV head
        # llama-blocks: every linear in whole 128 x 128 blocks (transformers' fp8 layout)
        # llama-80: 80 layers with grouped keys, which llama.cpp takes for a 70B (its attn_v rule)
        dims = (dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=2) if family == "llama-wide" else
                dict(hidden_size=256, intermediate_size=256, num_hidden_layers=80, num_attention_heads=8,
                     num_key_value_heads=4) if family == "llama-80" else
                dict(hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=8,
                     num_key_value_heads=4) if family == "llama-blocks" else
                dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2))
        cfg = cls(vocab_size=ids["vocab_size"], max_position_embeddings=256, rms_norm_eps=1e-5,
                  bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|end_of_text|>"], **dims, **common, **extra)
        cfg.tie_word_embeddings = family == "llama-tied"
        model = (tf.MistralForCausalLM if mistral else tf.LlamaForCausalLM)(cfg)
    elif family in ("qwen2", "qwen3"):
        ids = bpe_tokenizer(out, "qwen2", None, "<|endoftext|>")
        kw = dict(vocab_size=ids["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                  eos_token_id=ids["<|endoftext|>"], **common)
        if family == "qwen2":
            model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**kw))
        else:
            model = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=32, **kw))
    elif family in ("qwen3moe", "mixtral", "qwen2moe", "olmoe", "qwen3moe-wide", "mixtral-wide", "qwen2moe-wide"):
        # 4 experts, 2 per token; Qwen3-MoE with its published models' norm_topk_prob (llama.cpp
        # always renormalises the top k, as Mixtral does). -wide: rows of 256 for the K-quants,
        # 4 layers; Mixtral's 8 experts, which llama-quantize's 8-expert rules are for
        wide = family.endswith("-wide")
        moe = dict(hidden_size=256 if wide else 64, num_hidden_layers=4 if wide else 2,
                   num_attention_heads=8 if wide else 4, num_key_value_heads=2, max_position_embeddings=256,
                   num_experts_per_tok=2, **common)
        ffn = 256 if wide else 32
        if family.startswith("olmoe"):  # llama.cpp loads OLMoE's k norm as [hidden]: as many kv heads as heads
            ids = bpe_tokenizer(out, "gpt2", None, "<|endoftext|>")
            cfg = tf.OlmoeConfig(vocab_size=ids["vocab_size"], intermediate_size=ffn, num_experts=4,
                                 rms_norm_eps=1e-5, eos_token_id=ids["<|endoftext|>"],
                                 **{**moe, "num_key_value_heads": moe["num_attention_heads"]})
            model = tf.OlmoeForCausalLM(cfg)
        elif family.startswith("qwen2moe"):
            ids = bpe_tokenizer(out, "qwen2", None, "<|endoftext|>")
            cfg = tf.Qwen2MoeConfig(vocab_size=ids["vocab_size"], intermediate_size=128, moe_intermediate_size=ffn,
                                    shared_expert_intermediate_size=2 * ffn, num_experts=4, rms_norm_eps=1e-6,
                                    eos_token_id=ids["<|endoftext|>"], **moe)
            model = tf.Qwen2MoeForCausalLM(cfg)
        elif family.startswith("qwen3moe"):
            ids = bpe_tokenizer(out, "qwen2", None, "<|endoftext|>")
            cfg = tf.Qwen3MoeConfig(vocab_size=ids["vocab_size"], intermediate_size=128, moe_intermediate_size=ffn,
                                    num_experts=4, head_dim=32 if wide else 16, norm_topk_prob=True,
                                    rms_norm_eps=1e-6, eos_token_id=ids["<|endoftext|>"], **moe)
            model = tf.Qwen3MoeForCausalLM(cfg)
        else:
            ids = bpe_tokenizer(out, "llama3", "<|begin_of_text|>", "<|end_of_text|>")
            cfg = tf.MixtralConfig(vocab_size=ids["vocab_size"], intermediate_size=ffn,
                                   num_local_experts=8 if wide else 4, rms_norm_eps=1e-5, sliding_window=None,
                                   bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|end_of_text|>"], **moe)
            model = tf.MixtralForCausalLM(cfg)
    elif family in ("deepseek_v2", "deepseek_v3", "deepseek_v3-wide"):
        # MLA with a query bottleneck (llama.cpp reads q_lora_rank but for the 26/27-layer Lite
        # models), a leading dense layer, then mixtures with shared experts; key, rope and value
        # head sizes all different. V3: sigmoid routing with the correction bias, 4 groups of 2
        # experts of which the best 2 are kept, renormalised and scaled. -wide: rows of 256 for
        # the K-quants (attn_k_b's rows of 128 fall back, as DeepSeek-V3's do), 4 layers
        ids = bpe_tokenizer(out, "llama3", "<|begin_of_text|>", "<|end_of_text|>")
        dims = (dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=4,
                     q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=64)
                if family.endswith("-wide") else
                dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                     q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=24, qk_rope_head_dim=16, v_head_dim=32))
        kw = dict(vocab_size=ids["vocab_size"], num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1,
                  num_experts_per_tok=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                  bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|end_of_text|>"], **dims, **common)
        if family == "deepseek_v2":
            cfg = tf.DeepseekV2Config(n_routed_experts=4, n_shared_experts=2, routed_scaling_factor=2.0,
                                      topk_method="greedy", norm_topk_prob=False, **kw)
            model = tf.DeepseekV2ForCausalLM(cfg)
        else:
            cfg = tf.DeepseekV3Config(n_routed_experts=8, n_shared_experts=1, routed_scaling_factor=2.5, n_group=4,
                                      topk_group=2, norm_topk_prob=True, scoring_func="sigmoid", **kw)
            model = tf.DeepseekV3ForCausalLM(cfg)
    elif family in ("gpt_oss", "gpt_oss-wide"):
        # attention sinks, windows of 16 on the even layers, biases everywhere, YaRN on every layer
        # (its correction range rounded out, truncate true: llama.cpp always rounds it, gpt-oss's
        # own config does not, test_gpt_oss checks that case against transformers), 4 experts of
        # clamped SwiGLU, 2 per token. -wide: rows of 256 for the K-quants, 4 layers
        wide = family.endswith("-wide")
        ids = bpe_tokenizer(out, "gpt2", None, "<|endoftext|>")
        rope = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": True, "original_max_position_embeddings": 32}
        dims = (dict(hidden_size=256, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8, head_dim=32)
                if wide else
                dict(hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, head_dim=16))
        cfg = tf.GptOssConfig(vocab_size=ids["vocab_size"], num_key_value_heads=2, num_local_experts=4,
                              num_experts_per_tok=2, sliding_window=16, max_position_embeddings=256, rms_norm_eps=1e-5,
                              rope_parameters=rope, eos_token_id=ids["<|endoftext|>"], pad_token_id=None,
                              **dims, **common)
        model = tf.GptOssForCausalLM(cfg)
    elif family == "gemma3":
        ids = spm_tokenizer(out)
        cfg = tf.Gemma3TextConfig(vocab_size=ids["vocab_size"] + 8, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=256, sliding_window=16, rms_norm_eps=1e-6,
                                  query_pre_attn_scalar=16, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                  initializer_range=0.08, tie_word_embeddings=True,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention"])
        model = tf.Gemma3ForCausalLM(cfg)
    elif family in ("granite", "smollm3", "olmo2", "olmo3"):
        style = {"granite": "gpt2", "smollm3": "llama3", "olmo2": "gpt2", "olmo3": "gpt2"}[family]
        bos = "<|begin_of_text|>" if style == "llama3" else None
        eos = "<|end_of_text|>" if style == "llama3" else "<|endoftext|>"
        ids = bpe_tokenizer(out, style, bos, eos)
        kw = dict(vocab_size=ids["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=ids[eos], bos_token_id=ids[bos] if bos else None, **common)
        if family == "granite":  # multipliers far from 1, as Granite 3's (12, 1/64, 0.22, 8)
            model = tf.GraniteForCausalLM(tf.GraniteConfig(rms_norm_eps=1e-5, embedding_multiplier=4.0,
                                                           attention_multiplier=0.2, residual_multiplier=0.5,
                                                           logits_scaling=2.0, **kw))
        elif family == "smollm3":  # 4 layers: the 4th without rope
            model = tf.SmolLM3ForCausalLM(tf.SmolLM3Config(rms_norm_eps=1e-6, pad_token_id=None,
                                                           **{**kw, "num_hidden_layers": 4}))
        elif family == "olmo2":
            model = tf.Olmo2ForCausalLM(tf.Olmo2Config(rms_norm_eps=1e-6, **kw))
        else:  # 4 layers: 3 sliding (window 16), 1 full, rope set per layer type (one theta, as OLMo 3's)
            rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 500000.0},
                    "full_attention": {"rope_type": "default", "rope_theta": 500000.0}}
            model = tf.Olmo3ForCausalLM(tf.Olmo3Config(rms_norm_eps=1e-6, sliding_window=16, rope_parameters=rope,
                                                       pad_token_id=None, **{**kw, "num_hidden_layers": 4}))
    elif family == "gemma2":
        ids = spm_tokenizer(out)
        # soft-capping small enough to act on a random model's scores and logits
        cfg = tf.Gemma2Config(vocab_size=ids["vocab_size"], hidden_size=64, intermediate_size=128,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              max_position_embeddings=256, sliding_window=16, rms_norm_eps=1e-6,
                              query_pre_attn_scalar=16, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                              pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=0.08,
                              tie_word_embeddings=True)
        model = tf.Gemma2ForCausalLM(cfg)
    elif family == "phi3":
        ids = spm_tokenizer(out)
        # Phi-3's added tokens past the sentencepiece model (llama.cpp looks <|endoftext|> up in a
        # model whose name says phi3)
        tcfg = json.loads((out / "tokenizer_config.json").read_text())
        tcfg["added_tokens_decoder"] = {str(ids["vocab_size"] + i): {"content": t, "special": True}
                                        for i, t in enumerate(("<|endoftext|>", "<|end|>", "<|user|>"))}
        (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=1))
        ids["vocab_size"] += 8
        # as many kv heads as heads (AWQ's qkv -> o group), rope on half of each head, LongRoPE
        # (original context 256: llama.cpp picks the long factors for a context past it, and the tests'
        # 128 positions run in a context of 256)
        half = 4
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.3, 2.1, 3.0][:half], "long_factor": [1.5, 2.5, 4.0, 9.0][:half],
                "original_max_position_embeddings": 256}
        cfg = tf.Phi3Config(vocab_size=ids["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                            original_max_position_embeddings=256, rope_parameters=rope, rms_norm_eps=1e-5,
                            pad_token_id=0, eos_token_id=1, bos_token_id=2, sliding_window=None, **common)
        model = tf.Phi3ForCausalLM(cfg)
    elif family in ("gpt_neox", "gpt_neox-64"):
        ids = bpe_tokenizer(out, "gpt2", None, "<|endoftext|>")
        # gpt_neox-64: widths that GPTQ's CPU kernels take (multiples of 32)
        width = 64 if family == "gpt_neox-64" else 80
        cfg = tf.GPTNeoXConfig(vocab_size=ids["vocab_size"], hidden_size=width, intermediate_size=2 * width,
                               num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                               rotary_pct=0.5, layer_norm_eps=1e-5, use_parallel_residual=True,
                               eos_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"], **common)
        model = tf.GPTNeoXForCausalLM(cfg)
    elif family == "gpt2":
        ids = bpe_tokenizer(out, "gpt2", None, "<|endoftext|>")
        cfg = tf.GPT2Config(vocab_size=ids["vocab_size"], n_embd=64, n_layer=2, n_head=4, n_positions=256,
                            layer_norm_epsilon=1e-5, eos_token_id=ids["<|endoftext|>"],
                            bos_token_id=ids["<|endoftext|>"], initializer_range=0.08)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(family)
    model = model.to(getattr(torch, dtype)).eval()
    # V3's sigmoid router saturates at the scale that makes softmax routers decisive
    _save(model, out, seed, router_scale=ROUTER_SCALE.get(family, 10))
    return out


MOE_FAMILIES = ["qwen3moe", "mixtral", "qwen2moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss"]
DENSE_NEW = ["granite", "smollm3", "olmo2", "olmo3", "gemma2", "phi3"]
FAMILIES = ["llama", "llama-tied", "mistral", "mistral-nemo", "qwen2", "qwen3", "gemma3", "gpt_neox",
            "gpt2"] + DENSE_NEW + MOE_FAMILIES
