"""Quality of the 4-bit files, qconvert against llama.cpp, on text no calibration saw.

usage: python bench/quality.py [--model qwen2.5-0.5b] [--chunks 12] [--ctx 512]

Files compared (all from the same checkpoint):
  qconvert --to q4_k_m / iq4_nl            calibrated by default (its shipped text, 32 x 512 tokens)
  llama.cpp convert f32 + llama-imatrix + llama-quantize, on the same calibration text
  llama.cpp convert f32 + llama-quantize without an imatrix
  llama.cpp convert f32 + llama-quantize with `qconvert imatrix`'s matrix (same text and samples
  as qconvert's own calibration): our matrix against llama-imatrix's in the same quantizer
Scored by llama.cpp itself (llama-cpp-python) on northangerabbey.txt from real-models.sh:
perplexity, KL divergence from the F32 model and top-1 agreement with it, over the second half
of each ctx-token chunk (llama-perplexity's convention).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import IMATRIX, QUANTIZE, REAL, measure, need_reference, qconvert_cmd  # noqa: E402

CALIB = Path(__file__).resolve().parents[1] / "qconvert" / "calibrate" / "data" / "emma.txt"


def logprobs(path: Path, chunks: list[list[int]]):
    """Yield each chunk's log-probabilities over its second half (float32 [ctx/2, vocab])."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=len(chunks[0]), logits_all=True, n_threads=2, n_batch=512, verbose=False)
    try:
        for ids in chunks:
            llm.reset()
            llm.eval(ids)
            z = np.asarray(llm.scores[len(ids) // 2: len(ids) - 1], dtype=np.float32)
            z = z - z.max(axis=1, keepdims=True)
            yield z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    finally:
        llm.close()


def score(lp, base: np.ndarray, chunks: list[list[int]]) -> tuple[float, float, float]:
    """Perplexity, mean KL(base || q) and top-1 agreement, streaming over chunks; `base` is the
    F32 model's log-probabilities kept on disk (a memmap), so memory holds one chunk."""
    nll, kld, top1, n = 0.0, 0.0, 0, 0
    for c, (q, ids) in enumerate(zip(lp, chunks)):
        p = base[c]
        half = len(ids) // 2
        targets = np.asarray(ids[half + 1:])
        nll -= float(q[np.arange(len(targets)), targets].sum())
        kld += float((np.exp(p) * (p - q)).sum())
        top1 += int((q.argmax(1) == p.argmax(1)).sum())
        n += len(targets)
    return float(np.exp(nll / n)), kld / n, top1 / n


def reference(f32: Path, n_chunks: int, ctx: int, tmp: Path) -> tuple[list[list[int]], np.ndarray, float]:
    """northangerabbey.txt in chunks of ctx tokens (the F32 file's tokenizer), the F32 file's
    log-probabilities of them (on disk, in tmp: score() streams over them) and its perplexity."""
    from llama_cpp import Llama

    tok = Llama(str(f32), vocab_only=True, verbose=False)
    ids = tok.tokenize((REAL / "text" / "northangerabbey.txt").read_text(encoding="utf-8").encode(), add_bos=False)
    tok.close()
    chunks = [ids[i * ctx:(i + 1) * ctx] for i in range(n_chunks)]
    first = next(logprobs(f32, chunks[:1]))
    base = np.lib.format.open_memmap(tmp / "base.npy", mode="w+", dtype=np.float32, shape=(len(chunks), *first.shape))
    for c, lp in enumerate(logprobs(f32, chunks)):
        base[c] = lp
    p0, _, _ = score((base[c] for c in range(len(chunks))), base, chunks)
    return chunks, base, p0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args()
    need_reference()
    src = REAL / "hf" / args.model
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f32 = tmp / "f32.gguf"
        measure(qconvert_cmd() + [str(src), "--to", "f32", "-o", str(f32), "-q"])  # = convert_hf_to_gguf f32
        imat = tmp / "llama.imatrix.gguf"
        measure([str(IMATRIX), "-m", str(f32), "-f", str(CALIB), "-o", str(imat), "-c", "512", "--chunks", "32",
                 "-t", "2"])
        ours_imat = tmp / "qconvert.imatrix.gguf"
        measure(qconvert_cmd() + ["imatrix", str(src), "-o", str(ours_imat), "-q"])
        files = {}
        for recipe, label in (("q4_k_m", "Q4_K_M"), ("iq4_nl", "IQ4_NL")):
            files[f"qconvert {recipe} (calibrated)"] = tmp / f"q-{recipe}.gguf"
            measure(qconvert_cmd() + [str(src), "--to", recipe, "-o", str(files[f"qconvert {recipe} (calibrated)"]), "-q"])
            files[f"llama.cpp {recipe} + llama-imatrix"] = tmp / f"l-{recipe}-im.gguf"
            measure([str(QUANTIZE), "--imatrix", str(imat), str(f32), str(files[f"llama.cpp {recipe} + llama-imatrix"]),
                     label, "2"])
            files[f"llama.cpp {recipe} + qconvert imatrix"] = tmp / f"l-{recipe}-qim.gguf"
            measure([str(QUANTIZE), "--imatrix", str(ours_imat), str(f32),
                     str(files[f"llama.cpp {recipe} + qconvert imatrix"]), label, "2"])
            files[f"llama.cpp {recipe}, no imatrix"] = tmp / f"l-{recipe}.gguf"
            measure([str(QUANTIZE), str(f32), str(files[f"llama.cpp {recipe}, no imatrix"]), label, "2"])
        chunks, base, p0 = reference(f32, args.chunks, args.ctx, tmp)
        print(f"{args.model}, northangerabbey.txt, {args.chunks} x {args.ctx} tokens; F32 perplexity {p0:.3f}")
        print(f"{'file':38s} {'MB':>7s} {'bpw':>6s} {'PPL':>8s} {'KLD':>8s} {'top-1':>7s}")
        from gguf import GGUFReader
        for name, path in files.items():
            r = GGUFReader(path)
            n = sum(int(np.prod(t.shape)) for t in r.tensors)
            bpw = sum(int(t.n_bytes) for t in r.tensors) * 8 / n
            ppl, kld, top1 = score(logprobs(path, chunks), base, chunks)
            print(f"{name:38s} {path.stat().st_size / 1e6:7.1f} {bpw:6.3f} {ppl:8.3f} {kld:8.4f} {top1:7.3f}", flush=True)


if __name__ == "__main__":
    main()
