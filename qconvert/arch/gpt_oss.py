"""gpt-oss (GptOssForCausalLM): GGUF architecture "gpt-oss".

Attention as Llama's with biases on q/k/v/o and a learned sink per head (one more logit in each
softmax, whose probability goes to no value); layers alternate sliding-window (even layers) and
full attention; YaRN rope on every layer, as rotate-half. Every layer is a mixture: a router
with a bias picks the top k experts by logit and weighs them by the softmax of those k logits;
each expert is a clamped SwiGLU, out = (clamp(up, -7, 7) + 1) * g * sigmoid(1.702 g) with
g = min(gate, 7), every projection with a bias.

The checkpoint holds a layer's experts fused, in transformers' layout: mlp.experts.gate_up_proj
[experts, hidden, 2 ff] (input rows; gate and up columns interleaved, gate first) with
gate_up_proj_bias [experts, 2 ff], down_proj [experts, ff, hidden], down_proj_bias; or, as
OpenAI ships them, as MXFP4 blocks (gate_up_proj_blocks [experts, 2 ff, hidden / 32, 16] uint8,
two E2M1 codes per byte, low nibble first, with gate_up_proj_scales [experts, 2 ff, hidden / 32]
E8M0 exponents; quantization_config quant_method "mxfp4"). Both are read as per-expert matrices
[out, in] and biases under mlp.experts.E.{gate,up,down}_proj, the forward's and the layer loop's
names; GGUF stacks them into ffn_{gate,up,down}_exps and their .bias, as the converter splits
and transposes them.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

from qconvert.arch.base import Family
from qconvert.arch.forward import ScaleGroup
from qconvert.arch.layers import apply_rope, attention, heads, merge
from qconvert.arch.moe import MoEForward
from qconvert.arch.spec import Expected
from qconvert.errors import InputError
from qconvert.quant import blocks as block_types
from qconvert.read.checkpoint import Tensor

# llama.cpp's LLM_FFN_SWIGLU_OAI_MOE constants (fixed there; transformers reads the limit from
# the config)
ALPHA, LIMIT = 1.702, 7.0


@dataclass
class FusedExpertPart:
    """One expert's matrix or bias inside a fused gpt-oss tensor, under its per-expert name:
    `fused[expert][index]`, transposed where the checkpoint stores [in, out]; read when asked."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    fused: Tensor
    expert: int
    index: tuple
    transpose: bool = False

    def array(self) -> np.ndarray:
        a = self.fused.array()[self.expert][self.index]
        return np.ascontiguousarray(a.T if self.transpose else a)

    def release(self) -> None:
        self.fused.release()

    @property
    def file(self):  # the shard, for errors that name it
        return getattr(self.fused, "file", None)


@dataclass
class Mxfp4ExpertPart:
    """One expert's matrix [out, in] from an MXFP4 checkpoint's blocks and scales (`rows`:
    gate_up's interleaved gate or up rows): its bytes repacked as GGUF's MXFP4 (the same codes and
    exponents), decoded by that block type, exactly (every E2M1 value times a power of two is a
    float32)."""

    name: str
    shape: tuple[int, ...]
    blocks: Tensor
    scales: Tensor
    expert: int
    rows: slice
    dtype: str = "F32"
    gguf_type: str = "MXFP4"  # GGUF's MXFP4 holds the same codes and exponents (gguf_bytes)

    def array(self) -> np.ndarray:
        return block_types.MXFP4.dequantize(self.gguf_bytes(), self.shape)

    def gguf_bytes(self) -> np.ndarray:
        """The matrix as GGUF MXFP4 blocks of 17 bytes: the exponent, then element j's code in
        the low nibble of byte j and element j + 16's in its high nibble (the converter's
        repack_mxfp4). An exponent of 255 is E8M0's NaN: refused (ggml would read it as 2^127)."""
        b = np.asarray(self.blocks.array()[self.expert][self.rows])
        s = np.asarray(self.scales.array()[self.expert][self.rows])
        if (nan := np.flatnonzero(s.reshape(-1) == 255)).size:
            row, group = divmod(int(nan[0]), s.shape[-1])
            where = getattr(self.file, "path", None)
            raise InputError(f"{f'{where}: ' if where else ''}tensor {self.name!r} has a NaN exponent (E8M0 255) at "
                             f"row {row}, columns {group * 32}-{group * 32 + 31}; refusing to write a broken model")
        codes = np.stack((b & 0x0F, b >> 4), axis=-1).reshape(*b.shape[:-1], 32)
        out = np.concatenate((s[..., None], codes[..., :16] | (codes[..., 16:] << 4)), axis=-1)
        return np.ascontiguousarray(out, dtype=np.uint8).reshape(-1)

    def release(self) -> None:
        self.blocks.release()
        self.scales.release()

    @property
    def file(self):  # the shard, for errors that name it
        return getattr(self.blocks, "file", None)


