"""Weight-only checkpoints without calibration (bitsandbytes NF4, FP4, LLM.int8()): qconvert
against the reference path, transformers' `from_pretrained(..., quantization_config=
BitsAndBytesConfig(...))` + `save_pretrained` (bitsandbytes' CPU backend), on the same model.

usage: python bench/weightonly.py [--model qwen2.5-0.5b] [--targets nf4,fp4,int8] [--chunks 16]
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
from common import evaluate, leave_bench_dir, measure, qconvert_cmd, real_model  # noqa: E402

CONFIGS = {"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
           "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
           "int8": dict(load_in_8bit=True)}


def run_transformers(src: str, out: str, target: str) -> None:
    """In a child process: the reference path."""
    leave_bench_dir()
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=BitsAndBytesConfig(**CONFIGS[target]))
    model.save_pretrained(out)


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
    qa = json.loads((a / "config.json").read_text())["quantization_config"]
    qb = json.loads((b / "config.json").read_text())["quantization_config"]
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
    args = ap.parse_args()
    if args.run_transformers:
        return run_transformers(*args.run_transformers)
    if args.identical:
        return print(identical(*args.identical))
    src = real_model(args.model)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        n = None
        for target in [t.strip() for t in args.targets.split(",") if t.strip()]:
            ours, ref = tmp / f"q-{target}", tmp / f"t-{target}"
            mine = measure(qconvert_cmd() + [str(src), "--to", target, "-o", str(ours), "-q", "-j", "2"], env=env)
            theirs = measure([sys.executable, __file__, "--run-transformers", str(src), str(ref), target], env=env)
            # in a child: a child's peak RSS (wait4) starts from its parent's at fork, so this
            # process must stay small
            same = subprocess.run([sys.executable, __file__, "--identical", str(ours), str(ref)], check=True,
                                  capture_output=True, text=True).stdout.strip()
            n = n or params(ours)
            print(f"{target}: qconvert {mine[0]:.1f} s {mine[1] / 1e6:.0f} MB, transformers + bitsandbytes "
                  f"{theirs[0]:.1f} s {theirs[1] / 1e6:.0f} MB; identical: {same}", flush=True)
            rows.append((target, ours, mine, theirs, same))
            if not same.startswith("yes"):
                rows.append((f"{target} (transformers)", ref, theirs, None, ""))
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
