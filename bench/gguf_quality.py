"""Error-feedback rounding (`--method gptq`) against the importance-matrix path, for GGUF types.

usage: python bench/gguf_quality.py [--model smollm2-135m] [--types q4_k_m,q3_k_m,q2_k,iq4_xs]
                                    [--chunks 24] [--ctx 512] [--autoround ITERS]

For each type, from the same checkpoint and the same calibration tokens (qconvert's shipped text,
32 x 512):
  qconvert --to TYPE                 the importance matrix, rounding to nearest (= llama-imatrix +
                                     llama-quantize with that matrix, byte for byte)
  qconvert --to TYPE --method gptq   the same types and sizes, rounded with error feedback
  --autoround ITERS: also Intel's auto-round 0.16.1 GGUF export (its own venv: its pins are not
                     ours) of the types it offers (q4_k_m, q3_k_m; it has no q2_k, only its own
                     q2_k_s mixture, and no i-quants), with ITERS sign-gradient steps per block
                     (its default is 200; it recommends 0, its "optimised RTN", for every GGUF
                     type but 3-bit), on the same text and amount (the shipped text cut into 32
                     records of at least 512 tokens); and `--method gptq` once more with every
                     tensor's type taken from auto-round's file (--tensor-type per tensor, the
                     embedding's and output's types too), so that the two files have the same
                     types and sizes even where auto-round's mixture is not llama.cpp's (its q3_k_m)
Each command is timed alone (wall seconds; not peak memory: the scoring process's own size would
count in its children's, so run the two commands by hand under /usr/bin/time for that). Scored by llama.cpp itself
(llama-cpp-python) on northangerabbey.txt, which no calibration read: perplexity, KL divergence
from the F32 file and top-1 agreement with it, over the second half of each ctx-token chunk
(llama-perplexity's convention; bench/quality.py's scoring).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REAL, measure, qconvert_cmd, tool_venv  # noqa: E402
from quality import CALIB, logprobs, reference, score  # noqa: E402

AUTOROUND_VENV = Path(os.environ.get("QCONVERT_AUTOROUND", Path.home() / ".cache" / "qconvert-autoround-bench"))
AUTOROUND_TYPES = ("q4_k_m", "q3_k_m", "q4_k_s", "q3_k_s", "q3_k_l", "q5_k_m", "q5_k_s", "q6_k", "q4_0", "q4_1",
                   "q5_0", "q5_1", "q8_0")


def autoround_python() -> Path:
    # its GGUF export imports gguf and sentencepiece, which it does not declare
    return tool_venv(AUTOROUND_VENV, (["torch==2.13.0"], ["auto-round==0.16.1", "gguf==0.19.0",
                                                          "sentencepiece==0.2.3"]))


CUT = """
import json, sys
from transformers import AutoTokenizer
text, model, out = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(model)
ids = tok(open(text, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
win = 512 + 64  # auto-round drops a record that tokenizes to fewer than seqlen tokens
with open(out, "w", encoding="utf-8") as f:
    for i in range(0, len(ids) - win + 1, win):
        f.write(json.dumps({"text": tok.decode(ids[i:i + win])}) + "\\n")
"""


def autoround(src: Path, t: str, iters: int, tmp: Path, threads: int) -> tuple[Path, float]:
    """auto-round's GGUF file of type t and its wall seconds."""
    py = autoround_python()
    records = tmp / "autoround-calib.jsonl"
    if not records.exists():
        measure([str(py), "-c", CUT, str(CALIB), str(src), str(records)])
    out = tmp / f"autoround-{t}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=str(threads))
    seconds, _ = measure([str(py.parent / "auto-round"), "--model", str(src), "--scheme", f"gguf:{t}", "--format",
                          f"gguf:{t}", "--dataset", str(records), "--nsamples", "32", "--seqlen", "512",
                          "--batch_size", "8", "--iters", str(iters), "--device", "cpu", "--disable_torch_compile",
                          "--output_dir", str(out)], env=env)
    return next(out.rglob("*.gguf")), seconds


def same_types(path: Path) -> list[str]:
    """qconvert options that give every quantized tensor of GGUF file `path` the type it has there."""
    from gguf import GGUFReader
    by_type: dict[str, list[str]] = {}
    extra = []
    for t in GGUFReader(path).tensors:
        kind = t.tensor_type.name.lower()
        if t.name == "token_embd.weight":
            extra += ["--token-embedding-type", kind]
        elif t.name == "output.weight":
            extra += ["--output-tensor-type", kind]
        elif len(t.shape) == 2 and kind not in ("f32",):
            by_type.setdefault(kind, []).append(re.escape(t.name))
    for kind, names in sorted(by_type.items()):
        extra += ["--tensor-type", f"^({'|'.join(names)})$={kind}"]
    return extra


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--types", default="q4_k_m,q3_k_m,q2_k,iq4_xs")
    ap.add_argument("--chunks", type=int, default=24)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--autoround", type=int, default=None, metavar="ITERS")
    args = ap.parse_args()
    src = REAL / "hf" / args.model
    if not src.is_dir():
        sys.exit(f"{src} is missing: run ../shared/tools/real-models.sh")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f32 = tmp / "f32.gguf"
        measure(qconvert_cmd() + [str(src), "--to", "f32", "-o", str(f32), "-q"])
        chunks, base, p0 = reference(f32, args.chunks, args.ctx, tmp)
        print(f"{args.model}, northangerabbey.txt, {args.chunks} x {args.ctx} tokens; F32 perplexity {p0:.3f}; "
              f"-j {args.threads}", flush=True)
        print(f"{'type':8s} {'rounding':9s} {'MB':>7s} {'s':>7s} {'PPL':>8s} {'KLD':>8s} {'top-1':>6s}", flush=True)
        for t in args.types.split(","):
            kld = {}
            for method in ("imatrix", "gptq"):
                out = tmp / f"{t}-{method}.gguf"
                seconds, _ = measure(qconvert_cmd() + [str(src), "--to", t, "--method", method, "-o", str(out),
                                                          "-q", "-j", str(args.threads)])
                ppl, kld[method], top1 = score(logprobs(out, chunks), base, chunks)
                print(f"{t:8s} {method:9s} {out.stat().st_size / 1e6:7.1f} {seconds:7.1f} {ppl:8.3f} "
                      f"{kld[method]:8.5f} {top1:6.3f}", flush=True)
                out.unlink()
            if args.autoround is not None and t in AUTOROUND_TYPES:
                out, seconds = autoround(src, t, args.autoround, tmp, args.threads)
                ppl, kld["autoround"], top1 = score(logprobs(out, chunks), base, chunks)
                label = f"ar-{args.autoround}"
                print(f"{t:8s} {label:9s} {out.stat().st_size / 1e6:7.1f} {seconds:7.1f} {ppl:8.3f} "
                      f"{kld['autoround']:8.5f} {top1:6.3f}", flush=True)
                same = tmp / f"{t}-gptq-ar.gguf"
                seconds, _ = measure(qconvert_cmd() + [str(src), "--to", t, "--method", "gptq", "-o", str(same), "-q",
                                                       "-j", str(args.threads), *same_types(out)])
                ppl, kld["gptq-ar"], top1 = score(logprobs(same, chunks), base, chunks)
                print(f"{t:8s} {'gptq-ar':9s} {same.stat().st_size / 1e6:7.1f} {seconds:7.1f} {ppl:8.3f} "
                      f"{kld['gptq-ar']:8.5f} {top1:6.3f}   (auto-round's tensor types)", flush=True)
                same.unlink()
                for ours in ("gptq", "gptq-ar"):
                    print(f"{t:8s} {ours}/auto-round KLD {kld[ours] / kld['autoround']:.3f}", flush=True)
            print(f"{t:8s} gptq/imatrix KLD {kld['gptq'] / kld['imatrix']:.3f}", flush=True)


if __name__ == "__main__":
    main()
