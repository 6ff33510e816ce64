"""Byte identity on real models: the sha256 of qconvert's outputs for SmolLM2-135M from
real-models.sh (q4_k_m and iq4_nl calibrated, GPTQ, AWQ; every option explicit, 2 threads),
recorded once (--record) and compared after a change that must not move a byte.

usage: python bench/golden_real.py [--record] [--model smollm2-135m]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REAL, measure, qconvert_cmd  # noqa: E402
from tests.golden_outputs import environment, tree_hash  # noqa: E402

RECORD = Path(__file__).resolve().parent / "golden_real.json"
CALIB = ["--calib-samples", "32", "--calib-seq-len", "512", "--seed", "0", "-j", "2"]
RUNS = {"gguf": ["--to", "q4_k_m,iq4_nl", *CALIB],
        "gptq": ["--to", "gptq", "--group-size", "64", "--act-order", *CALIB],
        "awq": ["--to", "awq", "--group-size", "64", *CALIB]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    src = REAL / "hf" / args.model
    got = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, opts in RUNS.items():
            out = Path(tmp) / name
            dest = out / f"{args.model}-{name.upper()}" if name != "gguf" else out
            wall, _ = measure(qconvert_cmd() + [str(src), *opts, "-o", str(dest), "-q"])
            got[name] = {p.name: tree_hash(p) for p in sorted(out.iterdir())}
            print(f"{name}: {wall:.1f} s", flush=True)
    recorded = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    if args.record:
        recorded[args.model] = {"environment": environment(), "outputs": got}
        RECORD.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        print(f"recorded in {RECORD}")
        return
    want = recorded.get(args.model)
    if want is None:
        sys.exit(f"nothing recorded for {args.model}: run with --record first")
    if want["environment"] != environment():
        print(f"note: recorded in {want['environment']}, running in {environment()}: calibrated bytes may differ")
    for name in RUNS:
        same = got[name] == want["outputs"][name]
        print(f"{name}: {'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
