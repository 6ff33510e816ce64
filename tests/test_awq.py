"""AWQ: the scale and clip searches, the GEMM layout against AutoAWQ 0.2.9's own unpacking, and
loading by GPTQModel 7.7.0 and transformers with it, whose logits must equal our own forward on
the dequantized checkpoint within float16 noise."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from qconvert.arch.llama import Llama
from qconvert.quant import awq
from qconvert.layouts import AWQ, Params, pack_interleaved, unpack_interleaved
from tests.helpers import files_in, one_line_error, run_cli
from tests.test_gptq import assert_loaders_agree, make_gptq, rel

pytestmark = pytest.mark.kernel_free  # no GGUF blocks: the C pass covers it

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
CASES = [("llama", 32), ("llama-tied", 64), ("mistral", 32), ("qwen2", 32), ("qwen3", 64), ("gemma3", 32),
         ("granite", 32), ("smollm3", 64), ("olmo2", 32), ("olmo3", 64), ("gemma2", 64),
         ("phi3", 32),
         ("gpt_neox-64", 32), ("gpt2", 64)]
# loader bugs outside our reach: see test_gptq.py's NOT_GPTQMODEL_LOAD and NOT_TRANSFORMERS


def outlier_problem(seed=0, k=128, n=96, tokens=1024):
    """Inputs with a few large channels (what AWQ is for) and a weight."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g)
    x[:, :4] *= 20
    return x, torch.randn(n, k, generator=g) * 0.05


def test_scale_search_beats_round_to_nearest():
    x, w = outlier_problem()
    ref = x @ w.T
    rtn = x @ awq.pseudo_quantize(w, 32)[0].T
    s, ratio = awq.best_scale(x, [w], 32, lambda ws, xs: xs @ ws[0].T)
    scaled = (x / s) @ awq.pseudo_quantize(w * s, 32)[0].T
    assert (scaled - ref).pow(2).mean() < 0.8 * (rtn - ref).pow(2).mean()
    assert ratio is not None and 0 < ratio <= 1 and torch.isfinite(s).all()


