"""One pipeline for every target: any mix of targets in one command gives the bytes of separate
runs, with one read for the GGUF files and one calibration pass per method; options that apply
to none of the chosen targets are usage errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qconvert.calibrate.driver import native_bf16, native_int8

from tests.golden_outputs import tree_hash
from tests.helpers import files_in, one_line_error, run_cli

CALIB = ["--calib-samples", "4", "--calib-seq-len", "64", "-j", "2"]


def test_one_command_gives_the_bytes_of_separate_runs(tiny, tmp_path, capsys):
    src = tiny("llama-wide")  # widths 256 and 512: the default group size fits
    code, out, err = run_cli([src, "--to", "q4_k_m,iq4_nl,gptq,awq,q8_0", "-o", tmp_path / "all", *CALIB, "--json"],
                             capsys)
    assert code == 0, err
    report = json.loads(out)
    name = src.name
    assert files_in(tmp_path / "all") == sorted([f"{name}-Q4_K_M.gguf", f"{name}-IQ4_NL.gguf", f"{name}-GPTQ",
                                                 f"{name}-AWQ", f"{name}-Q8_0.gguf"])
    passes = report["calibration"]["passes"]
    assert [(p["method"], p["targets"]) for p in passes] == [("imatrix", ["q4_k_m", "iq4_nl"]), ("gptq", ["gptq"]),
                                                             ("awq", ["awq"])]
    assert [p["feeds"] for p in passes] == ["float outputs", "quantized outputs", "float outputs"]
    assert [p["forward"] for p in passes] == ["int8" if native_int8() else "float32",
                                              "bfloat16" if native_bf16() else "float32", "float32"]
    for o in report["outputs"]:
        assert Path(o["path"]).parent == tmp_path / "all"
        if o["kind"] == "checkpoint":
            assert o["n_linears"] == 7 * 8 and o["layers"]
    for target in ("q4_k_m", "iq4_nl", "gptq", "awq", "q8_0"):
        opts = CALIB if target != "q8_0" else ["-j", "2"]  # q8_0 takes no calibration options
        code, out, err = run_cli([src, "--to", target, "-o", tmp_path / target, *opts, "--json"], capsys)
        assert code == 0, err
        alone = json.loads(out)["outputs"][0]
        together = next(o for o in report["outputs"] if o["target"] == target)
        assert tree_hash(Path(alone["path"])) == tree_hash(Path(together["path"])), target
        assert alone["sha256"] == together["sha256"]


MIXTURES = "the GGUF mixtures (q4_k_m, iq4_xs, ...)"


@pytest.mark.parametrize("args,flag,users", [
    (["--to", "q8_0", "--bits", "3"], "--bits", "awq, gptq, hqq"),
    (["--to", "q8_0,f16", "--calib-samples", "8"], "--calib-samples", f"{MIXTURES}, awq, gptq, w8a8"),
    (["--to", "gptq", "--tensor-type", "attn=q8_0"], "--tensor-type", MIXTURES),
    (["--to", "gptq", "--pure"], "--pure", MIXTURES),
    (["--to", "awq", "--no-act-order"], "--no-act-order", f"{MIXTURES}, gptq, w8a8"),
    (["--to", "awq,q4_k_m", "--damp", "0.1"], "--damp", "gptq, w8a8 and the GGUF mixtures with --method gptq"),
    (["--to", "q8_0", "--imatrix", "m.gguf"], "--imatrix", MIXTURES),
])
def test_options_for_no_chosen_target_are_usage_errors(tiny, tmp_path, capsys, args, flag, users):
    code, _, err = run_cli([tiny("llama"), *args, "-o", tmp_path / "out"], capsys)
    assert code == 2
    one_line_error(err, f"{flag} applies to {users}, not to --to")
    assert not (tmp_path / "out").exists()


def test_options_for_one_of_the_targets_are_taken(tiny, tmp_path, capsys):
    code, out, err = run_cli([tiny("llama"), "--to", "q8_0,gptq", "--group-size", "32", "-o", tmp_path / "o",
                              *CALIB, "--json"], capsys)
    assert code == 0, err
    assert [o["kind"] for o in json.loads(out)["outputs"]] == ["gguf", "checkpoint"]


def test_a_failing_pass_leaves_no_output_of_any_target(tiny, tmp_path, capsys, monkeypatch):
    """Outputs appear only when every one is complete: the GGUF files written before a
    checkpoint pass fails are removed with it."""
    import qconvert.calibrate.awq as awq_observer

    def broken(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(awq_observer.AWQObserver, "end", broken)
    code, _, err = run_cli([tiny("llama"), "--to", "q8_0,gptq,awq", "--group-size", "32", "-o", tmp_path / "o",
                            *CALIB], capsys)
    assert code == 130
    one_line_error(err, "interrupted")
    assert not (tmp_path / "o").exists()


def test_dry_run_of_a_mix(tiny, tmp_path, capsys):
    code, out, err = run_cli([tiny("llama"), "--to", "q4_k_m,awq", "--group-size", "32", "-o", tmp_path / "o",
                              "--dry-run"], capsys)
    assert code == 0, err
    assert "token_embd.weight" in out and "qweight" in out and not (tmp_path / "o").exists()
