"""A release ladder in one command against llama.cpp's chain: `qconvert MODEL --to LADDER`
(one read of the checkpoint, one calibration, every file) against convert_hf_to_gguf.py
--outtype f32 + llama-imatrix + one llama-quantize per type, same model and calibration text
(qconvert's shipped text, 32 chunks of 512 tokens), same run: wall time and peak RSS. Then the
same ladder from llama-imatrix's own matrix (`--imatrix`) must be byte-identical, file for
file, to llama-quantize's (q8_0, which qconvert writes as convert_hf_to_gguf.py does: tensor for
tensor, llama-quantize's file carrying the imatrix keys besides). With --eval N, `qconvert eval`
scores qconvert's calibrated files on N chunks of northangerabbey.txt against the float model
and prints its table; --plot FILE keeps its picture. With --plain, every file is also made
without an importance matrix by both (`--no-calib`; llama-quantize without --imatrix) and
compared the same way (the mixtures llama-quantize writes only from an importance matrix left out).

usage: python bench/ladder.py [--model smollm2-135m] [--ladder q2_k,q3_k_m,...] [--eval 16] [--plot ladder.png]
                              [--plain]
"""
from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (IMATRIX, QUANTIZE, REAL, measure, need_reference, qconvert_cmd, real_model,  # noqa: E402
                    reference_convert_cmd)
from qconvert.quant.recipes import RECIPES  # noqa: E402

CALIB = Path(__file__).resolve().parents[1] / "qconvert" / "calibrate" / "data" / "emma.txt"
SAMPLES, SEQ = 32, 512
# every mixture but q1_0, which (as llama-quantize) stops on rows that fit no block of 128 (SmolLM2's 576)
LADDER = [r.name for r in RECIPES.values() if r.quantizes_like_llama_quantize and r.name != "q1_0"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ladder", default=",".join(LADDER), help="comma-separated GGUF targets (default: every mixture but q1_0)")
    ap.add_argument("--eval", type=int, default=0, help="score qconvert's files on this many chunks of 512 tokens")
    ap.add_argument("--plot", type=Path, help="with --eval: keep the ladder's picture here")
    ap.add_argument("--plain", action="store_true", help="also compare the files made without an importance matrix")
    args = ap.parse_args()
    need_reference()
    src = real_model(args.model)
    ladder = [x.strip() for x in args.ladder.split(",") if x.strip()]
    threads = str(len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f32, imat = tmp / "f32.gguf", tmp / "m.imatrix.gguf"
        ref = {name: tmp / f"ref-{name}.gguf" for name in ladder}
        steps = {"convert_hf_to_gguf f32": measure(reference_convert_cmd(src, "f32", f32)),
                 "llama-imatrix": measure([str(IMATRIX), "-m", str(f32), "-f", str(CALIB), "-o", str(imat), "-c",
                                           str(SEQ), "--chunks", str(SAMPLES), "-t", threads])}
        for name, path in ref.items():
            steps[f"llama-quantize {name}"] = measure([str(QUANTIZE), "--imatrix", str(imat), str(f32), str(path),
                                                       name.upper(), threads])
        ref_time = sum(t for t, _ in steps.values())
        ref_rss = max(r for _, r in steps.values())
        ours = measure(qconvert_cmd() + [str(src), "--to", ",".join(ladder), "-o", str(tmp / "ours"), "-q",
                                         "--calib-samples", str(SAMPLES), "--calib-seq-len", str(SEQ)])
        given = measure(qconvert_cmd() + [str(src), "--to", ",".join(ladder), "-o", str(tmp / "given"), "-q",
                                          "--imatrix", str(imat)])
        label = {p.name.rsplit("-", 1)[-1][:-len(".gguf")].lower(): p for p in (tmp / "given").iterdir()}
        same = {name: identical(label[name], ref[name], RECIPES[name].quantizes_like_llama_quantize) for name in ladder}
        if args.plain:
            plain = [name for name in ladder if not RECIPES[name].needs_imatrix]
            subprocess.run(qconvert_cmd() + [str(src), "--to", ",".join(plain), "-o", str(tmp / "plain"), "-q",
                                             "--no-calib"], check=True)
            mine = {p.name.rsplit("-", 1)[-1][:-len(".gguf")].lower(): p for p in (tmp / "plain").iterdir()}
            for name in plain:
                theirs = tmp / f"plain-{name}.gguf"
                measure([str(QUANTIZE), str(f32), str(theirs), name.upper(), threads])
                same[f"{name} plain"] = identical(mine[name], theirs, RECIPES[name].quantizes_like_llama_quantize)
                theirs.unlink()
        sizes = {name: ref[name].stat().st_size for name in ladder}
        scored = ""
        if args.eval:
            files = sorted((tmp / "ours").iterdir(), key=lambda p: p.stat().st_size)
            cmd = qconvert_cmd() + ["eval", *map(str, files), "--text", str(REAL / "text" / "northangerabbey.txt"),
                                    "--base", str(src), "--chunks", str(args.eval), "--markdown"]
            if args.plot:
                cmd += ["--plot", str(args.plot.resolve())]
            scored = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    print(f"{args.model}: {len(ladder)} files ({', '.join(ladder)}), calibration {SAMPLES} x {SEQ} tokens, "
          f"{threads} threads")
    for name, (s, r) in steps.items():
        print(f"  llama.cpp {name:28s} {s:7.1f} s {r / 1e6:8.0f} MB")
    print(f"  llama.cpp total                        {ref_time:7.1f} s {ref_rss / 1e6:8.0f} MB (peak of the steps)")
    print(f"  qconvert, one command, calibrated      {ours[0]:7.1f} s {ours[1] / 1e6:8.0f} MB")
    print(f"  qconvert, one command, --imatrix       {given[0]:7.1f} s {given[1] / 1e6:8.0f} MB")
    print(f"  ratio qconvert / llama.cpp: time {ours[0] / ref_time:.2f}x, peak RSS {ours[1] / ref_rss:.2f}x")
    for name in ladder:
        print(f"  {name:8s} {sizes[name] / 1e6:8.1f} MB  byte-identical to llama-quantize's: {same[name]}"
              + (f"; without an importance matrix: {same[name + ' plain']}" if name + " plain" in same else ""))
    if scored:
        print(scored)
    if not all(same.values()):
        sys.exit(1)


def identical(ours: Path, theirs: Path, whole_file: bool) -> bool:
    """The whole files, or (a convert-style type) every tensor's name, type, shape and bytes."""
    if whole_file:
        return filecmp.cmp(ours, theirs, shallow=False)
    from gguf import GGUFReader

    a, b = GGUFReader(ours).tensors, GGUFReader(theirs).tensors
    key = lambda t: (t.name, int(t.tensor_type), tuple(int(x) for x in t.shape), bytes(t.data.tobytes()))  # noqa: E731
    return sorted(map(key, a)) == sorted(map(key, b))


if __name__ == "__main__":
    main()
