"""`qconvert eval` against llama.cpp's own scoring of the same GGUF files, text and chunks.

usage: python bench/eval.py [--model qwen2.5-0.5b] [--chunks 8] [--ctx 512]

For F32, Q8_0, Q4_K_M and IQ4_NL files of the model: perplexity from qconvert eval (our forward
on the dequantized weights) and from llama-cpp-python (llama.cpp's forward, which also
quantizes activations for its dot products), the ratio of the two (target: within 1%), and
the KL divergence from the F32 model as each computes it. Also wall time and peak RSS of both.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REAL, measure, need_reference, qconvert_cmd  # noqa: E402
from quality import logprobs, score  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args()
    need_reference()
    src = REAL / "hf" / args.model
    text_path = REAL / "text" / "northangerabbey.txt"
    from qconvert.calibrate.text import tokenize
    from qconvert.evaluate import chunk_tokens
    from qconvert.read.gguf_model import open_gguf

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {}
        for t in ("f32", "q8_0", "q4_k_m", "iq4_nl"):
            files[t] = tmp / f"{t}.gguf"
            measure(qconvert_cmd() + [str(src), "--to", t, "-o", str(files[t]), "-q"])
        bos = open_gguf(files["f32"]).bos_id
        chunks = chunk_tokens(tokenize(src, text_path.read_text(encoding="utf-8")), args.ctx, args.chunks, bos,
                              text_path.name).tolist()
        first = next(logprobs(files["f32"], chunks[:1]))
        base = np.lib.format.open_memmap(tmp / "base.npy", mode="w+", dtype=np.float32, shape=(len(chunks), *first.shape))
        for c, lp in enumerate(logprobs(files["f32"], chunks)):
            base[c] = lp
        print(f"{args.model}, {text_path.name}, {len(chunks)} x {args.ctx} tokens")
        print(f"{'file':8s} {'PPL ours':>9s} {'PPL llama':>9s} {'ratio':>7s} {'KLD ours':>9s} {'KLD llama':>9s} "
              f"{'s ours':>7s} {'s llama':>7s} {'MB ours':>8s}")
        for t, path in files.items():
            cmd = qconvert_cmd() + ["eval", str(path), "--text", str(text_path), "--tokenizer", str(src),
                                    "--ctx", str(args.ctx), "--chunks", str(args.chunks), "--json"]
            if t != "f32":
                cmd += ["--base", str(files["f32"])]
            t0 = time.perf_counter()
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            ours_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            ppl, kld, _ = score(logprobs(path, chunks), base, chunks)
            llama_s = time.perf_counter() - t0
            print(f"{t:8s} {r['perplexity']:9.4f} {ppl:9.4f} {r['perplexity'] / ppl:7.4f} "
                  f"{(r['kl_divergence'] or 0):9.5f} {kld:9.5f} {ours_s:7.1f} {llama_s:7.1f} "
                  f"{r['peak_rss_bytes'] / 1e6:8.0f}", flush=True)


if __name__ == "__main__":
    main()