def full_grid_ratio(x, w, group):
    """llm-compressor's search written out: no scaling, then every ratio i/18 of duo scaling, on
    every input; the first lowest error wins (None: no scaling)."""
    x_mean = x.abs().mean(0)
    w_abs = w.abs().reshape(-1, group)
    w_mean = (w_abs / (w_abs.amax(1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)
    errs, ratios = [], [None] + [i / 18 for i in range(19)]
    for r in ratios:
        s = torch.ones_like(x_mean) if r is None else (x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        errs.append(float(((x / s) @ awq.pseudo_quantize(w * s, group)[0].T - x @ w.T).double().pow(2).sum()))
    return ratios[errs.index(min(errs))]


@pytest.mark.parametrize("seed", range(4))
def test_pruned_scale_search_keeps_the_full_search_choice(seed, monkeypatch):
    x, w = outlier_problem(seed + 10, tokens=512)
    rows = []

    def run(ws, xs):
        rows.append(len(xs))
        return xs @ ws[0].T
    _, ratio = awq.best_scale(x, [w], 32, run)
    assert ratio == full_grid_ratio(x, w, 32)
    assert sum(rows) == 512 + 20 * 128 + awq.PRUNE_KEEP * 384  # one reference, 20 trials on a quarter, the rest for the kept
    monkeypatch.setattr(awq, "PRUNE_KEEP", len(awq.GRID))  # no pruning: the full search exactly
    assert awq.best_scale(x, [w], 32, lambda ws, xs: xs @ ws[0].T)[1] == full_grid_ratio(x, w, 32)


@pytest.mark.parametrize("seed", range(4))
def test_gram_search_is_the_full_search(seed):
    """A linear compared alone is judged from X^T X: every candidate's error equals its output's
    squared error over every token, and the choice is the unpruned search's."""
    x, w = outlier_problem(seed + 20, tokens=512)
    x_mean = x.abs().mean(0)
    w_mean = awq.weight_mean([w], 32)
    errors = awq.gram_scale_errors(w, x.T @ x, x_mean, w_mean, 32)
    for c, (r, duo) in enumerate(awq.GRID):
        s = awq._scales(x_mean, w_mean, r, duo)
        direct = float(((x / s) @ awq.pseudo_quantize(w * s, 32)[0].T - x @ w.T).double().pow(2).sum())
        assert errors[c] == pytest.approx(direct, rel=1e-4)
    best = min(errors, key=lambda c: (errors[c], c))
    assert (awq.GRID[best][0] if awq.GRID[best][1] else None) == full_grid_ratio(x, w, 32)


def test_scale_search_refuses_non_finite_outputs():
    x, w = outlier_problem()
    with pytest.raises(FloatingPointError):
        awq.best_scale(x, [w], 32, lambda ws, xs: xs @ ws[0].T * float("inf"))


def test_clip_search_does_not_hurt():
    x, w = outlier_problem(1)
    ref = x @ w.T
    clipped = awq.apply_clip(w, awq.best_clip(w, x, 32), 32)
    assert torch.all(clipped.abs() <= w.abs() + 1e-7)
    err_clip = (x @ awq.pseudo_quantize(clipped, 32)[0].T - ref).pow(2).mean()
    err_plain = (x @ awq.pseudo_quantize(w, 32)[0].T - ref).pow(2).mean()
    assert err_clip <= err_plain * 1.0001


def test_layout_decodes_with_autoawq():
    from awq.utils.packing_utils import dequantize_gemm

    x, w = outlier_problem(2)
    r = awq.quantize(w, 32)
    p = Params(4, 32)
    t = AWQ.pack(r.q.numpy(), r.scales.numpy(), r.zeros.numpy(), None, p)
    assert t["qweight"].shape == (128, 96 // 8) and t["qzeros"].shape == (4, 96 // 8) and t["scales"].shape == (4, 96)
    assert [t[k].shape for k in AWQ.parts] == [e.shape for e in AWQ.entries("x", 96, 128, p)]
    ours = AWQ.unpack(t, p)
    assert np.array_equal(ours, r.weight.numpy())
    theirs = dequantize_gemm(torch.from_numpy(t["qweight"]), torch.from_numpy(t["qzeros"]),
                             torch.from_numpy(t["scales"]).float(), 4, 32)
    assert np.array_equal(theirs.numpy().T, ours)
    codes = np.random.default_rng(0).integers(0, 16, size=(5, 64))
    assert np.array_equal(unpack_interleaved(pack_interleaved(codes)), codes)


def make_awq(src, out, capsys, *extra):
    return make_gptq(src, out, capsys, *extra, method="awq")


@pytest.mark.parametrize("family,group", CASES)
def test_loaders_load_it(tiny, tmp_path, capsys, family, group):
    from awq.utils.packing_utils import dequantize_gemm
    from safetensors import safe_open

    out = tmp_path / "awq"
    r = make_awq(tiny(family), out, capsys, "--group-size", group)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: cfg[k] for k in ("quant_method", "bits", "group_size", "zero_point", "version")} == \
        {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    assert "quantize_config.json" not in files_in(out)
    from qconvert.evaluate import open_model

    m = open_model(str(out))
    decoded = 0
    with safe_open(out / "model.safetensors", "pt") as f:
        for k in f.keys():
            if k.endswith(".qweight"):
                p = k[:-len(".qweight")]
                theirs = dequantize_gemm(f.get_tensor(k), f.get_tensor(p + ".qzeros"),
                                         f.get_tensor(p + ".scales").float(), 4, group)
                hf = p.replace("language_model.", "") + ".weight"
                ours = m.forward().tensors[hf].array()
                assert np.array_equal(theirs.numpy(), ours if m.family.transposed(hf) else ours.T)
                decoded += 1
    m.close()
    assert decoded == r["n_linears"]
    code, out_json, err = run_cli(["inspect", str(out), "--json"], capsys)
    assert code == 0, err
    info = json.loads(out_json)
    assert info["quant_method"] == "awq" and info["quantized_linears"] == r["n_linears"]
    assert {(x["method"], x["bits"], x["group_size"]) for x in info["linears"]} == {("awq", 4, group)}
    assert_loaders_agree(out, family, r["n_linears"])


def test_awq_is_closer_to_the_float_model_than_round_to_nearest(tiny, tmp_path, capsys):
    """On the model's own calibration distribution, AWQ's logits are nearer the float model's
    than those of the same zero-point quantizer without scales or clipping."""
    src = tiny("llama-wide")
    out = tmp_path / "awq"
    make_awq(src, out, capsys, "--group-size", "64")
    from qconvert.evaluate import open_model

    m = open_model(str(src))
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 300, size=(4, 64)))
    with torch.inference_mode():
        ref = m.forward().logits(ids)
        weights = {}
        fw = m.forward()
        for name, t in m.family.ckpt.tensors.items():
            a = torch.from_numpy(np.array(t.array(), dtype=np.float32))
            if ".layers." in name and name.endswith("proj.weight"):
                a = awq.pseudo_quantize(a, 64)[0]
            weights[name] = a
        fw._cache.update(weights)
        fw.clear = lambda: None  # keep the round-to-nearest weights for the whole run
        rtn = fw.logits(ids)
    m.close()
    q = open_model(str(out))
    with torch.inference_mode():
        got = q.forward().logits(ids)
    q.close()
    assert rel(got, ref) < rel(rtn, ref)


def test_awq_usage_errors(tiny, tmp_path, capsys):
    src = tiny("llama")
    code, _, err = run_cli([str(src), "--to", "awq", "--bits", "8", "-o", str(tmp_path / "o")], capsys)
    assert code == 2
    one_line_error(err, "4-bit")
    code, _, err = run_cli([str(src), "--to", "awq", "--act-order", "--group-size", "32", "-o", str(tmp_path / "o")],
                           capsys)
    assert code == 2
    one_line_error(err, "--act-order")
    assert not (tmp_path / "o").exists()


def test_eval_of_a_checkpoint_saved_without_its_tokenizer(tiny, tmp_path, capsys):
    """AutoAWQ's save_quantized writes no tokenizer: eval takes it (and whether a BOS is added)
    from --base or from a --tokenizer model directory, and scores exactly as with the files."""
    src = tiny("llama")
    out = tmp_path / "awq"
    make_awq(src, out, capsys, "--group-size", "32")
    text = tmp_path / "t.txt"
    text.write_text("It was a truth universally acknowledged, that a single man in possession. " * 40)
    common = ["eval", "--text", str(text), "--ctx", "64", "--chunks", "3", "--json"]

    def score(model, *extra):
        code, stdout, err = run_cli([common[0], str(model), *common[1:], *extra], capsys)
        assert code == 0, err
        return json.loads(stdout)["perplexity"]
    with_files = score(out)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in out.iterdir():
        if not f.name.startswith("tokenizer"):
            (bare / f.name).write_bytes(f.read_bytes())
    assert score(bare, "--base", str(src)) == with_files
    assert score(bare, "--tokenizer", str(src)) == with_files
    code, _, err = run_cli([common[0], str(bare), *common[1:]], capsys)
    assert code == 2
    one_line_error(err, "--tokenizer")


def test_no_clip_skips_only_the_clipping_search(tiny, tmp_path, capsys):
    """--no-clip (llm-compressor's AWQ): the same scales, so the linears the family never clips
    keep their bytes, every other linear is rounded from its unclipped weights; the report and
    quantization_config say so."""
    from safetensors.numpy import load_file

    src = tiny("llama-wide")
    default = make_awq(src, tmp_path / "clip", capsys, "--group-size", "64")
    plain = make_awq(src, tmp_path / "no-clip", capsys, "--group-size", "64", "--no-clip")
    assert default["clip"] is True and plain["clip"] is False
    meta = [json.loads((tmp_path / d / "config.json").read_text())["quantization_config"]["meta"]
            for d in ("clip", "no-clip")]
    assert "clip" not in meta[0] and meta[1]["clip"] is False
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("clip", "no-clip"))
    assert a.keys() == b.keys()
    same = {k.rsplit(".", 2)[-2] for k in a if k.endswith(".qweight") and np.array_equal(a[k], b[k])}
    differ = {k.rsplit(".", 2)[-2] for k in a if k.endswith(".qweight") and not np.array_equal(a[k], b[k])}
    assert same == set(Llama.awq_no_clip) and differ and not differ & same
    assert all(np.array_equal(a[k], b[k]) for k in a if k.endswith("norm.weight"))


def test_no_clip_is_an_awq_option(tiny, tmp_path, capsys):
    code, _, err = run_cli([str(tiny("llama")), "--to", "gptq", "--no-clip", "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "--no-clip" in err and "awq" in err and not (tmp_path / "o").exists()
