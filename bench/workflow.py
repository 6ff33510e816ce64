"""One command against llama.cpp's three: wall time and peak RSS of `qconvert MODEL --to q4_k_m`
(calibrated) against convert_hf_to_gguf.py --outtype f32 + llama-imatrix + llama-quantize, on the
same model and calibration text (qconvert's shipped text, 32 chunks of 512 tokens), same run.
Targets on Qwen2.5-0.5B: at most 0.5x the time and 0.5x the peak memory; calibration throughput
(tokens/s) at least llama-imatrix's with the same threads.

usage: python bench/workflow.py [--model qwen2.5-0.5b] [--recipe q4_k_m]
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
from common import IMATRIX, QUANTIZE, REAL, measure, need_reference, qconvert_cmd, reference_convert_cmd  # noqa: E402

CALIB = Path(__file__).resolve().parents[1] / "qconvert" / "calibrate" / "data" / "emma.txt"
SAMPLES, SEQ = 32, 512


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--recipe", default="q4_k_m")
    args = ap.parse_args()
    need_reference()
    src = REAL / "hf" / args.model
    threads = str(len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f32, imat, ref = tmp / "f32.gguf", tmp / "m.imatrix.gguf", tmp / "ref.gguf"
        steps = {
            "convert_hf_to_gguf f32": measure(reference_convert_cmd(src, "f32", f32)),
            "llama-imatrix": measure([str(IMATRIX), "-m", str(f32), "-f", str(CALIB), "-o", str(imat), "-c", str(SEQ),
                                      "--chunks", str(SAMPLES), "-t", threads]),
            "llama-quantize": measure([str(QUANTIZE), "--imatrix", str(imat), str(f32), str(ref),
                                       args.recipe.upper(), threads]),
        }
        ref_time = sum(t for t, _ in steps.values())
        ref_rss = max(r for _, r in steps.values())
        # qconvert, one command; its calibration time from a separate `qconvert imatrix` run
        ours = measure(qconvert_cmd() + [str(src), "--to", args.recipe, "-o", str(tmp / "ours.gguf"), "-q",
                                         "--calib-samples", str(SAMPLES), "--calib-seq-len", str(SEQ)])
        out = subprocess.run(qconvert_cmd() + ["imatrix", str(src), "-o", str(tmp / "ours.imatrix.gguf"), "--json",
                                               "--calib-samples", str(SAMPLES), "--calib-seq-len", str(SEQ)],
                             capture_output=True, text=True, check=True)
        calib_s = json.loads(out.stdout)["seconds"]
    tokens = SAMPLES * SEQ
    print(f"{args.model} -> {args.recipe}, calibration {SAMPLES} x {SEQ} tokens, {threads} threads")
    for name, (s, r) in steps.items():
        print(f"  llama.cpp {name:24s} {s:7.1f} s {r / 1e6:8.0f} MB")
    print(f"  llama.cpp total                  {ref_time:7.1f} s {ref_rss / 1e6:8.0f} MB (peak of the steps)")
    print(f"  qconvert one command             {ours[0]:7.1f} s {ours[1] / 1e6:8.0f} MB")
    print(f"  ratio qconvert / llama.cpp: time {ours[0] / ref_time:.2f}x, peak RSS {ours[1] / ref_rss:.2f}x")
    print(f"  calibration throughput: qconvert imatrix {tokens / calib_s:.0f} tok/s, "
          f"llama-imatrix {tokens / steps['llama-imatrix'][0]:.0f} tok/s (wall, incl. loading)")


if __name__ == "__main__":
    main()
