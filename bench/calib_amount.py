"""How much calibration text the GGUF mixtures need: KL divergence from the F32 model against
the number of calibration tokens, and what each amount costs in time.

usage: python bench/calib_amount.py [--model smollm2-135m] [--samples 32,64,128,256] [--chunks 24]
                                    [--calib FILE] [--llama-chunks 140]

For each amount (samples x 512 tokens of --calib, default the full text of Emma from
real-models.sh, the same book qconvert ships), `qconvert MODEL --to q4_k_m,iq4_nl --calib-samples N`
is timed (one command: read, calibrate, quantize both), and both files are scored by llama.cpp
(bench/quality.py's scoring: perplexity, KL divergence from the F32 file, top-1 agreement on
northangerabbey.txt, which no calibration sees). As the anchor, llama.cpp's usual publishing run:
convert f32, llama-imatrix over --llama-chunks chunks of 512 tokens of the same text, llama-quantize.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import IMATRIX, QUANTIZE, REAL, measure, need_reference, qconvert_cmd  # noqa: E402
from quality import logprobs, reference, score  # noqa: E402

RECIPES = (("q4_k_m", "Q4_K_M"), ("iq4_nl", "IQ4_NL"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", default="32,64,128,256")
    ap.add_argument("--chunks", type=int, default=24)
    ap.add_argument("--calib", type=Path, default=REAL / "text" / "emma.txt")
    ap.add_argument("--llama-chunks", type=int, default=140)
    args = ap.parse_args()
    need_reference()
    src = REAL / "hf" / args.model
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f32 = tmp / "f32.gguf"
        measure(qconvert_cmd() + [str(src), "--to", "f32", "-o", str(f32), "-q"])
        rows: list[tuple[str, float, dict[str, Path]]] = []
        for n in (int(x) for x in args.samples.split(",")):
            out = tmp / f"q{n}"
            wall, _ = measure(qconvert_cmd() + [str(src), "--to", ",".join(r for r, _ in RECIPES), "-o", str(out),
                                                "-q", "-j", "2", "--calib", str(args.calib), "--calib-samples", str(n)])
            label = src.name
            rows.append((f"qconvert, {n} x 512 = {n * 512 // 1024}k tokens", wall,
                         {r: out / f"{label}-{lab}.gguf" for r, lab in RECIPES}))
            print(f"{rows[-1][0]}: {wall:.1f} s (read, calibrate, both files)", flush=True)
        imat = tmp / "llama.imatrix.gguf"
        t_imat, _ = measure([str(IMATRIX), "-m", str(f32), "-f", str(args.calib), "-o", str(imat), "-c", "512",
                             "--chunks", str(args.llama_chunks), "-t", "2"])
        files = {}
        t_quant = 0.0
        for r, lab in RECIPES:
            files[r] = tmp / f"llama-{r}.gguf"
            t, _ = measure([str(QUANTIZE), "--imatrix", str(imat), str(f32), str(files[r]), lab, "2"])
            t_quant += t
        rows.append((f"llama-imatrix {args.llama_chunks} x 512 + llama-quantize", t_imat + t_quant, files))
        print(f"{rows[-1][0]}: {t_imat:.1f} s llama-imatrix, {t_quant:.1f} s llama-quantize (both files; "
              "convert not counted)", flush=True)

        chunks, base, p0 = reference(f32, args.chunks, 512, tmp)
        print(f"\n{args.model}, scored on northangerabbey.txt, {args.chunks} x 512 tokens; F32 perplexity {p0:.3f}")
        print(f"{'calibration':52s} {'s':>7s} | " + " | ".join(f"{r:>6s} PPL     KLD  top-1" for r, _ in RECIPES))
        for name, wall, paths in rows:
            cells = []
            for r, _ in RECIPES:
                ppl, kld, top1 = score(logprobs(paths[r], chunks), base, chunks)
                cells.append(f"{ppl:10.3f} {kld:7.5f} {top1:6.3f}")
            print(f"{name:52s} {wall:7.1f} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
