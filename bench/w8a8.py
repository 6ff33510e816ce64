"""W8A8 int8: qconvert against llm-compressor 0.14 (SmoothQuantModifier at the same strength,
then GPTQModifier with the W8A8 scheme, `ignore=["lm_head"]`: its documented W8A8 recipe) on the
same model and calibration tokens, in llm-compressor's own venv (bench/awq.py builds it), on the
CPU, float32, 2 threads.

usage: python bench/w8a8.py [--model qwen2.5-0.5b] [--samples 32] [--seq-len 512] [--chunks 16]
                            [--smoothing 0.5] [--keep DIR] [--depth] [--depth-only]

Prints wall time and peak RSS of both and perplexity / KL divergence / top-1 agreement on
northangerabbey.txt against the float model, both checkpoints read by `qconvert eval` (the
weights dequantized; the activations' run-time int8 rounding, the same for both, is not
simulated). --depth: peak memory against depth, as bench/gptq.py (--depth-only: that alone).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from awq import llmcompressor_python  # noqa: E402
from common import (calibration_tokens, compare_checkpoints, leave_bench_dir, measure, qconvert_cmd,  # noqa: E402
                    real_model)
from gptq import depth_check  # noqa: E402


def run_llmcompressor(src: str, out: str, tokens: str, smoothing: str) -> None:
    """In a child process (llm-compressor's venv): SmoothQuant + GPTQ W8A8 on the given samples."""
    leave_bench_dir()
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    from llmcompressor.pipelines.cache import IntermediatesCache  # no accelerator: pinning is refused (awq.py)
    IntermediatesCache.pin_memory = lambda self, *a, **k: None
    ids = np.load(tokens)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    data = Dataset.from_dict({"input_ids": [r.tolist() for r in ids], "attention_mask": [[1] * ids.shape[1]] * len(ids)})
    recipe = [SmoothQuantModifier(smoothing_strength=float(smoothing)),
              GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=len(ids))
    model.save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--smoothing", default="0.5")
    ap.add_argument("--keep", type=Path)
    ap.add_argument("--depth", action="store_true")
    ap.add_argument("--depth-only", action="store_true")
    ap.add_argument("--run-llmcompressor", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_llmcompressor:
        return run_llmcompressor(*args.run_llmcompressor)
    src = real_model(args.model)
    if args.depth_only:
        with tempfile.TemporaryDirectory() as tmp:
            return depth_check(Path(tmp), "w8a8")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokens = tmp / "tokens.npy"
        calibration_tokens(src, args.samples, args.seq_len, tokens)
        ours, theirs = tmp / "qconvert-w8a8", tmp / "llmcompressor-w8a8"
        rows = {"qconvert --to w8a8": (ours, measure(qconvert_cmd() + [
            str(src), "--to", "w8a8", "-o", str(ours), "-q", "-j", "2", "--smoothing", args.smoothing,
            "--calib-samples", str(args.samples), "--calib-seq-len", str(args.seq_len)]))}
        env = dict(os.environ, OMP_NUM_THREADS="2")
        rows["llm-compressor 0.14 (SmoothQuant + GPTQ W8A8)"] = (theirs, measure(
            [str(llmcompressor_python()), str(Path(__file__).resolve()), "--run-llmcompressor", str(src), str(theirs),
             str(tokens), args.smoothing], env=env, cwd=tmp))
        if args.keep:
            for d in (ours, theirs):
                shutil.copytree(d, args.keep / d.name, dirs_exist_ok=True)
        compare_checkpoints(f"{args.model}: W8A8 int8, SmoothQuant {args.smoothing}, {args.samples} x {args.seq_len} "
                            f"calibration tokens, 2 threads; scored on northangerabbey.txt, {args.chunks} x 512 tokens",
                            rows, src, args.chunks)
        if args.depth:
            depth_check(tmp, "w8a8")


if __name__ == "__main__":
    main()
