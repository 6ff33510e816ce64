"""Weight-only checkpoints without calibration (bitsandbytes NF4, FP4, LLM.int8(), HQQ): qconvert
against the reference path, transformers' `from_pretrained(..., quantization_config=
BitsAndBytesConfig(...))` + `save_pretrained` (bitsandbytes' CPU backend), on the same model; for
HQQ the same with HqqConfig(nbits=4, group_size=64) in transformers 4.57.3 + hqq 0.2.8 (a venv of
its own, HQQ_VENV: transformers 5 neither quantizes nor loads HQQ), whose from_pretrained also
loads our checkpoint (its logits compared with our forward's); for quanto-int4 / quanto-int8,
optimum-quanto 0.2.7's own path (QuantizedModelForCausalLM.quantize(model, weights=qint4 / qint8,
exclude="lm_head") + save_pretrained), whose from_pretrained loads ours too.

usage: python bench/weightonly.py [--model qwen2.5-0.5b] [--targets nf4,fp4,int8,hqq,quanto-int4,quanto-int8]
                                  [--chunks 16]
                                  [--calibrated] [--depth]

For each target: wall time and peak RSS of both (each in a child process, 2 threads), whether
every tensor of the two checkpoints is identical, size on disk and bits per weight, and
perplexity / KL divergence / top-1 on northangerabbey.txt from `qconvert eval` (scored once when
the two are identical). --calibrated adds qconvert's own GPTQ and AWQ (group 128; no reference
here: bench/gptq.py and bench/awq.py compare those). --depth: peak RSS of `--to nf4` against depth
(random models of the model's widths, 4 and 16 layers), which must not grow.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REAL, evaluate, leave_bench_dir, measure, qconvert_cmd, real_model, tool_venv  # noqa: E402

HQQ_VENV = Path(os.environ.get("QCONVERT_HQQ", Path.home() / ".cache" / "qconvert-hqq"))

CONFIGS = {"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
           "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
           "int8": dict(load_in_8bit=True)}


def hqq_python() -> Path:
    """HQQ_VENV's interpreter (torch first: a bare torch pulls CUDA)."""
    return tool_venv(HQQ_VENV, (["torch==2.13.0"], ["transformers==4.57.3", "accelerate", "hqq==0.2.8.post1",
                                                    "safetensors", "numpy"]))


def checkpoint_dtype(src: str):
    import torch

    cfg = json.loads((Path(src) / "config.json").read_text())
    return getattr(torch, cfg.get("dtype") or cfg.get("torch_dtype") or "float32")


def run_transformers(src: str, out: str, target: str) -> None:
    """In a child process: the reference path."""
    leave_bench_dir()
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    if target.startswith("quanto-"):
        from optimum.quanto import QuantizedModelForCausalLM, qint4, qint8
        model = AutoModelForCausalLM.from_pretrained(src)
        QuantizedModelForCausalLM.quantize(model, weights=qint4 if target == "quanto-int4" else qint8,
                                           exclude="lm_head").save_pretrained(out)
        return
    if target == "hqq":  # transformers 4.57: HQQLinear(device="cpu") for every linear but lm_head
        from transformers import HqqConfig
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=HqqConfig(nbits=4, group_size=64),
                                                     dtype=checkpoint_dtype(src), device_map="cpu")
    else:
        from transformers import BitsAndBytesConfig
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=BitsAndBytesConfig(**CONFIGS[target]))
    model.save_pretrained(out)


def logits_of(path: str, src: str, out: str) -> None:
    """In a child process: transformers' from_pretrained of a quantized checkpoint (HQQ_VENV's
    transformers 4.57 for HQQ) and its logits on the first 64 tokens of the evaluation text,
    saved with the tokens to `out`.npz."""
    leave_bench_dir()
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    text = (REAL / "text" / "northangerabbey.txt").read_text()[:2000]
    ids = torch.tensor([AutoTokenizer.from_pretrained(src)(text)["input_ids"][:64]])
    if (Path(path) / "quanto_qmap.json").is_file():
        from optimum.quanto import QuantizedModelForCausalLM
        model = QuantizedModelForCausalLM.from_pretrained(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=checkpoint_dtype(src), device_map="cpu")
    with torch.no_grad():
        np.savez(out, ids=ids.numpy(), logits=model(ids).logits.float().numpy())


def loads_alike(path: Path, src: Path, python: Path, tmp: Path) -> str:
    """Whether the reference library's from_pretrained loads our checkpoint and computes our
    forward's logits (their relative difference on 64 tokens of the evaluation text)."""
    import numpy as np
    import torch

    from qconvert.evaluate import open_model

    out = tmp / "logits.npz"
    subprocess.run([str(python), __file__, "--logits", str(path), str(src), str(out)], check=True,
                   capture_output=True, cwd=tmp)
    got = np.load(out)
    model = open_model(str(path))
    with torch.no_grad():
        mine = model.forward().logits(torch.from_numpy(got["ids"])).float().numpy()
    model.close()
    return f"loads ours; logits differ from our forward's by {np.linalg.norm(got['logits'] - mine) / np.linalg.norm(mine):.1e}"


