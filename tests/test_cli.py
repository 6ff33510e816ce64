"""The command line as users meet it: outputs, reports, exit codes, one-line errors, nothing
half-written."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from qconvert.writers import atomic
from tests.helpers import copy_model, files_in, one_line_error, run_cli, signal_mid_write


@pytest.fixture()
def model(tiny, tmp_path):
    return copy_model(tiny("qwen2"), tmp_path / "My-Model")


def test_default_output_name_in_current_directory(model, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = run_cli([model, "--to", "q8_0"], capsys)
    assert code == 0, err
    assert files_in(work) == ["My-Model-Q8_0.gguf"]
    assert "wrote" in out and "My-Model-Q8_0.gguf" in out


def test_json_report_and_two_targets_from_one_read(model, tmp_path, capsys):
    code, out, err = run_cli([model, "--to", "f16,q8_0", "-o", tmp_path / "out", "--json", "-j", "2"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert [o["target"] for o in rep["outputs"]] == ["f16", "q8_0"]
    for o in rep["outputs"]:
        data = Path(o["path"]).read_bytes()
        assert o["bytes"] == len(data)
        assert o["sha256"] == hashlib.sha256(data).hexdigest()
        assert len(GGUFReader(o["path"]).tensors) == o["tensors"]
    assert rep["outputs"][1]["bits_per_weight"] < rep["outputs"][0]["bits_per_weight"]
    assert rep["architecture"] == "Qwen2ForCausalLM" and rep["n_params"] > 0 and rep["peak_rss_bytes"] > 0
    assert rep["inputs"][0]["path"].endswith("model.safetensors")
    assert err == ""  # not a terminal: no progress bars


def test_dry_run_prints_the_plan_and_writes_nothing(model, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run_cli([model, "--to", "q8_0,f16", "-o", out_dir, "--dry-run", "--json"], capsys)
    assert code == 0, err
    assert not out_dir.exists()
    plan = json.loads(out)
    assert plan["dry_run"] is True
    emb = next(t for t in plan["tensors"] if t["name"] == "token_embd.weight")
    assert emb["types"] == ["Q8_0", "F16"]
    norm = next(t for t in plan["tensors"] if t["name"] == "blk.0.attn_norm.weight")
    assert norm["types"] == ["F32", "F32"]
    # the planned sizes are the sizes that get written
    code, out, _ = run_cli([model, "--to", "q8_0,f16", "-o", out_dir, "--json"], capsys)
    real = json.loads(out)
    assert [o["bytes"] for o in real["outputs"]] == [o["bytes"] for o in plan["outputs"]]
    code, out, _ = run_cli([model, "--to", "q8_0", "--dry-run", "-o", tmp_path / "x"], capsys)
    assert code == 0 and "token_embd.weight" in out and "bits per weight" in out


def test_quiet_prints_nothing(model, tmp_path, capsys):
    code, out, err = run_cli([model, "--to", "q8_0", "-o", tmp_path, "-q"], capsys)
    assert (code, out, err) == (0, "", "")


def test_output_file_name(model, tmp_path, capsys):
    code, _, err = run_cli([model, "--to", "f16", "-o", tmp_path / "named.gguf"], capsys)
    assert code == 0, err
    assert files_in(tmp_path) == ["My-Model", "named.gguf"]
    code, _, err = run_cli([model, "--to", "f16,q8_0", "-o", tmp_path / "named.gguf"], capsys)
    assert code == 2
    one_line_error(err, "output directory")


def test_existing_output_needs_force(model, tmp_path, capsys):
    target = tmp_path / "My-Model-Q8_0.gguf"
    target.write_bytes(b"GGUF an older file")
    code, _, err = run_cli([model, "--to", "q8_0", "-o", tmp_path], capsys)
    assert code == 4
    one_line_error(err, str(target), "--force")
    assert target.read_bytes() == b"GGUF an older file"
    code, _, err = run_cli([model, "--to", "q8_0", "-o", tmp_path, "--force"], capsys)
    assert code == 0, err
    assert target.read_bytes()[:4] == b"GGUF" and len(target.read_bytes()) > 1000


def test_force_replaces_only_gguf_files(model, tmp_path, capsys):
    """--force replaces what qconvert writes, never a file of another kind under the output's name."""
    target = tmp_path / "My-Model-Q8_0.gguf"
    target.write_bytes(b"precious")
    code, _, err = run_cli([model, "--to", "q8_0", "-o", tmp_path, "--force"], capsys)
    assert code == 4
    one_line_error(err, str(target), "not a GGUF file")
    assert target.read_bytes() == b"precious"


