"""GPT-NeoX / Pythia: GGUF architecture "gptneox" (fused qkv regrouped, partial rotary)."""
from __future__ import annotations

import gguf
import numpy as np

from qconvert.arch.base import Expected, Family, PlannedTensor
from qconvert.errors import InputError
from qconvert.read.checkpoint import Tensor


def regroup_qkv(a: np.ndarray, n_head: int) -> np.ndarray:
    """HF interleaves q,k,v per head ([head][q|k|v][dim]); GGUF wants all q, then k, then v."""
    per = a.shape[0] // (3 * n_head)
    g = a.reshape(n_head, 3, per, *a.shape[1:])
    return np.concatenate([g[:, i].reshape(n_head * per, *a.shape[1:]) for i in range(3)], axis=0)


def ungroup_qkv(a: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of regroup_qkv: all q, k, v back to per-head [q|k|v]."""
    per = a.shape[0] // (3 * n_head)
    return np.ascontiguousarray(a.reshape(3, n_head, per, *a.shape[1:]).swapaxes(0, 1)).reshape(a.shape)


class GPTNeoX(Family):
    hf_architectures = ("GPTNeoXForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GPTNEOX
    forward_name = "GPTNeoXForward"
    config_defaults = {"*": {"max_position_embeddings": 2048, "layer_norm_eps": 1e-5}}  # GPTNeoXConfig
    example = "EleutherAI/pythia-70m"

    def expected(self) -> list[Expected]:
        c = self.cfg
        H, V, ffn = c.positive(int, "hidden_size"), c.positive(int, "vocab_size"), c.positive(int, "intermediate_size")
        n_head = c.positive(int, "num_attention_heads")
        if H % n_head:
            raise InputError(f"{c.path}: hidden_size {H} is not a multiple of num_attention_heads {n_head}")
        out = [Expected("gpt_neox.embed_in.weight", (V, H)), Expected("embed_out.weight", (V, H)),
               Expected("gpt_neox.final_layer_norm.weight", (H,)), Expected("gpt_neox.final_layer_norm.bias", (H,))]
        for i in range(self.n_layers):
            p = f"gpt_neox.layers.{i}."
            for ln in ("input_layernorm", "post_attention_layernorm"):
                out += [Expected(p + ln + ".weight", (H,)), Expected(p + ln + ".bias", (H,))]
            for name, n_out, n_in in (("attention.query_key_value", 3 * H, H), ("attention.dense", H, H),
                                      ("mlp.dense_h_to_4h", ffn, H), ("mlp.dense_4h_to_h", H, ffn)):
                out += [Expected(p + name + ".weight", (n_out, n_in)), Expected(p + name + ".bias", (n_out,), False)]
        return out

    def tensor(self, hf_name: str, t: Tensor) -> list[PlannedTensor]:
        self.check_float(t)
        name = self.map_name(hf_name)
        if ".attention.query_key_value." in hf_name:
            n_head = self.cfg.need(int, "num_attention_heads")
            return [PlannedTensor(name, t.shape, t, transform=lambda a, _dt: regroup_qkv(a, n_head))]
        return [PlannedTensor(name, t.shape, t)]

    def awq_extra_tensors(self) -> list[tuple[str, tuple[int, ...], int]]:
        """transformers loads AWQ GPT-NeoX with a ScaledActivation before dense_4h_to_h, whose
        scales the checkpoint must carry (AutoAWQ scales that activation too)."""
        n = self.cfg.need(int, "intermediate_size")
        return [(f"gpt_neox.layers.{i}.mlp.act.scales", (n,), i) for i in range(self.n_layers)]

    def from_gguf(self, hf_name: str, a: np.ndarray) -> np.ndarray:
        if ".attention.query_key_value." in hf_name:
            return ungroup_qkv(a, self.cfg.need(int, "num_attention_heads"))
        return a

    @classmethod
    def config_from_gguf(cls, kv: dict) -> dict:
        cfg = {**super().config_from_gguf(kv), "hidden_act": "gelu",
               "use_parallel_residual": bool(kv.get("gptneox.use_parallel_residual", True))}
        rot = kv.get("gptneox.rope.dimension_count")
        if rot is not None:
            cfg["rotary_pct"] = rot / (cfg["hidden_size"] // cfg["num_attention_heads"])
        return cfg

    def write_hparams(self, kv: gguf.GGUFWriter, file_type: int) -> None:
        c = self.cfg
        hidden, n_head = c.need(int, "hidden_size"), c.need(int, "num_attention_heads")
        rope = self.rope_parameters()
        pct = c.get(float, "rotary_pct", default=rope.get("partial_rotary_factor", 0.25))
        kv.add_context_length(c.need(int, "max_position_embeddings"))
        kv.add_embedding_length(hidden)
        kv.add_block_count(self.n_layers)
        kv.add_feed_forward_length(c.need(int, "intermediate_size"))
        kv.add_rope_dimension_count(int(pct * (hidden // n_head)))
        kv.add_head_count(n_head)
        kv.add_parallel_residual(c.data.get("use_parallel_residual", True))
        kv.add_layer_norm_eps(c.need(float, "layer_norm_eps"))
        # llama.cpp's converter writes neither; llama.cpp then assumes theta 10000 and no file type
        theta = rope.get("rope_theta", 10000.0)
        if theta != 10000.0:
            kv.add_rope_freq_base(theta)
        kv.add_file_type(file_type)
