"""GPTQ and AWQ checkpoints of mixtures of experts: every expert quantized from the tokens routed
to it (or, when the router sends it fewer than --expert-min-tokens, from every token, while the
layer's output keeps the real routing), routers kept float (AWQ: scaled with the experts),
per-expert names as GPTQModel and transformers 5 (after defuser's un-fusing) load them; their
logits equal our forward's."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from qconvert.arch.moe import MoEForward
from qconvert.calibrate.driver import Observer, run_layers
from qconvert.families import family_for
from qconvert.read.checkpoint import open_checkpoint
from tests.test_gptq import make_gptq, our_logits, rel

pytestmark = pytest.mark.kernel_free  # no GGUF blocks: the C pass covers it

FAMILIES = ["qwen3moe", "mixtral", "qwen2moe", "olmoe"]
# transformers 5.25 holds these experts fused and only defuser's class patches (which GPTQModel
# applies when it loads) make them per-expert Linear modules; defuser has none for OLMoE's block
# (GPTQModel converts OLMoE after building it), so transformers alone leaves OLMoE's experts unloaded
NOT_TRANSFORMERS = {"olmoe"}

# the loaders patch transformers' classes for good (defuser): they run in a child process, GPTQModel
# first, then transformers (after defuser's patch, which GPTQModel's loading has made already)
LOADERS = r"""
import json, os, sys
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
import torch
path, family, ids, with_transformers = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4] == "1"
out = {}
from gptqmodel import GPTQModel
m = GPTQModel.load(path, device="cpu", dtype=torch.float16)
with torch.inference_mode():
    out["gptqmodel"] = m.model(torch.tensor([ids])).logits[0].float().tolist()
