"""Any mix of targets in one command: `qconvert MODEL --to q4_k_m,iq4_nl,gptq,awq` against the four
targets run one at a time, same model and options, same run: wall time, peak RSS, and whether
every output is byte-identical.

usage: python bench/multi_target.py [--model smollm2-135m] [--group-size 64] [--samples 32]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REAL, measure, qconvert_cmd  # noqa: E402
from tests.golden_outputs import tree_hash  # noqa: E402

TARGETS = ("q4_k_m", "iq4_nl", "gptq", "awq")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=32)
    args = ap.parse_args()
    src = REAL / "hf" / args.model
    opts = ["-q", "-j", "2", "--calib-samples", str(args.samples)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        alone: dict[str, Path] = {}
        walls, peaks = [], []
        for t in TARGETS:
            extra = ["--group-size", str(args.group_size)] if t in ("gptq", "awq") else []
            wall, rss = measure(qconvert_cmd() + [str(src), "--to", t, "-o", str(tmp / t), *opts, *extra])
            walls.append(wall)
            peaks.append(rss)
            alone[t] = next((tmp / t).iterdir()) if (tmp / t).is_dir() and t not in ("gptq", "awq") else tmp / t
            print(f"--to {t}: {wall:.1f} s, peak RSS {rss / 1e6:.0f} MB", flush=True)
        wall, rss = measure(qconvert_cmd() + [str(src), "--to", ",".join(TARGETS), "-o", str(tmp / "all"), *opts,
                                              "--group-size", str(args.group_size)])
        print(f"--to {','.join(TARGETS)}: {wall:.1f} s, peak RSS {rss / 1e6:.0f} MB")
        print(f"four runs {sum(walls):.1f} s (peak {max(peaks) / 1e6:.0f} MB), one command {wall:.1f} s: "
              f"{wall / sum(walls):.2f}x the time")
        together = {p.name: p for p in (tmp / "all").iterdir()}
        for t in TARGETS:
            name = alone[t].name if t not in ("gptq", "awq") else f"{src.name}-{t.upper()}"
            same = tree_hash(alone[t]) == tree_hash(together[name])
            print(f"{t}: {'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
