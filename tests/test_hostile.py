"""One test for each defect an adversarial pass found (issue 15): nothing a user has is lost,
nothing is written that does not load, every failure is one line with its exit code, and no
output is left behind. tests/test_fuzz.py covers the same ground with generated cases."""
from __future__ import annotations

import json
import os
import signal
import struct
from pathlib import Path

import pytest
from gguf import GGUFReader

from qconvert.writers import atomic
from tests.helpers import copy_model, files_in, one_line_error, run_cli, signal_mid_write

SMALL = ["--calib-samples", "2", "--calib-seq-len", "32", "--group-size", "32"]


@pytest.fixture()
def model(tiny, tmp_path):
    return copy_model(tiny("llama"), tmp_path / "model")


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def edit_config(model: Path, **changes) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg))


def st_rewrite(path: Path, change) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    new = change(header)
    h = json.dumps(new).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])


# 1. --force never deletes what qconvert did not write -----------------------------------------

@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_force_never_replaces_the_model_directory(model, capsys, method):
    before = snapshot(model)
    code, _, err = run_cli([model, "--to", method, "-o", model, "--force", *SMALL], capsys)
    assert code == 4
    one_line_error(err, str(model), "replaces only a previous qconvert", "choose another -o")
    assert snapshot(model) == before


def test_force_never_replaces_the_current_directory(model, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    code, _, err = run_cli([model, "--to", "gptq", "-o", ".", "--force", *SMALL], capsys)
    assert code == 4
    one_line_error(err, "notes.txt")
    assert (work / "notes.txt").read_text() == "mine"


def test_force_replaces_a_previous_output_of_the_same_kind_only(model, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli([model, "--to", "gptq", "-o", out, *SMALL], capsys)
    assert code == 0, err
    code, _, err = run_cli([model, "--to", "gptq", "-o", out, "--force", *SMALL, "--bits", "8"], capsys)
    assert code == 0, err  # a previous qconvert GPTQ output: replaced
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8
    before = snapshot(out)
    code, _, err = run_cli([model, "--to", "awq", "-o", out, "--force", *SMALL], capsys)
    assert code == 4  # a GPTQ output is not replaced by AWQ
    one_line_error(err, "GPTQ output, not AWQ")
    (out / "my-notes.md").write_text("mine")
    code, _, err = run_cli([model, "--to", "gptq", "-o", out, "--force", *SMALL], capsys)
    assert code == 4  # a file qconvert did not write is in it
    one_line_error(err, "my-notes.md")
    assert snapshot(out) == {**before, "my-notes.md": b"mine"}
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli([model, "--to", "gptq", "-o", empty, "--force", *SMALL], capsys)
    assert code == 0, err


# 2. what the config and the tensors say must agree before any compute ------------------------

BROKEN = {
    "missing tensor": (lambda m: st_rewrite(m / "model.safetensors", lambda h: {
        k: v for k, v in h.items() if k != "model.layers.1.mlp.up_proj.weight"}), "model.layers.1.mlp.up_proj.weight"),
    "more layers in the config": (lambda m: edit_config(m, num_hidden_layers=5), "5 decoder layers"),
    "empty header": (lambda m: st_rewrite(m / "model.safetensors", lambda h: {}), "no tensors"),
    "vocab_size against the embedding": (lambda m: edit_config(m, vocab_size=1000), "model.embed_tokens.weight"),
    "zero head_dim": (lambda m: edit_config(m, head_dim=0), "head_dim"),
    "zero hidden_size": (lambda m: edit_config(m, hidden_size=0), "hidden_size"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_inconsistent_checkpoints_are_refused_before_any_compute(model, tmp_path, capsys, case):
    brk, needle = BROKEN[case]
    brk(model)
    code, _, err = run_cli([model, "--to", "q8_0", "-o", tmp_path / "out"], capsys)
    assert code == 3
    one_line_error(err, needle)
    assert not (tmp_path / "out").exists()


# 3. shards stay inside the model directory -----------------------------------------------------

@pytest.mark.parametrize("where", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_shard_index_cannot_leave_the_model_directory(model, tmp_path, capsys, where):
    (tmp_path / "outside.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    raw = (model / "model.safetensors").read_bytes()
    names = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: where for n in names if n != "__metadata__"}}))
    code, _, err = run_cli([model, "--to", "q8_0", "-o", tmp_path / "out"], capsys)
    assert code == 3
    one_line_error(err, "not a file name inside the model directory")
    assert "header length" not in err and not (tmp_path / "out").exists()


# 4. sizes read from a file are bounded by the file before anything is allocated ----------------

@pytest.mark.parametrize("key", ["vocab_size", "num_hidden_layers"])
def test_huge_sizes_in_the_config(model, tmp_path, capsys, key):
    edit_config(model, **{key: 1_000_000_000})
    code, _, err = run_cli([model, "--to", "q8_0", "-o", tmp_path / "out"], capsys)
    assert code == 3
    one_line_error(err, "config.json")


@pytest.fixture()
def gguf_file(model, tmp_path, capsys) -> Path:
    out = tmp_path / "m.gguf"
    code, _, err = run_cli([model, "--to", "q8_0", "-o", out], capsys)
    assert code == 0, err
    return out


def patch_after_key(path: Path, key: str, fmt: str, *values) -> None:
    raw = bytearray(path.read_bytes())
    k = key.encode()
    at = raw.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)
    struct.pack_into(fmt, raw, at, *values)
    path.write_bytes(bytes(raw))


def test_gguf_array_of_arrays(gguf_file, capsys):
    patch_after_key(gguf_file, "tokenizer.ggml.tokens", "<IIQ", 9, 9, 2 ** 40)  # ARRAY of ARRAY, 2^40 items
    code, _, err = run_cli(["inspect", gguf_file], capsys)
    assert code == 3
    one_line_error(err, "array of arrays")


def test_eval_with_a_huge_block_count(gguf_file, model, tmp_path, capsys):
    patch_after_key(gguf_file, "llama.block_count", "<II", 4, 2 ** 31)
    (tmp_path / "t.txt").write_text("It is a truth universally acknowledged. " * 50)
    code, _, err = run_cli(["eval", gguf_file, "--text", tmp_path / "t.txt", "--tokenizer", model, "--ctx", "16"],
                           capsys)
    assert code == 3
    one_line_error(err, "block_count")


# 5. input problems are exit 3 and usage problems exit 2, never an internal error ---------------

INPUTS = {
    "zero attention heads": lambda m: edit_config(m, num_attention_heads=0),
    "deeply nested config": lambda m: (m / "config.json").write_text("[" * 100_000 + "]" * 100_000),
    "rope scaling without its keys": lambda m: edit_config(m, rope_scaling={"rope_type": "yarn"}),
    "rope scaling that is not an object": lambda m: edit_config(m, rope_scaling="linear"),
    "tokenizer_config that is a list": lambda m: (m / "tokenizer_config.json").write_text("[1, 2]"),
    "binary chat template": lambda m: (m / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": bytes(range(256)).decode("latin-1")})),
    "activation that is not a name": lambda m: edit_config(m, hidden_act=5),
}


@pytest.mark.parametrize("case", sorted(INPUTS))
def test_bad_inputs_are_never_internal_errors(model, tmp_path, capsys, case):
    INPUTS[case](model)
    out = tmp_path / "out"
    code, _, err = run_cli([model, "--to", "q4_k_m", "-o", out, "--calib-samples", "2", "--calib-seq-len", "32"],
                           capsys)
    assert code in (0, 3), err
    if code:
        one_line_error(err)
        assert not out.exists()
    else:  # what was written loads
        from llama_cpp import Llama

        Llama(str(next(out.glob("*.gguf"))), n_ctx=32, verbose=False).close()


def test_non_utf8_gguf_string(gguf_file, capsys):
    raw = bytearray(gguf_file.read_bytes())
    k = b"general.architecture"
    raw[raw.index(struct.pack("<Q", len(k)) + k) + 8 + len(k) + 4 + 8] = 0xFF
    gguf_file.write_bytes(bytes(raw))
    code, _, err = run_cli(["inspect", gguf_file], capsys)
    assert code == 3
    one_line_error(err, "not UTF-8")


@pytest.mark.parametrize("opts", [["--seed", "-1"], ["--calib-samples", "-1"], ["--calib-seq-len", "-5"],
                                  ["--threads", "-2"]])
def test_negative_numbers_are_usage_errors(model, tmp_path, capsys, opts):
    code, _, err = run_cli([model, "--to", "q4_k_m", "-o", tmp_path / "out", *opts], capsys)
    assert code == 2
    one_line_error(err, opts[0])


# 6. an importance matrix whose counts do not divide its sums is refused ------------------------

def test_imatrix_counts_must_divide_the_sums(model, tmp_path, capsys):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "bad.imatrix.gguf"
    w = GGUFWriter(str(path), "imatrix")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["x"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 32)
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones((1, 64), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight.counts", np.ones((1, 3), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code, _, err = run_cli([model, "--to", "q4_k_m", "--imatrix", path, "-o", tmp_path / "out"], capsys)
    assert code == 3
    one_line_error(err, "blk.0.attn_q.weight", "counts")


# 7. a file that appears while a run writes is never replaced without --force -------------------

def test_output_that_appears_meanwhile_is_kept(model, tmp_path, capsys, monkeypatch):
    target = tmp_path / "out" / "model-Q8_0.gguf"
    real = atomic.AtomicFile.commit

    def other_run_first(self):
        self.path.write_bytes(b"GGUF written by another run")
        return real(self)
    monkeypatch.setattr(atomic.AtomicFile, "commit", other_run_first)
    code, _, err = run_cli([model, "--to", "q8_0", "-o", tmp_path / "out"], capsys)
    assert code == 4
    one_line_error(err, "appeared while this run was writing it")
    assert target.read_bytes() == b"GGUF written by another run"
    assert files_in(tmp_path / "out") == ["model-Q8_0.gguf"]


def test_checkpoint_directory_that_appears_meanwhile_is_kept(model, tmp_path, capsys, monkeypatch):
    from qconvert.writers import safetensors

    out = tmp_path / "gptq"
    real = safetensors.AtomicDir.commit

    def other_run_first(self):
        self.path.mkdir()
        (self.path / "theirs").write_text("x")
        return real(self)
    monkeypatch.setattr(safetensors.AtomicDir, "commit", other_run_first)
    code, _, err = run_cli([model, "--to", "gptq", "-o", out, *SMALL], capsys)
    assert code == 4
    one_line_error(err, "appeared while this run was writing it")
    assert files_in(out) == ["theirs"] and files_in(tmp_path) == ["gptq", "model"]


# 8. nothing left behind: hang-ups, killed runs, failures after planning ------------------------

def test_hangup_removes_outputs(model, tmp_path, capsys, monkeypatch):
    signal_mid_write(monkeypatch, signal.SIGHUP)
    code, _, err = run_cli([model, "--to", "q8_0,f16", "-o", tmp_path / "out" / "new"], capsys)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    assert code == 130
    one_line_error(err, "interrupted")
    assert not (tmp_path / "out").exists()  # the directories this run made go too


def test_a_killed_runs_partial_files_are_cleaned(model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead = out / ".model-Q8_0.gguf.999999999.partial"  # no such process
    dead.write_bytes(b"GGUF half")
    alive = out / f".model-Q8_0.gguf.{os.getppid()}.partial"  # a running process's: left alone
    alive.write_bytes(b"GGUF other")
    dead_dir = out / ".model-GPTQ.999999999.partial"
    dead_dir.mkdir()
    (dead_dir / "model.safetensors").write_bytes(b"half")
    code, _, err = run_cli([model, "--to", "q8_0", "-o", out], capsys)
    assert code == 0, err
    code, _, err = run_cli([model, "--to", "gptq", "-o", out / "model-GPTQ", *SMALL], capsys)
    assert code == 0, err
    assert files_in(out) == sorted([alive.name, "model-GPTQ", "model-Q8_0.gguf"])


def test_failure_after_planning_leaves_no_directory(model, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli([model, "--to", "q8_0", "-o", tmp_path / "new" / "deeper" / ""], capsys)
    assert code == 3
    one_line_error(err, "down_proj", "nan")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("recipe,value", [("q8_0", 1e7), ("iq3_s", 4e7), ("iq2_s", 2e7), ("iq1_m", 2e6)])
def test_values_a_type_cannot_store_are_refused(recipe, value, tiny, tmp_path, capsys):
    """Beyond a type's largest magnitude its f16 scale overflows (and from ~1e12 ggml's lattice
    search aborts the process): refused, naming the tensor, the value and the type, no file left."""
    from safetensors.torch import load_file, save_file

    model = copy_model(tiny("llama-wide"), tmp_path / "m")
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"][3, 7] = -value
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    calib = {"q8_0": [], "iq3_s": ["--no-calib"]}.get(recipe, ["--calib-samples", "2", "--calib-seq-len", "16"])
    code, _, err = run_cli([model, "--to", recipe, *calib, "-o", out / "x.gguf"], capsys)
    assert code == 3, err
    one_line_error(err, "model.layers.2.mlp.up_proj.weight", f"{value:.4g}", "--to " + recipe)
    assert not out.exists() or files_in(out) == []


# 9. messages: one line, plain text, brackets kept ---------------------------------------------

def test_brackets_in_paths_and_messages_survive(tmp_path, capsys, tiny):
    model = copy_model(tiny("llama"), tmp_path / "[v2]model")
    st_rewrite(model / "model.safetensors", lambda h: {**h, "model.norm.weight": {
        **h["model.norm.weight"], "data_offsets": [0]}})
    code, _, err = run_cli([model, "--to", "q8_0", "-o", tmp_path / "out"], capsys)
    assert code == 3
    one_line_error(err, "[v2]model", "data_offsets must be [begin, end]")


def test_colour_codes_and_line_breaks_are_folded(model, capsys, monkeypatch):
    """torch's messages carry colour codes, YAML's span lines: printed as one plain line."""
    from qconvert import plan
    from qconvert.errors import InputError

    def broken(*a, **k):
        raise InputError("\x1b[31mred\x1b[0m text\nsecond line\n  third [x]")
    monkeypatch.setattr(plan, "metadata_kv", broken)
    code, _, err = run_cli([model, "--to", "q8_0", "--dry-run"], capsys)
    assert code == 3
    assert err == "error: red text second line third [x]\n"


def test_gguf_outputs_of_the_hardened_paths_still_load(model, tmp_path, capsys):
    """The checks refuse nothing a valid checkpoint has (every family's tiny model converts)."""
    code, _, err = run_cli([model, "--to", "q8_0", "-o", tmp_path], capsys)
    assert code == 0, err
    assert len(GGUFReader(tmp_path / "model-Q8_0.gguf").tensors) > 0
