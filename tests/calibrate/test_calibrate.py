"""Calibration end to end: text -> samples -> importance matrix -> calibrated 4-bit files."""
from __future__ import annotations

import filecmp
import json

import numpy as np
from gguf import GGUFReader

from qconvert.calibrate import text
from qconvert.pipeline import CalibrationOptions
from tests.helpers import convert_to, one_line_error, run_cli
from tests.oracles import hf_logits, llama_logits, rel_rms


def test_samples_are_deterministic_and_start_with_bos(tiny):
    d = tiny("llama")
    a = text.samples(d, None, 6, 64, seed=1, bos_id=5)
    b = text.samples(d, None, 6, 64, seed=1, bos_id=5)
    c = text.samples(d, None, 6, 64, seed=2, bos_id=5)
    assert a.tokens.shape == (6, 64) and np.array_equal(a.tokens, b.tokens) and not np.array_equal(a.tokens, c.tokens)
    assert (a.tokens[:, 0] == 5).all() and a.dataset == text.DEFAULT_NAME
    assert (text.samples(d, None, 2, 64, 0, None).tokens[:, 0] != 5).any()


def test_calib_files(tiny, tmp_path):
    d = tiny("qwen2")
    plain = tmp_path / "c.txt"
    plain.write_text("It is a truth universally acknowledged. " * 200)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": "It is a truth universally acknowledged. " * 20}) for _ in range(10)))
    for f in (plain, jsonl):
        s = text.samples(d, f, 4, 32, 0, None)
        assert s.tokens.shape == (4, 32) and s.dataset == str(f)


def test_bad_calib_files(tiny, tmp_path, capsys):
    d = tiny("qwen2")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"nope": 1}\n')
    code, _, err = run_cli([d, "--to", "q4_k_m", "--calib", bad, "-o", tmp_path / "x.gguf"], capsys)
    assert code == 3
    one_line_error(err, "bad.jsonl", "line 2")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    code, _, err = run_cli([d, "--to", "iq4_nl", "--calib", short, "-o", tmp_path / "x.gguf"], capsys)
    assert code == 3
    one_line_error(err, "short.txt", "fewer than one sample")
    assert not (tmp_path / "x.gguf").exists()


def test_imatrix_command_and_calibrated_default_agree(tiny, tmp_path, capsys):
    """`qconvert imatrix` then `--imatrix FILE` gives the same bytes as the one-step default, and
    llama.cpp runs the calibrated file. (Whether calibration helps is measured on real models by
    bench/quality.py: on a random tiny model 4-bit logits are noise either way.)"""
    d = tiny("llama-wide")
    im = tmp_path / "m.imatrix.gguf"
    code, out, err = run_cli(["imatrix", d, "-o", im, "--calib-samples", "8", "--calib-seq-len", "64", "--json"],
                             capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["entries"] == 7 * 8 and rep["samples"] == 8
    f = GGUFReader(im).fields
    assert f["general.type"].contents() == "imatrix" and f["imatrix.chunk_size"].contents() == 64
    calib = CalibrationOptions(samples=8, seq_len=64)
    one = convert_to(d, "q4_k_m", tmp_path / "one.gguf", threads=2, calibration=calib).outputs[0]
    two = convert_to(d, "q4_k_m", tmp_path / "two.gguf", threads=2, imatrix=im).outputs[0]
    a, b = GGUFReader(one["path"]), GGUFReader(two["path"])
    for x, y in zip(a.tensors, b.tensors):
        assert x.name == y.name and np.array_equal(np.asarray(x.data), np.asarray(y.data)), x.name
    assert a.fields["quantize.imatrix.dataset"].contents() == "qconvert:emma.txt"
    plain = convert_to(d, "q4_k_m", tmp_path / "plain.gguf", threads=2).outputs[0]
    assert not filecmp.cmp(plain["path"], one["path"], shallow=False)
    ids = list(range(1, 60))
    got = llama_logits(one["path"], ids)
    assert got.shape == (59, 400) and np.isfinite(got).all()
    assert rel_rms(got, hf_logits(d, ids)) < 1.0  # a damaged file (wrong scales, layout) gives far more


def test_existing_imatrix_output_needs_force(tiny, tmp_path, capsys):
    im = tmp_path / "m.imatrix.gguf"
    im.write_bytes(b"keep")
    code, _, err = run_cli(["imatrix", tiny("qwen2"), "-o", im], capsys)
    assert code == 4
    one_line_error(err, "--force")
    assert im.read_bytes() == b"keep"
