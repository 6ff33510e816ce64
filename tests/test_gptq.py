"""GPTQ: the algorithm against round-to-nearest, the checkpoint layout, and loading by code
nobody on this team wrote (GPTQModel 7.7.0 and transformers with it), whose logits must equal
our own forward on the dequantized checkpoint within float16 noise."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from qconvert.calibrate.gptq import hessian
from qconvert.quant.gptq import gptq, output_error
from qconvert.layouts import GPTQ, Params, pack_cols, pack_rows, unpack_cols, unpack_rows
from tests.golden_outputs import tree_hash
from tests.helpers import files_in, one_line_error, run_cli

pytestmark = pytest.mark.kernel_free  # no GGUF blocks: the C pass covers it

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
IDS = [1, 5, 9, 22, 40, 7, 3, 100, 4, 8, 15, 16, 23, 42, 77, 31]
# (family, group size, calibration tokens per sample): widths of the tiny models are 64
# (gpt2's fused qkv 192), positions of gpt2 are limited to 256
CASES = [("llama", 32), ("llama-tied", 64), ("mistral", 32), ("qwen2", 32), ("qwen3", 64), ("gemma3", 32),
         ("granite", 32), ("smollm3", 64), ("olmo2", 32), ("olmo3", 64), ("gemma2", 64),
         ("phi3", 32),
         ("gpt_neox-64", 32), ("gpt2", 64)]


def layer_problem(n=64, k=128, tokens=2048, seed=0):
    """A weight and inputs with correlated, unevenly scaled columns (as real activations are)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    X = (torch.randn(tokens, k, generator=g) @ mix) * torch.linspace(0.2, 3, k)
    W = torch.randn(n, k, generator=g) * 0.05
    return W, (X.T @ X) * (2.0 / tokens)


@pytest.mark.parametrize("bits,group,sym,act_order", [(4, 32, True, False), (4, 32, False, False),
                                                     (4, 32, True, True), (4, -1, True, False),
                                                     (8, 64, True, False), (2, 32, False, True)])
