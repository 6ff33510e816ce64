"""The dense families added after the first six (Granite, SmolLM3, OLMo 2, Gemma 2) where their
configs leave llama.cpp's defaults: what llama.cpp can be told is written and runs as
transformers does; what it cannot be told refuses a GGUF file with a one-line error, while the
forward (and so the safetensors targets) follows transformers."""
from __future__ import annotations

import json

import numpy as np
from gguf import GGUFReader

from tests.helpers import copy_model, files_in, one_line_error, run_cli
from tests.oracles import assert_forward_equals_transformers, hf_logits, llama_logits, rel_rms

IDS = list(range(1, 40))  # longer than gemma2's window of 16


def variant(tiny, tmp_path, family: str, **changes) -> object:
    """A copy of the tiny `family` model with config.json entries changed (None: removed)."""
    d = copy_model(tiny(family), tmp_path / f"{family}-variant")
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def llama_cpp_runs_it(d, tmp_path, capsys) -> dict:
    out = tmp_path / "f32.gguf"
    code, _, err = run_cli([d, "--to", "f32", "-o", out, "-q"], capsys)
    assert code == 0, err
    assert rel_rms(llama_logits(out, IDS), hf_logits(d, IDS)) < 2e-3
    return {k: f.contents() for k, f in GGUFReader(out).fields.items() if not k.startswith("GGUF.")}


def gguf_refused(d, tmp_path, capsys, *needles: str) -> None:
    out = tmp_path / "refused"
    code, _, err = run_cli([d, "--to", "q8_0", "-o", out / "m.gguf"], capsys)
    assert code == 3
    one_line_error(err, *needles)
    assert files_in(out) == []


def test_smollm3_rope_pattern(tiny, tmp_path, capsys):
    """llama.cpp's smollm3 leaves rope out of every 4th layer, and only that: another pattern
    runs in our forward as in transformers, and a GGUF file is refused."""
    d = variant(tiny, tmp_path, "smollm3", no_rope_layers=[1, 0, 1, 1])
    assert_forward_equals_transformers(d, [IDS])
    gguf_refused(d, tmp_path, capsys, "no_rope_layers", "layers [1]", "smollm3")
    code, _, err = run_cli([d, "--to", "gptq", "-o", tmp_path / "gptq", "-q", "--group-size", "64",
                            "--calib-samples", "4", "--calib-seq-len", "32"], capsys)
    assert code == 0, err


def test_gemma2_attention_scale_and_rope_theta(tiny, tmp_path, capsys):
    """A query_pre_attn_scalar that llama.cpp's gemma2 would not use refuses the GGUF file; a rope
    theta other than llama.cpp's 10000 is written (the converter drops it) and runs there."""
    d = variant(tiny, tmp_path, "gemma2", query_pre_attn_scalar=32)
    assert_forward_equals_transformers(d, [IDS])
    gguf_refused(d, tmp_path, capsys, "query_pre_attn_scalar", "gemma2")
    d = variant(tiny, tmp_path / "theta", "gemma2", rope_parameters={"rope_theta": 500.0, "rope_type": "default"})
    assert_forward_equals_transformers(d, [IDS])
    kv = llama_cpp_runs_it(d, tmp_path / "theta", capsys)
    assert kv["gemma2.rope.freq_base"] == 500.0


def test_gemma2_without_soft_capping(tiny, tmp_path, capsys):
    """An explicit null soft-cap is none in transformers (an absent one is Gemma2Config's 50 / 30):
    the forward follows, and a GGUF file is refused (llama.cpp's gemma2 always caps)."""
    d = variant(tiny, tmp_path, "gemma2")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "attn_logit_softcapping": None,
                                               "final_logit_softcapping": None}))
    assert_forward_equals_transformers(d, [IDS])
    gguf_refused(d, tmp_path, capsys, "attn_logit_softcapping", "gemma2")


def test_olmo2_ignores_clip_qkv(tiny, tmp_path, capsys):
    """OLMo 2 takes no clip_qkv (transformers and llama.cpp ignore the key; OLMoE clamps)."""
    d = variant(tiny, tmp_path, "olmo2", clip_qkv=0.01)
    assert_forward_equals_transformers(d, [IDS])
    llama_cpp_runs_it(d, tmp_path, capsys)


def test_olmo3_sliding_rope_theta(tiny, tmp_path, capsys):
    """OLMo 3 whose sliding layers' rope theta differs from its full layers': our forward follows
    transformers; a GGUF file is refused (llama.cpp's olmo2 ropes every layer with one theta)."""
    d = variant(tiny, tmp_path, "olmo3")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"]["sliding_attention"]["rope_theta"] = 10000.0
    (d / "config.json").write_text(json.dumps(cfg))
    assert_forward_equals_transformers(d, [IDS])
    gguf_refused(d, tmp_path, capsys, "rope theta", "olmo2")


def test_olmo3_yarn_on_full_layers(tiny, tmp_path, capsys):
    """The long-context OLMo 3's YaRN applies to its full layers only: our forward and llama.cpp
    on our file give transformers' logits."""
    d = variant(tiny, tmp_path, "olmo3")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"]["full_attention"] = {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0,
                                                "original_max_position_embeddings": 32}
    (d / "config.json").write_text(json.dumps(cfg))
    assert_forward_equals_transformers(d, [IDS])
    llama_cpp_runs_it(d, tmp_path, capsys)


def test_granite_multipliers_absent(tiny, tmp_path, capsys):
    """A Granite config without its multipliers runs with transformers' 1.0 for each; the file
    says so (llama.cpp would take an absent attention scale for 1/sqrt(head_dim))."""
    d = variant(tiny, tmp_path, "granite", attention_multiplier=None, embedding_multiplier=None,
                residual_multiplier=None, logits_scaling=None)
    assert_forward_equals_transformers(d, [IDS])
    kv = llama_cpp_runs_it(d, tmp_path, capsys)
    assert [kv[f"granite.{k}"] for k in ("attention.scale", "embedding_scale", "residual_scale", "logit_scale")] == \
        [1.0] * 4
    kv = llama_cpp_runs_it(tiny("granite"), tmp_path / "given", capsys)
    assert np.allclose([kv["granite.attention.scale"], kv["granite.embedding_scale"], kv["granite.residual_scale"],
                        kv["granite.logit_scale"]], [0.2, 4.0, 0.5, 2.0])
