"""Reading checkpoints: every layout users have, and every way a checkpoint can be broken."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from gguf import GGUFReader

from tests.helpers import copy_model, files_in, one_line_error, run_cli


@pytest.fixture()
def model(tiny, tmp_path):
    return copy_model(tiny("llama"), tmp_path / "m")


def converted_tensors(path) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data).copy() for t in GGUFReader(path).tensors}


def test_sharded_and_bin_checkpoints_give_the_same_file(tiny, tmp_path, capsys):
    import torch
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(tiny("llama"), dtype=torch.float32)
    ref_dir = copy_model(tiny("llama"), tmp_path / "single")
    sharded = tmp_path / "sharded"
    m.save_pretrained(sharded, max_shard_size="60KB")
    binary = tmp_path / "binary"
    binary.mkdir()
    torch.save(m.state_dict(), binary / "pytorch_model.bin")  # the pre-safetensors layout
    for d in (sharded, binary):
        for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
            (d / f).write_bytes((ref_dir / f).read_bytes())
    assert len(list(sharded.glob("model-*.safetensors"))) > 2 and (sharded / "model.safetensors.index.json").exists()
    assert (binary / "pytorch_model.bin").exists() and not list(binary.glob("*.safetensors"))
    outs = {}
    for d in (ref_dir, sharded, binary):
        code, _, err = run_cli([d, "--to", "q8_0", "-o", tmp_path / "out" / d.name], capsys)
        assert code == 0, err
        outs[d.name] = converted_tensors(tmp_path / "out" / d.name / f"{d.name}-Q8_0.gguf")
    for name, data in outs["single"].items():
        assert np.array_equal(outs["sharded"][name], data), name
        assert np.array_equal(outs["binary"][name], data), name


def test_f16_checkpoint_to_f16_keeps_its_bits(tiny, tmp_path, capsys):
    from safetensors.numpy import load_file

    src = tiny("qwen2", "float16")
    code, _, err = run_cli([src, "--to", "f16", "-o", tmp_path / "out.gguf"], capsys)
    assert code == 0, err
    out = converted_tensors(tmp_path / "out.gguf")
    w = load_file(src / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert np.array_equal(out["blk.0.attn_q.weight"].reshape(w.shape), w)


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def expect_input_error(args, capsys, *needles, out_dir=None):
    code, _, err = run_cli(args, capsys)
    assert code == 3, err
    one_line_error(err, *needles)
    if out_dir is not None:
        assert files_in(out_dir) == []


def test_truncated_safetensors(model, tmp_path, capsys):
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    expect_input_error([model, "-o", tmp_path / "o"], capsys, "model.safetensors", "truncated", out_dir=tmp_path / "o")


def test_truncated_inside_header(model, tmp_path, capsys):
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    expect_input_error([model, "-o", tmp_path / "o"], capsys, "model.safetensors", "header")


def test_header_that_lies_about_sizes(model, tmp_path, capsys):
    def lie(h):
        h["model.norm.weight"]["shape"] = [128]
    _rewrite_header(model / "model.safetensors", lie)
    expect_input_error([model, "-o", tmp_path / "o"], capsys, "model.norm.weight", "needs 512 bytes")


def test_garbage_header(model, tmp_path, capsys):
    f = model / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[:8] + b"{not json" + raw[17:])
    expect_input_error([model, "-o", tmp_path / "o"], capsys, "model.safetensors", "JSON")


def test_missing_shard(tiny, tmp_path, capsys):
    import torch
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(tiny("qwen2"), dtype=torch.float32)
    d = tmp_path / "sharded"
    m.save_pretrained(d, max_shard_size="60KB")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    expect_input_error([d, "-o", tmp_path / "o"], capsys, victim.name, "not found")


def test_missing_config_key(model, tmp_path, capsys):
    cfg = json.loads((model / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (model / "config.json").write_text(json.dumps(cfg))
    expect_input_error([model, "-o", tmp_path / "o"], capsys, "config.json", "num_hidden_layers")


def test_corrupt_config(model, tmp_path, capsys):
    (model / "config.json").write_text("{\"architectures\": [")
    expect_input_error([model, "-o", tmp_path / "o"], capsys, "config.json", "JSON")


def test_missing_tokenizer(model, tmp_path, capsys):
    (model / "tokenizer.json").unlink()
    expect_input_error([model, "-o", tmp_path / "o"], capsys, "tokenizer", str(model))


def test_unknown_architecture(model, tmp_path, capsys):
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    expect_input_error([model, "-o", tmp_path / "o"], capsys, "MambaForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM")


def test_unknown_pre_tokenizer(model, tmp_path, capsys):
    tj = json.loads((model / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (model / "tokenizer.json").write_text(json.dumps(tj))
    expect_input_error([model, "-o", tmp_path / "o"], capsys, "tokenizer.json", "unknown BPE pre-tokenizer")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_weight_is_named(model, tmp_path, capsys, bad):
    from safetensors.numpy import load_file, save_file

    f = model / "model.safetensors"
    tensors = load_file(f)
    w = tensors["model.layers.1.mlp.up_proj.weight"].copy()
    w[3, 17] = bad
    tensors["model.layers.1.mlp.up_proj.weight"] = w
    save_file(tensors, f, metadata={"format": "pt"})
    expect_input_error([model, "--to", "q8_0,f16", "-o", tmp_path / "o"], capsys,
                       "model.layers.1.mlp.up_proj.weight", "row 3, column 17", "model.safetensors",
                       out_dir=tmp_path / "o")


def test_quantized_checkpoint_is_refused(model, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    f = model / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].astype(np.int8)
    save_file(tensors, f, metadata={"format": "pt"})
    expect_input_error([model, "-o", tmp_path / "o"], capsys, "model.layers.0.mlp.up_proj.weight", "I8")


def test_values_beyond_f16_are_refused_not_written_as_inf(model, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    f = model / "model.safetensors"
    tensors = load_file(f)
    w = tensors["model.layers.0.mlp.down_proj.weight"].copy()
    w[0, 0] = 1e5
    tensors["model.layers.0.mlp.down_proj.weight"] = w
    save_file(tensors, f, metadata={"format": "pt"})
    expect_input_error([model, "--to", "f16", "-o", tmp_path / "o"], capsys,
                       "model.layers.0.mlp.down_proj.weight", "1e+05", "F16", out_dir=tmp_path / "o")
    code, _, err = run_cli([model, "--to", "q8_0,bf16", "-o", tmp_path / "o"], capsys)
    assert code == 0, err  # Q8_0's scale 1e5/127 fits f16