def test_unusable_output_directory(model, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run_cli([model, "--to", "q8_0", "-o", blocker / "sub" / ""], capsys)
    assert code == 4
    one_line_error(err, "a-file")


def test_not_enough_disk_is_found_before_writing(model, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    code, _, err = run_cli([model, "--to", "q8_0", "-o", tmp_path / "out"], capsys)
    assert code == 4
    one_line_error(err, "not enough disk space")
    assert files_in(tmp_path / "out") == []


def test_disk_full_while_writing_leaves_nothing(model, tmp_path, capsys, monkeypatch):
    import errno

    calls = {"n": 0}
    real_write = atomic.AtomicFile.write

    def failing_write(self, data):
        calls["n"] += 1
        if calls["n"] == 5:
            self._error = OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)
    monkeypatch.setattr(atomic.AtomicFile, "write", failing_write)
    code, _, err = run_cli([model, "--to", "q8_0,f16", "-o", tmp_path / "out"], capsys)
    assert code == 4
    one_line_error(err, "disk full")
    assert files_in(tmp_path / "out") == []


def test_interrupt_removes_outputs(model, tmp_path, capsys, monkeypatch):
    """Ctrl-C (and SIGTERM, which the CLI turns into the same) mid-write: exit 130, nothing left."""
    import signal

    signal_mid_write(monkeypatch, signal.SIGTERM)
    code, _, err = run_cli([model, "--to", "q8_0,f16", "-o", tmp_path / "out"], capsys)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert code == 130
    one_line_error(err, "interrupted")
    assert files_in(tmp_path / "out") == []


def test_unknown_target_is_a_usage_error(model, capsys):
    code, _, err = run_cli([model, "--to", "q3_xs"], capsys)
    assert code == 2
    one_line_error(err, "q3_xs", "q8_0")


def test_missing_model(tmp_path, capsys):
    code, _, err = run_cli([tmp_path / "nope", "--to", "q8_0"], capsys)
    assert code == 3
    one_line_error(err, "nope")


def test_inspect(model, tmp_path, capsys):
    run_cli([model, "--to", "q8_0", "-o", tmp_path / "out"], capsys)
    f = tmp_path / "out" / "My-Model-Q8_0.gguf"
    code, out, err = run_cli(["inspect", f, "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["types"]["Q8_0"] > 0 and info["types"]["F32"] > 0
    assert info["metadata"]["general.architecture"] == "qwen2"
    assert 8.0 < info["bits_per_weight"] < 9.0
    code, out, _ = run_cli(["inspect", f, "--tensors"], capsys)
    assert code == 0 and "token_embd.weight" in out and "bits per weight" in out
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 20)
    code, _, err = run_cli(["inspect", bad], capsys)
    assert code == 3
    one_line_error(err, "bad.gguf")


def test_hub_id_from_offline_cache(tiny, tmp_path):
    """A hub id resolves through huggingface_hub's cache layout, offline, as a user's cache would."""
    home = tmp_path / "hf"
    snap = home / "hub" / "models--tiny-org--Tiny-Qwen" / "snapshots" / ("a" * 40)
    copy_model(tiny("qwen2"), snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "qconvert", "tiny-org/Tiny-Qwen", "--to", "q8_0", "-o", out, "--json"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["outputs"][0]["path"] == str(out / "Tiny-Qwen-Q8_0.gguf")
    assert GGUFReader(out / "Tiny-Qwen-Q8_0.gguf").fields["general.name"].contents() == "tiny-org/Tiny-Qwen"
    # --revision picks another snapshot through its ref
    other = snap.parent / ("b" * 40)
    copy_model(tiny("qwen3"), other)
    (snap.parents[1] / "refs" / "v2").write_text("b" * 40)
    r = subprocess.run([sys.executable, "-m", "qconvert", "tiny-org/Tiny-Qwen", "--revision", "v2", "--to", "q8_0",
                        "-o", out / "v2", "--json"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["architecture"] == "Qwen3ForCausalLM"
    r = subprocess.run([sys.executable, "-m", "qconvert", "tiny-org/Not-There", "--to", "q8_0", "-o", out],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 3
    one_line_error(r.stderr, "tiny-org/Not-There", "HF_HUB_OFFLINE")


def test_version_and_help(capsys):
    from qconvert import __version__

    from qconvert.quant import blocks

    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and __version__ in out
    # which kernels run: numpy in the QCONVERT_PUREPYTHON=1 pass, C otherwise (AVX2 unless turned off)
    if blocks.PURE_PYTHON:
        assert "kernels: numpy" in out
    elif os.environ.get("QCONVERT_NO_SIMD"):
        assert "kernels: plain C" in out
    else:
        assert "kernels: C with AVX2" in out or "kernels: plain C" in out
    code, out, _ = run_cli(["convert", "--help"], capsys)
    assert code == 0 and "--to" in out and "Examples" in out


def test_threads_do_not_change_bytes(model, tmp_path, capsys):
    for j in (1, 2):
        run_cli([model, "--to", "q8_0", "-o", tmp_path / f"j{j}", "-j", j], capsys)
    a = (tmp_path / "j1" / "My-Model-Q8_0.gguf").read_bytes()
    assert a == (tmp_path / "j2" / "My-Model-Q8_0.gguf").read_bytes()
    assert np.frombuffer(a[:4], np.uint8).tobytes() == b"GGUF"
