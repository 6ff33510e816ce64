"""A mixture of experts at Qwen3-30B-A3B's widths (hidden 2048, 128 experts of 768, 8 per token,
32 query and 4 key/value heads of 128, vocabulary 151936) but only a few layers, random bf16
weights, Qwen2.5's tokenizer: `qconvert --to q4_k_m` (calibrated: 32 x 512 tokens of qconvert's
shipped text) against convert_hf_to_gguf.py --outtype f32 + llama-imatrix (same text, same
chunks) + llama-quantize Q4_K_M, wall time and peak RSS; and qconvert's peak RSS at 2 and at 4
layers (memory must not grow with depth: one decoder layer, all its experts, at a time); with
--gptq, `qconvert --to gptq` (same calibration) at both depths too, time and peak RSS.
--family deepseek: DeepSeek-V2-Lite's widths instead (hidden 2048, 64 experts of 1408, 6 per
token, 2 shared, a dense first layer of 10944, multi-head latent attention with 16 heads, latent
512, rope 64, nope and value 128) with V2's and V3's query bottleneck of 1536 (llama.cpp reads
the Lite models' missing one only at their 26/27 layers), softmax routing, Qwen2.5's tokenizer.

--family gpt-oss: gpt-oss-20b's widths (hidden 2880, 32 experts of 2880, 4 per token, 64 query and 8
key/value heads of 64, sinks, windows of 128 on even layers, YaRN), its experts fused as
transformers saves the bf16 model (gate_up_proj [experts, hidden, 2 ff], biases), Qwen2.5's
tokenizer; `--to mxfp4_moe` for the mixture gpt-oss files are published in (default q4_k_m, whose
rows of 2880 fall back to Q5_0/Q8_0 as llama-quantize's do).

usage: python bench/moe.py [--family qwen3moe|deepseek|gpt-oss] [--to q4_k_m] [--layers 4] [--small-layers 2]
                           [--ours-only] [--gptq]
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import IMATRIX, QUANTIZE, REAL, measure, need_reference, qconvert_cmd, reference_convert_cmd  # noqa: E402

CALIB = Path(__file__).resolve().parents[1] / "qconvert" / "calibrate" / "data" / "emma.txt"
SAMPLES, SEQ = 32, 512
WIDTHS = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
              num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
              vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
              norm_topk_prob=True, tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[])


DEEPSEEK = dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64,
                num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1, num_attention_heads=16,
                num_key_value_heads=16, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                v_head_dim=128, vocab_size=151936, max_position_embeddings=163840, rms_norm_eps=1e-6,
                rope_theta=10000.0, routed_scaling_factor=1.0, norm_topk_prob=False, topk_method="greedy",
                n_group=1, topk_group=1, tie_word_embeddings=False)


GPT_OSS = dict(hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4,
               num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=151936, sliding_window=128,
               max_position_embeddings=131072, rms_norm_eps=1e-5, attention_bias=True, swiglu_limit=7.0,
               rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "truncate": False, "original_max_position_embeddings": 4096},
               rope_theta=150000.0, tie_word_embeddings=False)


def bf16(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 0.02) -> np.ndarray:
    """Random normal weights as bfloat16 bits (uint16), rounded to nearest even."""
    x = (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).view(np.uint32)
    return ((x + 0x7FFF + ((x >> 16) & 1)) >> 16).astype(np.uint16)


def deepseek_layer(rng: np.random.Generator, i: int) -> dict[str, np.ndarray]:
    W = DEEPSEEK
    H, n, E, F = W["hidden_size"], W["num_attention_heads"], W["n_routed_experts"], W["moe_intermediate_size"]
    qk, kv, ql = W["qk_nope_head_dim"] + W["qk_rope_head_dim"], W["kv_lora_rank"], W["q_lora_rank"]
    p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    ones = np.full(max(H, ql), 0x3F80, np.uint16)
    t = {p + "input_layernorm.weight": ones[:H], p + "post_attention_layernorm.weight": ones[:H],
         a + "q_a_proj.weight": bf16(rng, (ql, H)), a + "q_a_layernorm.weight": ones[:ql],
         a + "q_b_proj.weight": bf16(rng, (n * qk, ql)),
         a + "kv_a_proj_with_mqa.weight": bf16(rng, (kv + W["qk_rope_head_dim"], H)),
         a + "kv_a_layernorm.weight": ones[:kv],
         a + "kv_b_proj.weight": bf16(rng, (n * (W["qk_nope_head_dim"] + W["v_head_dim"]), kv)),
         a + "o_proj.weight": bf16(rng, (H, n * W["v_head_dim"]))}
    if i < W["first_k_dense_replace"]:
        ff = W["intermediate_size"]
        return {**t, m + "gate_proj.weight": bf16(rng, (ff, H)), m + "up_proj.weight": bf16(rng, (ff, H)),
                m + "down_proj.weight": bf16(rng, (H, ff))}
    t[m + "gate.weight"] = bf16(rng, (E, H), 0.2)
    for e in range(E):
        t[f"{m}experts.{e}.gate_proj.weight"] = bf16(rng, (F, H))
        t[f"{m}experts.{e}.up_proj.weight"] = bf16(rng, (F, H))
        t[f"{m}experts.{e}.down_proj.weight"] = bf16(rng, (H, F))
    s = F * W["n_shared_experts"]
    return {**t, m + "shared_experts.gate_proj.weight": bf16(rng, (s, H)),
            m + "shared_experts.up_proj.weight": bf16(rng, (s, H)), m + "shared_experts.down_proj.weight": bf16(rng, (H, s))}


def gpt_oss_layer(rng: np.random.Generator, i: int) -> dict[str, np.ndarray]:
    W = GPT_OSS
    H, n, kv, hd = W["hidden_size"], W["num_attention_heads"], W["num_key_value_heads"], W["head_dim"]
    E, F = W["num_local_experts"], W["intermediate_size"]
    p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    ones = np.full(H, 0x3F80, np.uint16)
    return {p + "input_layernorm.weight": ones, p + "post_attention_layernorm.weight": ones,
            a + "q_proj.weight": bf16(rng, (n * hd, H)), a + "q_proj.bias": bf16(rng, (n * hd,)),
            a + "k_proj.weight": bf16(rng, (kv * hd, H)), a + "k_proj.bias": bf16(rng, (kv * hd,)),
            a + "v_proj.weight": bf16(rng, (kv * hd, H)), a + "v_proj.bias": bf16(rng, (kv * hd,)),
            a + "o_proj.weight": bf16(rng, (H, n * hd)), a + "o_proj.bias": bf16(rng, (H,)),
            a + "sinks": bf16(rng, (n,), 1.0),
            m + "router.weight": bf16(rng, (E, H), 0.2), m + "router.bias": bf16(rng, (E,)),
            m + "experts.gate_up_proj": bf16(rng, (E, H, 2 * F)), m + "experts.gate_up_proj_bias": bf16(rng, (E, 2 * F)),
            m + "experts.down_proj": bf16(rng, (E, F, H)), m + "experts.down_proj_bias": bf16(rng, (E, H))}


def build(out: Path, layers: int, family: str = "qwen3moe") -> Path:
    """The checkpoint, one safetensors shard per layer (the weights never all in memory)."""
    out.mkdir(parents=True)
    if family == "deepseek":
        return build_deepseek(out, layers)
    if family == "gpt-oss":
        return build_gpt_oss(out, layers)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REAL / "hf" / "qwen2.5-0.5b" / f, out / f)
    H, E, F, V = WIDTHS["hidden_size"], WIDTHS["num_experts"], WIDTHS["moe_intermediate_size"], WIDTHS["vocab_size"]
    q, kv = WIDTHS["num_attention_heads"] * WIDTHS["head_dim"], WIDTHS["num_key_value_heads"] * WIDTHS["head_dim"]
    rng = np.random.default_rng(0)
    ones = np.full(H, 0x3F80, np.uint16)  # 1.0: norms
    shards = [("model-embed.safetensors", {"model.embed_tokens.weight": bf16(rng, (V, H)), "model.norm.weight": ones,
                                           "lm_head.weight": bf16(rng, (V, H))})]
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": ones, p + "post_attention_layernorm.weight": ones,
             p + "self_attn.q_proj.weight": bf16(rng, (q, H)), p + "self_attn.k_proj.weight": bf16(rng, (kv, H)),
             p + "self_attn.v_proj.weight": bf16(rng, (kv, H)), p + "self_attn.o_proj.weight": bf16(rng, (H, q)),
             p + "self_attn.q_norm.weight": ones[:WIDTHS["head_dim"]], p + "self_attn.k_norm.weight": ones[:WIDTHS["head_dim"]],
             p + "mlp.gate.weight": bf16(rng, (E, H), 0.2)}
        for e in range(E):
            t[f"{p}mlp.experts.{e}.gate_proj.weight"] = bf16(rng, (F, H))
            t[f"{p}mlp.experts.{e}.up_proj.weight"] = bf16(rng, (F, H))
            t[f"{p}mlp.experts.{e}.down_proj.weight"] = bf16(rng, (H, F))
        shards.append((f"model-layer{i}.safetensors", t))
    return save(out, shards, {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                              "num_hidden_layers": layers, **WIDTHS})


def save(out: Path, shards: Iterable[tuple[str, dict[str, np.ndarray]]], cfg: dict) -> Path:
    """The shards (bfloat16 bits as uint16), each written as it comes, their index and the config
    (with Qwen2.5's token ids)."""
    import torch
    from safetensors.torch import save_file

    index: dict[str, str] = {}
    total = 0
    for name, tensors in shards:
        save_file({k: torch.from_numpy(v.view(np.int16).copy()).view(torch.bfloat16) for k, v in tensors.items()},
                  str(out / name))
        total += sum(v.nbytes for v in tensors.values())
        index.update({k: name for k in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": index}))
    cfg = {**cfg, "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151643}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def build_layered(out: Path, layers: int, widths: dict, layer: Callable[[np.random.Generator, int], dict],
                  cfg: dict) -> Path:
    """Qwen2.5's tokenizer, a shard of the embeddings, final norm and head, then one shard per
    decoder layer made by `layer(rng, i)` and written before the next is made (a gpt-oss-20b
    layer is 1.6 GB of bf16); config.json from `cfg` and the widths."""
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REAL / "hf" / "qwen2.5-0.5b" / f, out / f)
    H, V = widths["hidden_size"], widths["vocab_size"]
    rng = np.random.default_rng(0)
    embed = [("model-embed.safetensors", {"model.embed_tokens.weight": bf16(rng, (V, H)),
                                          "model.norm.weight": np.full(H, 0x3F80, np.uint16),
                                          "lm_head.weight": bf16(rng, (V, H))})]
    per_layer = ((f"model-layer{i}.safetensors", layer(rng, i)) for i in range(layers))
    return save(out, itertools.chain(embed, per_layer), cfg)


def build_deepseek(out: Path, layers: int) -> Path:
    return build_layered(out, layers, DEEPSEEK, deepseek_layer,
                         {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
                          "num_hidden_layers": layers, **DEEPSEEK})


def build_gpt_oss(out: Path, layers: int) -> Path:
    return build_layered(out, layers, GPT_OSS, gpt_oss_layer,
                         {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "num_hidden_layers": layers,
                          **GPT_OSS, "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                                                     for i in range(layers)]})


def built(out: Path, layers: int, family: str = "qwen3moe") -> Path:
    """build() in a child process: a process's peak RSS passes to the children it forks (Linux
    keeps the high-water mark across fork and exec), so the measured tools must be forked from a
    parent that never held the weights."""
    import subprocess

    subprocess.run([sys.executable, __file__, "--build", str(out), "--layers", str(layers), "--family", family],
                   check=True)
    return out


def ours(src: Path, out: Path, to: str = "q4_k_m") -> tuple[float, int]:
    return measure(qconvert_cmd() + [str(src), "--to", to, "-o", str(out), "-q",
                                     "--calib-samples", str(SAMPLES), "--calib-seq-len", str(SEQ)])


def ours_gptq(src: Path, out: Path, family: str) -> tuple[float, int]:
    # DeepSeek-V2-Lite's dense MLP of 10944 is no multiple of 128: group 64 there
    group = ["--group-size", "64"] if family == "deepseek" else []
    return measure(qconvert_cmd() + [str(src), "--to", "gptq", "-o", str(out), "-q", *group,
                                     "--calib-samples", str(SAMPLES), "--calib-seq-len", str(SEQ)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=("qwen3moe", "deepseek", "gpt-oss"), default="qwen3moe")
    ap.add_argument("--to", default="q4_k_m", help="the GGUF mixture (llama-quantize's name in lower case)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--small-layers", type=int, default=2)
    ap.add_argument("--ours-only", action="store_true", help="leave llama.cpp's chain out")
    ap.add_argument("--gptq", action="store_true", help="also --to gptq at both depths (no reference: GPTQModel "
                    "quantizes on GPUs)")
    ap.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # the child process of built()
    args = ap.parse_args()
    if args.build:
        build(args.build, args.layers, args.family)
        return
    need_reference()
    threads = "2"
    with tempfile.TemporaryDirectory(dir=Path.home() / ".cache") as tmp:
        tmp = Path(tmp)
        rows = {}
        for n in (args.small_layers, args.layers):
            src = built(tmp / f"moe-{n}", n, args.family)
            rows[f"qconvert {args.to}, {n} layers"] = ours(src, tmp / f"ours-{n}.gguf", args.to)
            if args.gptq:
                rows[f"qconvert gptq, {n} layers"] = ours_gptq(src, tmp / f"gptq-{n}", args.family)
                shutil.rmtree(tmp / f"gptq-{n}")
            if n != args.layers:
                shutil.rmtree(src)
        if args.gptq:
            small, big = rows[f"qconvert gptq, {args.small_layers} layers"], rows[f"qconvert gptq, {args.layers} layers"]
            print(f"  gptq peak RSS {args.layers} layers / {args.small_layers} layers: {big[1] / small[1]:.2f}x")
        if args.ours_only:
            for k, (t, r) in rows.items():
                print(f"  {k:32s} {t:8.1f} s {r / 1e6:9.0f} MB")
            return
        f32, imat, ref = tmp / "f32.gguf", tmp / "m.imatrix.gguf", tmp / "ref.gguf"
        steps = {"convert_hf_to_gguf f32": measure(reference_convert_cmd(src, "f32", f32)),
                 "llama-imatrix": measure([str(IMATRIX), "-m", str(f32), "-f", str(CALIB), "-o", str(imat), "-c",
                                           str(SEQ), "--chunks", str(SAMPLES), "-t", threads]),
                 f"llama-quantize {args.to.upper()}": measure([str(QUANTIZE), "--imatrix", str(imat), str(f32), str(ref),
                                                              args.to.upper(), threads])}
        widths = {"deepseek": "DeepSeek-V2-Lite", "gpt-oss": "gpt-oss-20b"}.get(args.family, "Qwen3-30B-A3B")
        print(f"{widths} widths, {args.layers} layers (random bf16), {args.to}, calibration {SAMPLES} x {SEQ} "
              "tokens, 2 threads")
        for k, (t, r) in {**steps, **rows}.items():
            print(f"  {k:32s} {t:8.1f} s {r / 1e6:9.0f} MB")
        ref_t, ref_r = sum(t for t, _ in steps.values()), max(r for _, r in steps.values())
        t, r = rows[f"qconvert {args.to}, {args.layers} layers"]
        small = rows[f"qconvert {args.to}, {args.small_layers} layers"][1]
        print(f"  llama.cpp total                  {ref_t:8.1f} s {ref_r / 1e6:9.0f} MB")
        print(f"  ratio qconvert / llama.cpp: time {t / ref_t:.2f}x, peak RSS {r / ref_r:.2f}x; "
              f"qconvert peak RSS {args.layers} layers / {args.small_layers} layers: {r / small:.2f}x")
        a, b = (tmp / f"ours-{args.layers}.gguf").stat().st_size, ref.stat().st_size
        print(f"  file sizes: qconvert {a / 1e6:.1f} MB, llama.cpp {b / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