_GATE, _UP, _ALL = slice(0, None, 2), slice(1, None, 2), slice(None)


def split_gpt_oss_experts(tensors: dict[str, Tensor], path) -> dict[str, Tensor]:
    """The checkpoint's tensors with each layer's fused experts (float or MXFP4) replaced by
    every expert's gate, up and down matrices [out, in] and biases, in checkpoint order."""
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        prefix, _, kind = name.rpartition(".")
        if not prefix.endswith(".mlp.experts") or kind not in (
                "gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias", "gate_up_proj_blocks",
                "down_proj_blocks", "gate_up_proj_scales", "down_proj_scales"):
            out[name] = t
            continue
        shape = tuple(t.shape)

        def bad(what: str) -> InputError:
            return InputError(f"{path}: tensor {name!r} has shape {list(shape)}; gpt-oss's {kind} is {what}")
        if kind.endswith("_scales"):
            continue  # read with its blocks
        if kind.endswith("_blocks"):
            scales = tensors.get(f"{prefix}.{kind[:-len('_blocks')]}_scales")
            if scales is None:
                raise InputError(f"{path}: tensor {name!r} has no {kind[:-len('_blocks')]}_scales beside it")
            if t.dtype != "U8" or scales.dtype != "U8" or len(shape) != 4 or shape[-1] != 16 \
                    or tuple(scales.shape) != shape[:3]:
                raise InputError(f"{path}: MXFP4 tensor {name!r} is {t.dtype} {list(shape)} with scales "
                                 f"{scales.dtype} {list(scales.shape)}; expected uint8 [experts, rows, groups, 16] and "
                                 "uint8 [experts, rows, groups]")
            E, rows, groups = shape[:3]
            projs = (("gate_proj", _GATE), ("up_proj", _UP)) if kind.startswith("gate_up") else (("down_proj", _ALL),)
            if len(projs) == 2 and rows % 2:
                raise bad("[experts, 2 * ff, groups, 16]")
            for e in range(E):
                for proj, rs in projs:
                    full = f"{prefix}.{e}.{proj}.weight"
                    out[full] = Mxfp4ExpertPart(full, (rows // len(projs), groups * 32), t, scales, e, rs)
            continue
        if kind == "gate_up_proj":
            if len(shape) != 3 or shape[2] % 2:
                raise bad("[experts, hidden, 2 * ff]")
            E, H, ff = shape[0], shape[1], shape[2] // 2
            parts = (("gate_proj", (slice(None), _GATE)), ("up_proj", (slice(None), _UP)))
            for e in range(E):
                for proj, index in parts:
                    full = f"{prefix}.{e}.{proj}.weight"
                    out[full] = FusedExpertPart(full, t.dtype, (ff, H), t, e, index, transpose=True)
        elif kind == "gate_up_proj_bias":
            if len(shape) != 2 or shape[1] % 2:
                raise bad("[experts, 2 * ff]")
            for e in range(shape[0]):
                for proj, index in (("gate_proj", _GATE), ("up_proj", _UP)):
                    full = f"{prefix}.{e}.{proj}.bias"
                    out[full] = FusedExpertPart(full, t.dtype, (shape[1] // 2,), t, e, index)
        elif kind == "down_proj":
            if len(shape) != 3:
                raise bad("[experts, ff, hidden]")
            for e in range(shape[0]):
                full = f"{prefix}.{e}.down_proj.weight"
                out[full] = FusedExpertPart(full, t.dtype, (shape[2], shape[1]), t, e, (), transpose=True)
        else:  # down_proj_bias
            if len(shape) != 2:
                raise bad("[experts, hidden]")
            for e in range(shape[0]):
                full = f"{prefix}.{e}.down_proj.bias"
                out[full] = FusedExpertPart(full, t.dtype, (shape[1],), t, e, ())
    return out


class GptOssForward(MoEForward):
    """transformers' GptOssModel: sinks, alternating sliding windows, YaRN on every layer, the
    router's softmax over its top k logits, clamped SwiGLU experts with biases."""

    router = "mlp.router"

    def __init__(self, family, weights=None):
        super().__init__(family, weights)
        self.window = self.cfg.positive(int, "sliding_window")
        self.sliding = family.swa_layers()
        self.limit = float(self.cfg.get(float, "swiglu_limit", default=LIMIT))

    def rope_of(self, i: int, T: int):
        return self.rope(T)  # sliding layers turn as the full ones do

    def attn(self, i: int, x):
        a = f"model.layers.{i}.self_attn."
        q = heads(self.linear(x, a + "q_proj"), self.n_head)
        k = heads(self.linear(x, a + "k_proj"), self.n_kv)
        v = heads(self.linear(x, a + "v_proj"), self.n_kv)
        cos, sin = self.rope(x.shape[1])
        o = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, self.attn_scale, self.window_of(i),
                      sinks=self.w(a + "sinks"))
        return self.linear(merge(o), a + "o_proj")

    def route(self, p: str, logits):
        top, chosen = torch.topk(logits.float(), self.top_k, dim=-1)
        return torch.softmax(top, dim=-1), chosen

    def expert(self, p: str, e: int, x):
        gate, up, down = (p + n.format(e=e) for n in self.expert_names)
        g = self.linear(x, gate).clamp(max=self.limit)
        u = self.linear(x, up).clamp(-self.limit, self.limit)
        return self.linear((u + 1) * (g * torch.sigmoid(g * ALPHA)), down)

    def scale_groups(self, i: int) -> list[ScaleGroup]:
        raise NotImplementedError("AWQ on gpt-oss")


class GptOss(Family):
    hf_architectures = ("GptOssForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GPT_OSS
    forward_class = GptOssForward
    example = "openai/gpt-oss-20b"
    float_linears = ("mlp.router",)
    # GPTQ/AWQ/...: the loaders hold gpt-oss's experts as fused 3-D parameters, which no
    # quantized layout of ours names yet
    safetensors_targets = False
    # what transformers' GptOssConfig assumes for the keys llama.cpp needs
    config_defaults = {"*": {"rms_norm_eps": 1e-5, "sliding_window": 128, "head_dim": 64,
                             "max_position_embeddings": 131072, "rope_theta": 150000.0, "num_experts_per_tok": 4}}

    def __init__(self, ckpt):
        super().__init__(ckpt)
        c = self.cfg
        if self.n_experts < 1:
            raise InputError(f"{c.path}: num_local_experts must be positive for {c.architecture()}")
        for key, fixed in (("swiglu_limit", LIMIT), ("swiglu_alpha", ALPHA)):
            if (v := c.get(float, key, default=fixed)) != fixed:
                raise InputError(f"{c.path}: {key} {v:g}: llama.cpp's gpt-oss fixes it at {fixed:g} and cannot be "
                                 "told otherwise")
        self.swa_layers()

    def own_names(self, tensors):
        return split_gpt_oss_experts(tensors, self.ckpt.path)

    def norm_topk_prob(self) -> bool:
        return False  # the softmax over the top k sums to 1 already

    def swa_layers(self) -> list[bool]:
        """Sliding layers: even ones, as llama.cpp's gpt-oss fixes them; a config's layer_types
        that says otherwise is refused."""
        pattern = [i % 2 == 0 for i in range(self.n_layers)]
        types = self.cfg.data.get("layer_types")
        if types is not None and types != ["sliding_attention" if s else "full_attention" for s in pattern]:
            raise InputError(f"{self.cfg.path}: layer_types {types!r}: llama.cpp's gpt-oss alternates sliding "
                             "(even layers) and full attention and cannot be told otherwise")
        return pattern

    def expected(self) -> list[Expected]:
        c = self.cfg
        H, V, ff = c.positive(int, "hidden_size"), c.positive(int, "vocab_size"), c.positive(int, "intermediate_size")
        n, hd = c.positive(int, "num_attention_heads"), c.positive(int, "head_dim")
        kv = c.get(int, "num_key_value_heads", positive=True) or n
        if n % kv:
            raise InputError(f"{c.path}: num_key_value_heads must divide num_attention_heads ({n}), got {kv}")
        out = [Expected("model.embed_tokens.weight", (V, H)), Expected("model.norm.weight", (H,)),
               Expected("lm_head.weight", (V, H), required=False)]
        for i in range(self.n_layers):
            p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            out += [Expected(p + "input_layernorm.weight", (H,)), Expected(p + "post_attention_layernorm.weight", (H,)),
                    Expected(a + "q_proj.weight", (n * hd, H)), Expected(a + "q_proj.bias", (n * hd,), False),
                    Expected(a + "k_proj.weight", (kv * hd, H)), Expected(a + "k_proj.bias", (kv * hd,), False),
                    Expected(a + "v_proj.weight", (kv * hd, H)), Expected(a + "v_proj.bias", (kv * hd,), False),
                    Expected(a + "o_proj.weight", (H, n * hd)), Expected(a + "o_proj.bias", (H,)),
                    Expected(a + "sinks", (n,)),
                    Expected(m + "router.weight", (self.n_experts, H)), Expected(m + "router.bias", (self.n_experts,))]
            for e in range(self.n_experts):
                x = f"{m}experts.{e}."
                out += [Expected(x + "gate_proj.weight", (ff, H)), Expected(x + "gate_proj.bias", (ff,)),
                        Expected(x + "up_proj.weight", (ff, H)), Expected(x + "up_proj.bias", (ff,)),
                        Expected(x + "down_proj.weight", (H, ff)), Expected(x + "down_proj.bias", (H,))]
        return out

    def map_name(self, hf_name: str) -> str:
        if hf_name.endswith("self_attn.sinks"):  # as the converter names it
            hf_name += ".weight"
        return super().map_name(hf_name)

    def write_hparams(self, kv: gguf.GGUFWriter, file_type: int) -> None:
        """GptOssModel.set_gguf_parameters: the base keys, the window, the experts' width."""
        self.generic_hparams(kv, file_type)
        kv.add_sliding_window(self.cfg.positive(int, "sliding_window"))
        kv.add_expert_feed_forward_length(self.cfg.positive(int, "intermediate_size"))

    @classmethod
    def config_from_gguf(cls, kv: dict) -> dict:
        cfg = super().config_from_gguf(kv)
        cfg.update({"num_local_experts": cfg.pop("num_experts", None), "hidden_act": "silu",
                    "intermediate_size": kv.get("gpt-oss.expert_feed_forward_length"),
                    "sliding_window": kv.get("gpt-oss.attention.sliding_window")})
        cfg.pop("moe_intermediate_size", None)
        return {k: v for k, v in cfg.items() if v is not None}
