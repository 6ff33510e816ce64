"""Every family, end to end: convert a tiny random checkpoint, read it back with gguf's reader,
run it in llama.cpp and compare its logits with transformers' on the source checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import GGUFReader

from tests.helpers import convert_to
from tests.models import FAMILIES
from tests.oracles import ggml_quantize, hf_logits, llama_logits, rel_rms

IDS = list(range(1, 40))  # longer than gemma3's sliding window of 16


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    cache = {}

    def get(family):
        if family not in cache:
            rep = convert_to(tiny(family), "f32,q8_0,f16", out / family, threads=2)
            cache[family] = {o["target"]: o["path"] for o in rep.outputs}
        return cache[family]
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_logits_match_transformers(family, tiny, converted):
    files = converted(family)
    ref = hf_logits(tiny(family), IDS)
    f32 = llama_logits(files["f32"], IDS)
    # F32 differs only by float summation order: 1e-3 of the logits' RMS is far below any
    # mapping error (a wrong rope permutation or norm shift gives 10-50%)
    assert rel_rms(f32, ref) < 2e-3
    # the same top token wherever the reference's top two are not a near tie (a few 1e-4 apart
    # happen on random models, Qwen2-MoE's at position 11)
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2e-3 * np.sqrt((ref ** 2).mean())
    assert (f32.argmax(1) == ref.argmax(1))[clear].all()
    # Q8_0 rounds each weight to 1/254 of its block's max, and llama.cpp also rounds the
    # activations to Q8_0 in its matmuls: about 1-3% RMS on these models, measured. 6% bounds
    # that with margin and still fails any structural mistake.
    q8 = llama_logits(files["q8_0"], IDS)
    assert rel_rms(q8, ref) < 0.06
    assert (q8.argmax(1) == ref.argmax(1)).mean() >= 0.85


@pytest.mark.parametrize("family", FAMILIES)
def test_q8_0_bytes_are_ggml_bytes(family, converted):
    """Every Q8_0 tensor equals ggml_quantize_chunk of the F32 file's tensor (whose content the
    logits test vouches for); everything else keeps F32, or F16 where rows do not fit."""
    files = converted(family)
    f32 = {t.name: t for t in GGUFReader(files["f32"]).tensors}
    q8 = GGUFReader(files["q8_0"]).tensors
    assert [t.name for t in q8] == list(f32)
    n_q8 = 0
    for t in q8:
        src = np.asarray(f32[t.name].data, dtype=np.float32)
        rows = src.reshape(-1, src.shape[-1])
        if t.tensor_type == GT.Q8_0:
            n_q8 += 1
            expect = ggml_quantize(int(GT.Q8_0), rows)
            assert np.array_equal(np.asarray(t.data).reshape(-1), expect.reshape(-1)), t.name
        elif t.tensor_type == GT.F16:
            assert rows.shape[1] % 32 != 0, t.name  # F16 only as the fallback for odd rows
            assert np.array_equal(np.asarray(t.data).reshape(rows.shape), rows.astype(np.float16))
        else:
            assert t.tensor_type == GT.F32 and (src.ndim == 1 or t.name.endswith(("norm.weight", ".bias"))
                                                 or "position" in t.name or t.name == "position_embd.weight"
                                                 or t.name.endswith(("ffn_gate_inp.weight",  # routers stay F32
                                                                     "ffn_gate_inp_shexp.weight")))
    assert n_q8 > 0


def test_f16_is_numpy_rounding_of_f32(converted):
    files = converted("qwen2")
    f32 = {t.name: np.asarray(t.data) for t in GGUFReader(files["f32"]).tensors}
    for t in GGUFReader(files["f16"]).tensors:
        if t.tensor_type == GT.F16:
            assert np.array_equal(np.asarray(t.data), f32[t.name].astype(np.float16)), t.name


@pytest.mark.parametrize("family", ["llama", "llama-tied", "qwen2", "gpt2", "gpt_neox"])
def test_llama_cpp_tokenizes_like_the_checkpoint(family, tiny, converted):
    from llama_cpp import Llama
    from tokenizers import Tokenizer

    from tests.text import TEXT

    tok = Tokenizer.from_file(str(tiny(family) / "tokenizer.json"))
    llm = Llama(converted(family)["q8_0"], vocab_only=True, verbose=False)
    for text in [TEXT[:300], "Mr. Bennet's 31415 houses, 12 miles away!\n\n  It's  done."]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text, add_special_tokens=False).ids
    llm.close()


def test_sentencepiece_vocab(tiny, converted):
    import sentencepiece as spm
    from llama_cpp import Llama

    sp = spm.SentencePieceProcessor(model_file=str(tiny("gemma3") / "tokenizer.model"))
    llm = Llama(converted("gemma3")["q8_0"], vocab_only=True, verbose=False)
    text = "It is a truth universally acknowledged, that a single man"
    assert llm.tokenize(text.encode(), add_bos=True) == [2] + sp.encode(text)
    llm.close()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_metadata_keys(family, tiny, converted):
    r = GGUFReader(converted(family)["q8_0"])
    f = r.fields
    arch = f["general.architecture"].contents()
    assert arch == {"llama": "llama", "qwen2": "qwen2"}[family]
    assert f["general.file_type"].contents() == 7
    assert f["general.quantization_version"].contents() == 2
    assert f[f"{arch}.block_count"].contents() == 2
    assert f[f"{arch}.embedding_length"].contents() == 64
    assert f["tokenizer.ggml.model"].contents() == "gpt2"
    assert f["tokenizer.ggml.pre"].contents() == {"llama": "llama-bpe", "qwen2": "qwen2"}[family]
    assert "tokenizer.ggml.merges" in f and "tokenizer.chat_template" in f
    assert f["tokenizer.ggml.eos_token_id"].contents() == r.fields["tokenizer.ggml.eos_token_id"].contents()


def test_bf16_checkpoint_keeps_its_bits(tiny, tmp_path):
    """A bf16 checkpoint to --to bf16 is lossless: 2-D weights are the source bits."""
    from safetensors import safe_open

    src = tiny("llama", "bfloat16")
    rep = convert_to(src, "bf16", tmp_path, threads=2)
    r = GGUFReader(rep.outputs[0]["path"])
    out = {t.name: t for t in r.tensors}
    with safe_open(src / "model.safetensors", "pt") as f:
        import torch
        emb = f.get_tensor("model.embed_tokens.weight").view(torch.int16).numpy().view(np.uint16)
        down = f.get_tensor("model.layers.1.mlp.down_proj.weight").view(torch.int16).numpy().view(np.uint16)
    assert out["token_embd.weight"].tensor_type == GT.BF16
    assert np.array_equal(np.asarray(out["token_embd.weight"].data).view(np.uint16).reshape(emb.shape), emb)
    assert np.array_equal(np.asarray(out["blk.1.ffn_down.weight"].data).view(np.uint16).reshape(down.shape), down)
    assert out["blk.0.attn_norm.weight"].tensor_type == GT.F32