def identical(a: Path, b: Path) -> str:
    """Whether two checkpoints hold the same tensors bit for bit and the same quantization_config
    (run in a child process: see main)."""
    import numpy as np
    from safetensors.numpy import load_file

    def tensors(d: Path) -> dict:
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}
    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        return f"no: {len(set(ta) ^ set(tb))} names differ"
    for k in ta:
        x, y = np.ascontiguousarray(ta[k]), np.ascontiguousarray(tb[k])
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return f"no: {k}"
    qa = json.loads((a / "config.json").read_text()).get("quantization_config")
    qb = json.loads((b / "config.json").read_text()).get("quantization_config")
    if (a / "quanto_qmap.json").is_file():  # quanto: no quantization_config, its module map instead
        qa, qb = (json.loads((d / "quanto_qmap.json").read_text()) for d in (a, b))
        return "yes (every tensor, and quanto_qmap.json)" if qa == qb else "tensors yes, quanto_qmap.json no"
    return "yes (every tensor, and the quantization_config)" if qa == qb else "tensors yes, config no"


def params(d: Path) -> int:
    from qconvert.inspect import inspect_checkpoint

    return inspect_checkpoint(str(d))["n_params"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--targets", default="nf4,fp4,int8")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--calibrated", action="store_true")
    ap.add_argument("--depth", action="store_true")
    ap.add_argument("--run-transformers", nargs=3, metavar=("SRC", "OUT", "TARGET"), help=argparse.SUPPRESS)
    ap.add_argument("--identical", nargs=2, type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--logits", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_transformers:
        return run_transformers(*args.run_transformers)
    if args.logits:
        return logits_of(*args.logits)
    if args.identical:
        return print(identical(*args.identical))
    src = real_model(args.model)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        n = params(src)  # the float source's parameters (as inspect counts them)
        for target in [t.strip() for t in args.targets.split(",") if t.strip()]:
            ours, ref = tmp / f"q-{target}", tmp / f"t-{target}"
            mine = measure(qconvert_cmd() + [str(src), "--to", target, "-o", str(ours), "-q", "-j", "2"], env=env)
            python = hqq_python() if target == "hqq" else Path(sys.executable)
            theirs = measure([str(python), __file__, "--run-transformers", str(src), str(ref), target], env=env,
                             cwd=tmp)
            # in a child: a child's peak RSS (wait4) starts from its parent's at fork, so this
            # process must stay small
            same = subprocess.run([sys.executable, __file__, "--identical", str(ours), str(ref)], check=True,
                                  capture_output=True, text=True).stdout.strip()
            lib = {"hqq": "hqq (transformers 4.57)"}.get(target, "optimum-quanto" if target.startswith("quanto")
                                                         else "bitsandbytes")
            print(f"{target}: qconvert {mine[0]:.1f} s {mine[1] / 1e6:.0f} MB, transformers + {lib} "
                  f"{theirs[0]:.1f} s {theirs[1] / 1e6:.0f} MB; identical: {same}", flush=True)

            rows.append((target, ours, mine, theirs, same))
            if not same.startswith("yes"):
                rows.append((f"{target} (transformers)", ref, theirs, None, ""))
        for target, *_ in list(rows):  # after the measurements: it grows this process
            if target == "hqq":
                print(f"hqq: transformers 4.57 + hqq {loads_alike(tmp / 'q-hqq', src, hqq_python(), tmp)}", flush=True)
            elif target.startswith("quanto-"):
                print(f"{target}: optimum-quanto {loads_alike(tmp / f'q-{target}', src, Path(sys.executable), tmp)}",
                      flush=True)
        if args.calibrated:
            for target in ("gptq", "awq"):
                ours = tmp / f"q-{target}"
                mine = measure(qconvert_cmd() + [str(src), "--to", target, "-o", str(ours), "-q", "-j", "2",
                                                 "--calib-samples", "16"], env=env)
                print(f"{target}: qconvert {mine[0]:.1f} s {mine[1] / 1e6:.0f} MB", flush=True)
                rows.append((target, ours, mine, None, ""))
        print(f"\n{src.name}: scored on northangerabbey.txt, {args.chunks} x 512 tokens")
        print(f"{'target':24s} {'s':>7s} {'ref s':>7s} {'MB':>6s} {'ref MB':>7s} {'disk MB':>8s} {'bpw':>6s} "
              f"{'PPL':>8s} {'KLD':>8s} {'top-1':>6s}")
        base = None
        for target, path, mine, theirs, _ in rows:
            r = evaluate(path, src, args.chunks)
            base = r["base_perplexity"]
            size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            ref_s = f"{theirs[0]:7.1f}" if theirs else f"{'-':>7s}"
            ref_m = f"{theirs[1] / 1e6:7.0f}" if theirs else f"{'-':>7s}"
            print(f"{target:24s} {mine[0]:7.1f} {ref_s} {mine[1] / 1e6:6.0f} {ref_m} {size / 1e6:8.1f} "
                  f"{size * 8 / n:6.2f} {r['perplexity']:8.3f} {r['kl_divergence']:8.5f} {r['top1_agreement']:6.3f}",
                  flush=True)
        print(f"float model perplexity {base:.3f}")
        for target, _, mine, theirs, _ in rows:
            if theirs:
                print(f"{target}: time ratio {mine[0] / theirs[0]:.2f}x, memory ratio {mine[1] / theirs[1]:.2f}x")
        if args.depth:
            from gptq import depth_check

            depth_check(tmp, "nf4", args.model, calibrated=False)


if __name__ == "__main__":
    main()