def test_gptq_beats_round_to_nearest(bits, group, sym, act_order):
    W, H = layer_problem()
    r = gptq(W, H, bits, group, sym, act_order)
    assert r.error < 0.9 * r.rtn_error
    assert r.error == pytest.approx(output_error(W, r.weight, H))
    # the codes, scales and zeros are the weights GPTQ used, exactly
    g_idx = r.g_idx.long()
    assert torch.equal(r.weight, r.scales[g_idx].T * (r.q - r.zeros[g_idx].T))
    assert int(r.q.min()) >= 0 and int(r.q.max()) <= 2 ** bits - 1
    assert torch.equal(g_idx, torch.arange(W.shape[1]) // (W.shape[1] if group == -1 else group))


def test_gptq_dead_columns_and_singular_hessian():
    W, H = layer_problem(k=64)
    H[:, 5] = H[5, :] = 0  # a column that never sees input
    M = torch.randn(256, 4) @ torch.randn(4, 64)  # rank 4 inputs: H singular, needs damping
    H2 = M.T @ M
    r = gptq(W, H, 4, 32, True, False)
    assert torch.all(r.weight[:, 5] == 0)
    r2 = gptq(W, H2, 4, 32, True, False, damp=1e-9)
    assert torch.isfinite(r2.weight).all() and r2.error < r2.rtn_error


@pytest.mark.parametrize("n,k", [(200, 512), (300, 600), (600, 2048), (300, 2304), (257, 5000)])
def test_wide_hessians_from_the_upper_triangle(n, k):
    """The banded Hessian of wide inputs is symmetric and equals 2/n X^T X (the same dot
    products; bitwise equal with torch's BLAS here, float rounding allowed elsewhere)."""
    torch.manual_seed(k)
    x = torch.randn(3, n, k) * torch.rand(k) * 4
    X = x.reshape(-1, k)
    H = hessian(x)
    assert torch.equal(H, H.T)
    torch.testing.assert_close(H, (X.T @ X) * (2.0 / X.shape[0]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [64, 300, 513, 1100])
def test_upper_factor_of_the_inverse_hessian(k):
    """U from one factorisation of the reversed H and a triangular inverse by halves: upper
    triangular with U^T U = (H + damping)^-1, and the inverse by halves equals a solve against
    the identity, for sizes that split unevenly."""
    from qconvert.quant.gptq import _hinv_upper, lower_inverse

    _, H = layer_problem(k=k, tokens=4 * k, seed=k)
    H = H.double()
    U, damp = _hinv_upper(H, 0.05)
    assert damp == 0.05 and torch.equal(U, torch.triu(U))
    Hd = H + 0.05 * torch.diag(H).mean() * torch.eye(k, dtype=H.dtype)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(Hd), rtol=1e-9, atol=1e-9)
    L = torch.linalg.cholesky(Hd)
    torch.testing.assert_close(lower_inverse(L), torch.linalg.solve_triangular(L, torch.eye(k, dtype=H.dtype),
                                                                               upper=False), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_round_trips(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2 ** bits, size=(64, 48))
    assert np.array_equal(unpack_rows(pack_rows(codes, bits), bits), codes)
    assert pack_rows(codes, bits).shape == (64 * bits // 32, 48)
    assert np.array_equal(unpack_cols(pack_cols(codes, bits), bits), codes)
    assert pack_cols(codes, bits).shape == (64, 48 * bits // 32)


@pytest.mark.parametrize("sym", [True, False])
def test_checkpoint_tensors_decode_to_the_gptq_weights(sym):
    W, H = layer_problem()
    r = gptq(W, H, 4, 32, sym, False)
    p = Params(4, 32, v2=not sym)
    t = GPTQ.pack(r.q.numpy(), r.scales.numpy(), r.zeros.numpy(), r.g_idx.numpy(), p)
    if sym:  # v1 stores zero - 1: 8 -> 7 in every nibble
        assert np.all(t["qzeros"].view(np.uint32) == 0x77777777)
    assert [t[k].shape for k in GPTQ.parts] == [e.shape for e in GPTQ.entries("x", 64, 128, p)]
    w = GPTQ.unpack(t, p)
    assert np.array_equal(w, r.weight.numpy())


def make_gptq(src, out, capsys, *extra, method="gptq"):
    """`qconvert SRC --to METHOD` (small calibration); the JSON report's entry for the checkpoint."""
    code, stdout, err = run_cli([str(src), "--to", method, "-o", str(out), "--calib-samples", "8",
                                 "--calib-seq-len", "128", "--json", *map(str, extra)], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["calibration"]["passes"][0]["method"] == method
    return report["outputs"][0]


def our_logits(path, ids: list[int] = IDS) -> torch.Tensor:
    from qconvert.evaluate import open_model

    m = open_model(str(path))
    try:
        with torch.inference_mode():
            return m.forward().logits(torch.tensor([ids]))[0]
    finally:
        m.close()


def rel(a, b) -> float:
    return float(((a - b) ** 2).mean().sqrt() / (b ** 2).mean().sqrt())


# loader bugs outside our reach, each family still loads through the other path:
# transformers 5.23 re-initialises GPT-2's Conv1D weights by name, which fails on GPTQ layers;
# GPTQModel.load skips transformers 5's embed_out -> lm_head key mapping for GPT-NeoX (its head
# stays random), while transformers' own loader applies it; GPTQModel 7.7 splits Phi-3's fused
# mlp.gate_up_proj into gate_proj and up_proj (its defuser) before it quantizes or loads, so it
# wants those two, while transformers' Phi3MLP (and vLLM's) takes the checkpoint's own fused one
NOT_GPTQMODEL_LOAD, NOT_TRANSFORMERS = {"gpt_neox-64", "phi3"}, {"gpt2"}


@pytest.mark.parametrize("family,group", CASES)
def test_gptqmodel_and_transformers_load_it(tiny, tmp_path, capsys, family, group):
    out = tmp_path / "gptq"
    r = make_gptq(tiny(family), out, capsys, "--group-size", group)
    for layer in r["layers"]:  # GPTQ beats round-to-nearest on the same calibration inputs
        assert layer["gptq_error"] < layer["rtn_error"], layer
    assert_loaders_agree(out, family, r["n_linears"])


def assert_loaders_agree(out, family, n_linears):
    """GPTQModel (CPU) and transformers with it load the checkpoint, and their logits equal our
    forward's on the dequantized checkpoint within f16 noise."""
    ours = our_logits(out)
    if family not in NOT_GPTQMODEL_LOAD:
        from gptqmodel import GPTQModel

        m = GPTQModel.load(str(out), device="cpu", dtype=torch.float16)
        with torch.inference_mode():
            assert rel(ours, m.model(torch.tensor([IDS])).logits[0].float()) < 5e-3
    if family not in NOT_TRANSFORMERS:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
        assert sum(n.endswith(".qweight") for n, _ in hf.named_buffers()) == n_linears
        with torch.inference_mode():
            assert rel(ours, hf(torch.tensor([IDS])).logits[0].float()) < 5e-3


@pytest.mark.parametrize("opts", [["--asym"], ["--no-act-order"], ["--bits", "8"], ["--bits", "2"],
                                  ["--group-size", "-1"]])
def test_options_load(tiny, tmp_path, capsys, opts):
    from gptqmodel import GPTQModel

    out = tmp_path / "gptq"
    r = make_gptq(tiny("llama"), out, capsys, "--group-size", "32", *opts)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["checkpoint_format"] == ("gptq_v2" if "--asym" in opts else "gptq")
    # activation order is the default: static groups, desc_act false, in the report and the config
    assert cfg["desc_act"] is False and cfg["static_groups"] == ("--no-act-order" not in opts)
    assert r["act_order"] == cfg["meta"]["act_order"] == ("--no-act-order" not in opts)
    assert cfg["bits"] == r["bits"] == (int(opts[1]) if opts[0] == "--bits" else 4)
    m = GPTQModel.load(str(out), device="cpu", dtype=torch.float16)
    with torch.inference_mode():
        theirs = m.model(torch.tensor([IDS])).logits[0].float()
    assert rel(our_logits(out), theirs) < 5e-3


def test_exact_calib_runs_float32_products(tiny, tmp_path, capsys):
    """GPTQ's forward multiplies in bfloat16 where the CPU does so natively, in float32 with
    --exact-calib; the report names which ran, and the two checkpoints are equally good."""
    from qconvert.calibrate.driver import native_bf16

    src = tiny("llama")
    reports = {}
    for name, extra in (("fast", []), ("exact", ["--exact-calib"])):
        code, stdout, err = run_cli([str(src), "--to", "gptq", "-o", str(tmp_path / name), "--group-size", "32",
                                     "--calib-samples", "8", "--calib-seq-len", "128", "--json", *extra], capsys)
        assert code == 0, err
        reports[name] = json.loads(stdout)
    forward = {k: r["calibration"]["passes"][0]["forward"] for k, r in reports.items()}
    assert forward == {"fast": "bfloat16" if native_bf16() else "float32", "exact": "float32"}
    errors = {k: sum(layer["gptq_error"] for layer in r["outputs"][0]["layers"]) for k, r in reports.items()}
    assert errors["fast"] == pytest.approx(errors["exact"], rel=0.05)
    if not native_bf16():
        assert tree_hash(tmp_path / "fast") == tree_hash(tmp_path / "exact")


def test_checkpoint_files_and_shards(tiny, tmp_path, capsys):
    src = tiny("qwen2")
    out = tmp_path / "gptq"
    r = make_gptq(src, out, capsys, "--group-size", "32", "--max-shard-size", "60KB")
    names = files_in(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert {"config.json", "quantize_config.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= set(names)
    from safetensors import safe_open

    seen = {}
    for s in shards:
        with safe_open(out / s, "np") as f:
            seen.update({k: f.get_tensor(k) for k in f.keys()})
        with safe_open(out / s, "np") as f:
            assert f.metadata()["quantizer"].startswith("qconvert")
    assert set(seen) == set(index["weight_map"])
    q = "model.layers.0.self_attn.q_proj"
    assert seen[q + ".qweight"].dtype == np.int32 and seen[q + ".scales"].dtype == np.float16
    assert np.array_equal(seen[q + ".g_idx"], np.arange(64) // 32)
    assert seen[q + ".bias"].dtype == np.float16  # qwen2's q/k/v biases stay, in 16 bits
    assert seen["model.embed_tokens.weight"].dtype == np.float16 and "lm_head.weight" in seen
    qcfg = json.loads((out / "quantize_config.json").read_text())
    assert qcfg["meta"]["quantizer"] == [f"qconvert:{__import__('qconvert').__version__}"]
    assert json.loads((out / "config.json").read_text())["quantization_config"] == qcfg
    assert r["n_linears"] == 14
    # qconvert inspect reads the directory back: config, every linear's bits and group, sizes
    code, out_json, err = run_cli(["inspect", str(out), "--json"], capsys)
    assert code == 0, err
    info = json.loads(out_json)
    assert info["quant_method"] == "gptq" and info["quantization_config"] == qcfg
    assert info["quantized_linears"] == 14 and [x["layer"] for x in info["layers"]] == [0, 1]
    assert all(x["bits"] == [4] and x["group_sizes"] == [32] and x["methods"] == ["gptq"] for x in info["layers"])
    q_info = next(x for x in info["linears"] if x["name"] == q)
    assert q_info["shape"] == [64, 64] and q_info["bytes"] == sum(seen[q + k].nbytes for k in (
        ".qweight", ".qzeros", ".scales", ".g_idx"))
    assert info["bytes"] == sum(p.stat().st_size for p in out.iterdir())
    assert info["tensor_bytes"] == sum(a.nbytes for a in seen.values())
    assert 4 < q_info["bits_per_weight"] < 6 and info["bits_per_weight"] > q_info["bits_per_weight"]
    code, human, err = run_cli(["inspect", str(out)], capsys)
    assert code == 0 and "gptq" in human and "group size" in human, err
    from gptqmodel import GPTQModel

    m = GPTQModel.load(str(out), device="cpu", dtype=torch.float16)
    with torch.inference_mode():
        assert rel(our_logits(out), m.model(torch.tensor([IDS])).logits[0].float()) < 5e-3


def test_gptq_errors_leave_nothing(tiny, tmp_path, capsys):
    src = tiny("llama")
    code, _, err = run_cli([str(src), "--to", "gptq", "-o", str(tmp_path / "o"), "--group-size", "128"], capsys)
    assert code == 2
    one_line_error(err, "group size 128", "32, 64 or -1")
    code, _, err = run_cli([str(src), "--to", "gptq", "--bits", "3", "-o", str(tmp_path / "o")], capsys)
    assert code == 2
    one_line_error(err, "--bits")
    code, _, err = run_cli([str(src), "--to", "gptq,q8_0", "-o", str(tmp_path / "o")], capsys)
    assert code == 2
    (tmp_path / "exists").mkdir()
    code, _, err = run_cli([str(src), "--to", "gptq", "--group-size", "32", "-o", str(tmp_path / "exists")], capsys)
    assert code == 4
    one_line_error(err, "already exists")
    # a NaN weight is found when its layer is quantized: the run stops, nothing is left behind
    from tests.helpers import copy_model
    from safetensors.torch import load_file, save_file

    bad = copy_model(src, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 7] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli([str(bad), "--to", "gptq", "--group-size", "32", "--calib-seq-len", "64",
                            "-o", str(tmp_path / "nan")], capsys)
    assert code == 3
    one_line_error(err, "down_proj", "non-finite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "exists"]


def test_dry_run_plans_without_writing(tiny, tmp_path, capsys):
    code, out, err = run_cli([str(tiny("llama")), "--to", "gptq", "--group-size", "32", "-o", str(tmp_path / "o"),
                              "--dry-run", "--json"], capsys)
    assert code == 0, err
    plan = json.loads(out)
    out = plan["outputs"][0]
    assert out["kind"] == "checkpoint" and out["n_linears"] == 14 and not (tmp_path / "o").exists()
    assert any(t["name"].endswith("q_proj.qweight") and t["shape"] == [8, 64] for t in out["tensors"])


def test_interrupt_leaves_nothing(tiny, tmp_path, capsys, monkeypatch):
    import qconvert.calibrate.gptq as algo  # the observer's view of the algorithm

    real, calls = algo.gptq, {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 9:  # in the second decoder layer, after the first was written
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(algo, "gptq", interrupted)
    code, _, err = run_cli([str(tiny("llama")), "--to", "gptq", "--group-size", "32", "--calib-seq-len", "64",
                            "-o", str(tmp_path / "o")], capsys)
    assert code == 130 and calls["n"] == 9
    one_line_error(err, "interrupted")
    assert list(tmp_path.iterdir()) == []


def test_the_factorisation_does_not_depend_on_threads():
    """LAPACK's Cholesky splits its blocks by thread count and its bits change with them (on
    SmolLM2-135M, -j 1 and -j 2 gave different GPTQ codes); ours runs on one thread, so a
    Hessian factorises to the same bits whatever -j is, which a plain factorisation does not."""
    from qconvert.quant.gptq import _cholesky

    g = torch.Generator().manual_seed(0)
    X = torch.randn(4096, 576, generator=g) * torch.linspace(0.1, 10, 576)
    H = X.T @ X / 4096
    before = torch.get_num_threads()
    try:
        got = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got[threads] = (torch.linalg.cholesky_ex(H)[0], _cholesky(H)[0])
            assert torch.get_num_threads() == threads  # given back
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[1][1], got[2][1])
    if torch.equal(got[1][0], got[2][0]):
        pytest.skip("this LAPACK factorises the same with 1 and 2 threads: nothing to show here")
