from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qconvert.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()  # drop what set-up printed
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def convert_to(src, to: str, output, calibration=None, threads: int = 2, **kw):
    """The pipeline's job for `--to TO -o OUTPUT`; without `calibration` (or an `imatrix=`
    file) the mixtures round to nearest, as with --no-calib."""
    from qconvert import targets
    from qconvert.pipeline import CalibrationOptions, Job, convert

    return convert(Job(str(src), targets.parse(to), Path(output), threads=threads,
                       no_calib=calibration is None and kw.get("imatrix") is None,
                       calibration=calibration or CalibrationOptions(), **kw))


def router_choices(model, tokens, suffix: str, chosen_of) -> dict:
    """One forward of transformers' `model` on `tokens` [B, T]: for every router module whose
    name ends with `suffix`, its input and the experts it chose, `chosen_of(its output)` [tokens, k]."""
    import torch

    seen = {}
    for name, m in model.named_modules():
        if name.endswith(suffix):
            m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, (args[0], chosen_of(out))))
    with torch.no_grad():
        model(torch.from_numpy(tokens))
    return seen


def assert_expert_statistics(rec, layer: int, flat, chosen, n_experts: int) -> None:
    """Layer `layer`'s expert importance statistics (imatrix.collect's record) are exactly those
    of the router inputs `flat` [tokens, hidden] that `chosen` [tokens, k] sends to each expert:
    the count of its tokens and the sums of their squares."""
    import torch

    sums = rec.sums[f"blk.{layer}.ffn_gate_exps.weight"]
    counts = rec.counts[f"blk.{layer}.ffn_gate_exps.weight"]
    for e in range(n_experts):
        mine = (chosen == e).any(-1)
        assert counts[e] == int(mine.sum()), (layer, e)
        assert torch.allclose(sums[e], (flat[mine].double() ** 2).sum(0), rtol=1e-5, atol=1e-9), (layer, e)


def mixture_from_our_imatrix(src, recipe: str, tmp_path) -> dict:
    """qconvert's importance matrix of `src` given to llama_model_quantize with our f32 file and
    to qconvert's one step: asserts the two files the same bytes; returns ours's tensors."""
    from qconvert.pipeline import CalibrationOptions, make_imatrix
    from qconvert.read.imatrix import load_imatrix
    from tests.quant.test_recipes import FTYPES, llama_quantize_with_imatrix

    path = tmp_path / "m.imatrix.gguf"
    make_imatrix(str(src), path, CalibrationOptions(samples=4, seq_len=64), 2, False)
    f32 = convert_to(src, "f32", tmp_path / "f32.gguf").outputs[0]["path"]
    ref = tmp_path / "ref.gguf"
    llama_quantize_with_imatrix(f32, ref, FTYPES[recipe], load_imatrix(path).entries)
    return assert_same_gguf_tensors(convert_to(src, recipe, tmp_path / "ours.gguf", imatrix=path).outputs[0]["path"], ref)


def assert_same_gguf_tensors(path, ref) -> dict:
    """Every tensor of the GGUF file `ref` is in `path` with the same type, shape and bytes, and
    `path` holds no other; returns `path`'s tensors by name."""
    import numpy as np
    from gguf import GGUFReader

    a = {t.name: t for t in GGUFReader(path).tensors}
    ref_tensors = GGUFReader(ref).tensors
    assert sorted(a) == sorted(t.name for t in ref_tensors)
    for t in ref_tensors:
        assert a[t.name].tensor_type == t.tensor_type and a[t.name].shape.tolist() == t.shape.tolist(), t.name
        assert np.array_equal(np.asarray(a[t.name].data).view(np.uint8), np.asarray(t.data).view(np.uint8)), t.name
    return a


def signal_mid_write(monkeypatch, sig, at: int = 6) -> None:
    """Send `sig` to this process while the GGUF files are being written (at the `at`-th tensor)."""
    import signal

    from qconvert import stream

    real, seen = stream.float_chunks, {"n": 0}

    def signalled(t, threads):
        seen["n"] += 1
        if seen["n"] == at:
            signal.raise_signal(sig)
        yield from real(t, threads)
    monkeypatch.setattr(stream, "float_chunks", signalled)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def one_line_error(err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


__all__ = ["run_cli", "convert_to", "signal_mid_write", "copy_model", "files_in", "one_line_error", "pytest"]


def quantized_then_f32(src: Path, target: str, tmp_path: Path, capsys, method: str) -> tuple[Path, dict]:
    """`--to target`, then that checkpoint as the source of `--to f32`: (the checkpoint, the F32
    GGUF's tensors by name as torch); the report names `method` as the source's quantization."""
    import json

    import torch
    from gguf import GGUFReader

    q = tmp_path / target
    assert run_cli([src, "--to", target, "-o", q], capsys)[0] == 0
    out = tmp_path / "f32.gguf"
    code, stdout, err = run_cli([q, "--to", "f32", "-o", out, "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["source_quantization"]["quant_method"] == method
    return q, {t.name: torch.from_numpy(t.data.copy()) for t in GGUFReader(out).tensors}


def replaced_only_when_ours(src: Path, target: str, theirs: Path, moe: Path, tmp_path: Path, capsys) -> None:
    """--force replaces a previous qconvert output of `target`, not `theirs` (the reference
    library's own checkpoint); a mixture of experts `moe` is refused in one line."""
    out = tmp_path / f"ours-{target}"
    assert run_cli([src, "--to", target, "-o", out], capsys)[0] == 0
    assert run_cli([src, "--to", target, "-o", out, "--force"], capsys)[0] == 0
    code, _, err = run_cli([src, "--to", target, "-o", theirs, "--force"], capsys)
    assert code != 0
    one_line_error(err, "qconvert")
    code, _, err = run_cli([moe, "--to", target, "-o", tmp_path / "moe"], capsys)
    assert code == 2
    one_line_error(err, "mixture of experts")
