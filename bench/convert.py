"""Wall time and peak RSS of qconvert against llama.cpp's convert_hf_to_gguf.py, same input,
same run. Targets (Qwen2.5-0.5B to q8_0): at most 0.7x the time and 0.6x the peak memory.

usage: python bench/convert.py [--models smollm2-135m,qwen2.5-0.5b] [--targets q8_0,f16] [--repeat 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REAL, measure, need_reference, qconvert_cmd, reference_convert_cmd  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-0.5b")
    ap.add_argument("--targets", default="q8_0,f16")
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs of each tool")
    args = ap.parse_args()
    need_reference()
    print(f"{'model':14s} {'target':6s} {'qconvert s':>10s} {'convert s':>10s} {'time x':>7s} "
          f"{'qconvert MB':>11s} {'convert MB':>10s} {'RSS x':>6s}   (threads: {os.cpu_count()})")
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.models.split(","):
            src = REAL / "hf" / m
            for target in args.targets.split(","):
                ours, ref = Path(tmp) / "ours.gguf", Path(tmp) / "ref.gguf"
                q = min(measure(qconvert_cmd() + [str(src), "--to", target, "-o", str(ours), "-q", "-f"])
                        for _ in range(args.repeat))
                r = min(measure(reference_convert_cmd(src, target, ref)) for _ in range(args.repeat))
                print(f"{m:14s} {target:6s} {q[0]:10.2f} {r[0]:10.2f} {q[0] / r[0]:7.2f} "
                      f"{q[1] / 1e6:11.0f} {r[1] / 1e6:10.0f} {q[1] / r[1]:6.2f}", flush=True)


if __name__ == "__main__":
    main()