if with_transformers:
    import defuser, transformers
    defuser.replace_fused_blocks(json.load(open(os.path.join(path, "config.json")))["model_type"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    out["qweights"] = sum(n.endswith(".qweight") for n, _ in hf.named_buffers())
    with torch.inference_mode():
        out["transformers"] = hf(torch.tensor([ids])).logits[0].float().tolist()
print("RESULT " + json.dumps(out))
"""


def load_in_child(path, family, ids: list[int], with_transformers: bool) -> dict:
    r = subprocess.run([sys.executable, "-c", LOADERS, str(path), family, json.dumps(ids),
                        "1" if with_transformers else "0"],
                       capture_output=True, text=True, timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def decisive_ids(path, margin: float = 0.05, n: int = 16, log: bool = True) -> list[int]:
    """Token ids whose every routing decision in our forward of the checkpoint at `path` is clear:
    the k-th chosen expert's router logit above the next one's by `margin` (`log`: the gaps of the
    softmax probabilities' log, the logits less a constant; else of the scores as they are, such
    as DeepSeek-V3's sigmoid scores plus bias and its group ranks). The loaders compute in
    float16 and we in float32 (router logits of about 10 differ by about 0.01); a random tiny
    router's top k is within that of a tie for about one decision in a hundred, where the two
    legitimately choose different experts (logits 6% apart from there on, on one CPU and not on
    another). A token whose router sees only zeros (a zero embedding) ties exactly in both and is
    not counted."""
    from unittest import mock

    topk = torch.topk
    gaps = []

    def spy(x, k, dim=-1, **kwargs):
        if x.dim() == 2 and x.shape[-1] > k:  # a choice of experts (or of expert groups)
            top = topk(x.log() if log else x, k + 1, dim=dim).values
            gap = torch.nan_to_num(top[..., k - 1] - top[..., k], nan=0.0)
            gaps.append(torch.where(x.amax(dim) > x.amin(dim), gap, torch.inf))
        return topk(x, k, dim=dim, **kwargs)

    rng = np.random.default_rng(0)
    for _ in range(100):
        ids = [1, *rng.integers(2, 200, size=n - 1).tolist()]
        gaps.clear()
        with mock.patch.object(torch, "topk", spy):
            our_logits(path, ids)
        if gaps and min(float(g.min()) for g in gaps) > margin:
            return ids
    raise AssertionError(f"no {n} tokens route by a margin of {margin} in {path}")


PARTS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales")}


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("family", FAMILIES)
def test_expert_checkpoints_load_in_gptqmodel_and_transformers(family, method, tiny, tmp_path, capsys):
    out = tmp_path / method
    r = make_gptq(tiny(family), out, capsys, "--group-size", "32", method=method)
    ckpt = open_checkpoint(str(tiny(family)))
    fam = family_for(ckpt)
    n_experts, n_layers = fam.n_experts, fam.n_layers
    ckpt.close()
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        for i in range(n_layers):
            p = f"model.layers.{i}.mlp."
            # the router stays float, under transformers 5's name (Mixtral's block_sparse_moe renamed)
            assert f.get_tensor(p + "gate.weight").dtype == torch.float16
            for e in range(n_experts):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    assert {f"{p}experts.{e}.{proj}.{k}" for k in PARTS[method]} <= names
    assert not any("block_sparse_moe" in n or n.endswith((".w1.qweight", "gate.qweight")) for n in names)
    per_layer = 4 + 3 * n_experts + (3 if family == "qwen2moe" else 0)
    assert r["n_linears"] == n_layers * per_layer
    for layer in r["layers"]:  # every expert got its tokens: none from all tokens here
        assert "experts_from_all_tokens" not in layer
        assert method == "awq" or layer["gptq_error"] < layer["rtn_error"]
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["meta"]["expert_min_tokens"] == 64
    if method == "gptq":
        assert cfg["modules_in_block_to_quantize"] == [sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])]
    else:  # the mixture's group: the router (float), the shared expert's gate and every expert's gate and up
        groups = r["layers"][0]["groups"]
        first = next(g["linears"] for g in groups if g["linears"][0].endswith("mlp.gate"))
        assert len(first) == 1 + 2 * n_experts + (3 if family == "qwen2moe" else 0)
        assert sum(len(g["linears"]) == 1 and "down_proj" in g["linears"][0] for g in groups) >= n_experts
        assert cfg["modules_to_not_convert"] == (["mlp.gate", "mlp.shared_expert_gate"] if family.startswith("qwen")
                                                 else ["mlp.gate"])
    ids = decisive_ids(out)
    ours = our_logits(out, ids).numpy()
    theirs = load_in_child(out, family, ids, family not in NOT_TRANSFORMERS)
    assert rel(torch.tensor(ours), torch.tensor(theirs["gptqmodel"])) < 5e-3
    if family not in NOT_TRANSFORMERS:
        assert theirs["qweights"] == r["n_linears"]
        assert rel(torch.tensor(ours), torch.tensor(theirs["transformers"])) < 5e-3


class Recorder(Observer):
    all_samples = True
    expert_min_tokens = 64

    def __init__(self):
        self.seen: list[tuple[str, int]] = []

    def linear_input(self, fw, hf, x):
        self.seen.append((hf, x.reshape(-1, x.shape[-1]).shape[0]))


@pytest.mark.parametrize("family", ["qwen3moe", "mixtral"])
def test_few_token_experts_see_every_token_for_statistics(family, tiny):
    """An expert routed fewer than expert_min_tokens (64) is offered every token of the batch,
    once; the experts with enough tokens are offered exactly theirs; the layer's output is the
    real routing's either way."""
    ckpt = open_checkpoint(str(tiny(family)))
    fam = family_for(ckpt)
    fw = fam.forward()
    assert isinstance(fw, MoEForward)
    tokens = torch.from_numpy(np.random.default_rng(1).integers(1, 200, size=(2, 20)))  # 40 tokens < 64
    plain = run_layers(fam.forward(), tokens)
    rec = Recorder()
    fw.few_token_experts.clear()
    out = run_layers(fw, tokens, (rec,))
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    experts = [(hf, n) for hf, n in rec.seen if ".experts." in hf]
    assert len(experts) == fam.n_layers * fam.n_experts * 3  # each expert's three matrices, once
    assert all(n == 40 for hf, n in experts)
    assert sorted(e for e, _ in fw.few_token_experts) == sorted(list(range(fam.n_experts)) * fam.n_layers)
    assert all(sum(n for _, n in fw.few_token_experts[i * fam.n_experts:(i + 1) * fam.n_experts]) == 40 * 2
               for i in range(fam.n_layers))  # two experts per token
    # with enough tokens routed to each, each expert sees exactly its routed tokens
    many = torch.from_numpy(np.random.default_rng(2).integers(1, 200, size=(4, 128)))
    rec = Recorder()
    fw.few_token_experts.clear()
    run_layers(fw, many, (rec,))
    routed = [n for hf, n in rec.seen if ".experts." in hf and hf.endswith(("gate_proj", "w1"))]
    assert not fw.few_token_experts and sum(routed) == fam.n_layers * 4 * 128 * 2
    ckpt.close()


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_report_names_experts_quantized_from_every_token(method, tiny, tmp_path, capsys):
    out = tmp_path / method
    code_args = ["--group-size", "32"]
    from tests.helpers import run_cli

    code, stdout, err = run_cli([tiny("qwen3moe"), "--to", method, "-o", out, "--calib-samples", "1",
                                 "--calib-seq-len", "16", "--json", *code_args], capsys)
    assert code == 0, err
    r = json.loads(stdout)["outputs"][0]
    for layer in r["layers"]:
        few = layer["experts_from_all_tokens"]
        assert [e["expert"] for e in few] == [0, 1, 2, 3]
        assert sum(e["routed_tokens"] for e in few) == 16 * 2


def test_expert_min_tokens_option(tiny, tmp_path, capsys):
    """--expert-min-tokens 0: only experts that received no token take every token (none here);
    the threshold is recorded in quantization_config.meta; it is a usage error without gptq."""
    from tests.helpers import run_cli

    out = tmp_path / "gptq"
    code, stdout, err = run_cli([tiny("qwen3moe"), "--to", "gptq", "-o", out, "--calib-samples", "1",
                                 "--calib-seq-len", "16", "--json", "--group-size", "32",
                                 "--expert-min-tokens", "0"], capsys)
    assert code == 0, err
    r = json.loads(stdout)["outputs"][0]
    for layer in r["layers"]:
        assert all(e["routed_tokens"] == 0 for e in layer.get("experts_from_all_tokens", []))
    meta = json.loads((out / "config.json").read_text())["quantization_config"]["meta"]
    assert meta["expert_min_tokens"] == 0
    code, _, err = run_cli([tiny("qwen3moe"), "--to", "q8_0", "-o", tmp_path / "x.gguf", "--expert-min-tokens", "8"],
                           capsys)
    assert code == 2 and "--expert-min-tokens applies to awq, gptq" in err



@pytest.mark.parametrize("family", ["qwen2moe", "mixtral"])
def test_mixture_scales_fold_exactly(family, tiny):
    """AWQ's mixture group: the post-attention norm divided by s, the router (float), Qwen2-MoE's
    shared expert and its gate and every expert's gate and up multiplied by it, the layer computes
    what it did (the same routing); leaving the router out of the group would change it."""
    from qconvert.calibrate.awq import fold

    ckpt = open_checkpoint(str(tiny(family)))
    fam = family_for(ckpt)
    h = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    s = torch.rand(64, generator=torch.Generator().manual_seed(1)) * 2 + 0.3
    outs = []
    for with_router in (True, False):
        fw = fam.forward()
        with torch.inference_mode():
            ref = fw.layer(0, h)
            group = next(g for g in fw.scale_groups(0) if g.linears[0].endswith("gate"))
            assert group.linears[0].endswith(("mlp.gate", "block_sparse_moe.gate"))
            for hf in group.linears[0 if with_router else 1:]:
                fw.set_linear_weight(hf, fw.linear_weight(hf) * s)
            fold(fw, group, s)
            outs.append((fw.layer(0, h), ref))
    torch.testing.assert_close(*outs[0], rtol=1e-4, atol=1e-5)
    assert rel(*outs[1]) > 1e-2
    ckpt.close()
