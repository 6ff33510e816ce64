"""GPTQ: qconvert against GPTQModel 7.7.0 on the same model and calibration tokens, two ways.

usage: python bench/gptq.py [--model qwen2.5-0.5b] [--samples 32] [--seq-len 512] [--chunks 16]
                            [--group-size 128] [--depth] [--workers N]

Defaults against defaults: `qconvert --to gptq` (activation order with static groups) against
GPTQModel's default QuantizeConfig (act_group_aware: its group-aware reordering, desc_act off).
Like for like: both with columns in natural order (qconvert --no-act-order, GPTQModel with
act_group_aware off). Everything else the same: 4 bits, the group size (128 unless the widths
need less: SmolLM2's 576 takes 64), damping 0.05, symmetric, the same calibration token samples
(qconvert's default text, seeded selection), 2 threads. Prints wall time, peak RSS, and
perplexity / KL divergence / top-1 against the float model on northangerabbey.txt, every
checkpoint scored by `qconvert eval` (the same forward for all). --depth also quantizes random
models of Qwen2.5-0.5B's width with 4 and 16 layers, to show peak memory does not grow with depth.

--workers N instead runs qconvert's default GPTQ in one process and with --workers N (the same
2 threads shared among the workers), and checks that the two checkpoints are the same bytes:
wall times, and the peak RSS of the largest process (wait4's, over the driver and its workers).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REAL, calibration_tokens, compare_checkpoints, leave_bench_dir, measure,  # noqa: E402
                    qconvert_cmd, real_model)


def run_gptqmodel(src: str, out: str, tokens: str, defaults: bool, group: int) -> None:
    """In a child process: GPTQModel's own quantize + save on the given token samples, with its
    default QuantizeConfig (but the group size) or with act_group_aware off."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    leave_bench_dir()
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    torch.set_num_threads(2)
    ids = np.load(tokens)
    cfg = QuantizeConfig(group_size=group) if defaults else QuantizeConfig(
        bits=4, group_size=group, desc_act=False, sym=True, damp_percent=0.05, act_group_aware=False)
    model = GPTQModel.load(src, cfg, device="cpu")
    model.quantize([{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids], batch_size=1)
    model.save(out)


MAKE_MODEL = """
import sys, torch, transformers as tf
src, out, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = tf.AutoConfig.from_pretrained(src)
cfg.num_hidden_layers = layers
if getattr(cfg, "layer_types", None):
    cfg.layer_types = cfg.layer_types[:layers]
torch.manual_seed(0)
tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
"""


def depth_check(tmp: Path, method: str = "gptq", model: str = "qwen2.5-0.5b", calibrated: bool = True) -> None:
    """Random models of `model`'s widths, 4 and 16 layers. They are made in a child process:
    a child's peak RSS (wait4's ru_maxrss) starts from its parent's at fork, so the measuring
    process must stay small."""
    src = REAL / "hf" / model
    calib = ["--calib-samples", "8"] if calibrated else []
    print(f"\npeak RSS against depth ({method}; random weights, {model}'s widths"
          f"{', 8 x 512 calibration tokens' if calibrated else ''}):")
    for layers in (4, 16):
        d = tmp / f"depth{layers}"
        subprocess.run([sys.executable, "-c", MAKE_MODEL, str(src), str(d), str(layers)], check=True,
                       capture_output=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (d / f).write_bytes((src / f).read_bytes())
        wall, rss = measure(qconvert_cmd() + [str(d), "--to", method, "-o", str(tmp / f"q{layers}"), "-q",
                                              *calib, "-j", "2"])
        print(f"  {layers:2d} layers: {wall:6.1f} s, peak RSS {rss / 1e6:7.0f} MB", flush=True)


def workers_check(src: Path, args) -> None:
    import hashlib

    def digest(d: Path) -> str:
        h = hashlib.sha256()
        for f in sorted(d.rglob("*")):
            if f.is_file():
                h.update(f.relative_to(d).as_posix().encode())
                h.update(f.read_bytes())
        return h.hexdigest()
    print(f"{args.model}: GPTQ 4-bit group {args.group_size}, {args.samples} x {args.seq_len} calibration tokens, "
          "2 threads in all")
    with tempfile.TemporaryDirectory() as tmp:
        seen = {}
        for workers in (1, args.workers):
            out = Path(tmp) / f"w{workers}"
            wall, rss = measure(qconvert_cmd() + [
                str(src), "--to", "gptq", "-o", str(out), "-q", "-j", "2", "--group-size", str(args.group_size),
                "--calib-samples", str(args.samples), "--calib-seq-len", str(args.seq_len),
                *(["--workers", str(workers)] if workers > 1 else [])])
            seen[workers] = (wall, digest(out))
            print(f"  {'one process' if workers == 1 else f'--workers {workers}':12s} {wall:7.1f} s, largest process's "
                  f"peak RSS {rss / 1e6:6.0f} MB, sha256 {seen[workers][1][:16]}", flush=True)
        w1, wn = seen[1], seen[args.workers]
        print(f"  same bytes: {w1[1] == wn[1]}; wall time ratio --workers {args.workers} / one process: "
              f"{wn[0] / w1[0]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--depth", action="store_true")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--run-gptqmodel", nargs=5, metavar=("SRC", "OUT", "TOKENS", "DEFAULTS", "GROUP"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_gptqmodel:
        src_, out, tokens_, defaults, group = args.run_gptqmodel
        return run_gptqmodel(src_, out, tokens_, defaults == "1", int(group))
    src = real_model(args.model)
    if args.workers:
        return workers_check(src, args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokens = tmp / "tokens.npy"
        calibration_tokens(src, args.samples, args.seq_len, tokens)
        env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", OMP_NUM_THREADS="2")
        # GPTQModel compiles its packing extension on first use (once per machine, cached): not
        # part of a quantization's time
        subprocess.run([sys.executable, "-c", "from gptqmodel.utils.cpp import load_pack_block_extension as f; f()"],
                       check=True, capture_output=True, env=env, cwd=tmp)
        runs = {}
        for defaults, ours_extra, name in ((True, [], "defaults"), (False, ["--no-act-order"], "natural order")):
            ours = tmp / f"qconvert-{int(defaults)}"
            runs[f"qconvert ({name})"] = (ours, measure(qconvert_cmd() + [
                str(src), "--to", "gptq", "-o", str(ours), "-q", "-j", "2", "--group-size", str(args.group_size),
                "--calib-samples", str(args.samples), "--calib-seq-len", str(args.seq_len), *ours_extra]))
            theirs = tmp / f"gptqmodel-{int(defaults)}"  # GPTQModel writes a logs/ folder where it runs
            runs[f"GPTQModel 7.7.0 ({name})"] = (theirs, measure(
                [sys.executable, str(Path(__file__).resolve()), "--run-gptqmodel", str(src), str(theirs), str(tokens),
                 str(int(defaults)), str(args.group_size)], env=env, cwd=tmp))
        title = (f"{args.model}: GPTQ 4-bit group {args.group_size} sym, {args.samples} x {args.seq_len} "
                 f"calibration tokens, 2 threads; scored on northangerabbey.txt, {args.chunks} x 512 tokens")
        names = list(runs)
        compare_checkpoints(title + "\ndefaults against defaults", {n: runs[n] for n in names[:2]}, src, args.chunks)
        compare_checkpoints(title + "\nlike for like (natural order)", {n: runs[n] for n in names[2:]}, src,
                            args.chunks)
        if args.depth:
            depth_check(tmp)


if __name__ == "__main__":
    main()
