"""Byte parity with llama.cpp's tools on the real models.

usage: python bench/parity.py [--targets q8_0,f16,q4_k_m,iq4_nl] [MODEL ...]
       (default models: smollm2-135m qwen2.5-0.5b)

The reference for q8_0/f16 is convert_hf_to_gguf.py --outtype X; for q4_k_m/iq4_nl it is
convert_hf_to_gguf.py --outtype f32 followed by llama-quantize, without an imatrix against
`qconvert --to X --no-calib`, and with one made by llama-imatrix (8 chunks of 256 tokens of
emma.txt) against `qconvert --to X --imatrix` on the same file (targets q4_k_m+im, iq4_nl+im). For each: same tensor names, shapes and types, tensor data
byte-identical, same metadata keys and values, identical greedy generation of 32 tokens through
llama-cpp-python; whether the whole files are byte-identical is reported too. Exits non-zero on
any mismatch.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import IMATRIX, QUANTIZE, REAL, measure, need_reference, qconvert_cmd, reference_convert_cmd  # noqa: E402

PROMPT = "The history of the city of London begins"


def fields(r) -> dict:
    out = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        v = f.contents()
        out[name] = (f.types[0].name if f.types else None, v)
    return out


def generate(path: Path) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=256, n_threads=2, verbose=False, seed=0)
    toks = llm.tokenize(PROMPT.encode())
    out = []
    for t in llm.generate(toks, temp=0.0, top_k=1):
        out.append(t)
        if len(out) == 32:
            break
    llm.close()
    return out


def compare(ours: Path, ref: Path) -> list[str]:
    from gguf import GGUFReader

    a, b = GGUFReader(ours), GGUFReader(ref)
    problems = []
    ta = {t.name: t for t in a.tensors}
    tb = {t.name: t for t in b.tensors}
    if set(ta) != set(tb):
        problems.append(f"tensor names differ: only ours {sorted(set(ta) - set(tb))[:5]}, only ref {sorted(set(tb) - set(ta))[:5]}")
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            problems.append(f"{name}: {x.tensor_type.name}{list(x.shape)} vs {y.tensor_type.name}{list(y.shape)}")
        elif not np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8)):
            problems.append(f"{name}: tensor data differs")
    fa, fb = fields(a), fields(b)
    for k in sorted(set(fa) | set(fb)):
        if k not in fa:
            problems.append(f"key {k} missing in ours (ref: {str(fb[k])[:80]})")
        elif k not in fb:
            problems.append(f"key {k} only in ours ({str(fa[k])[:80]})")
        elif fa[k] != fb[k]:
            problems.append(f"key {k}: ours {str(fa[k])[:80]} vs ref {str(fb[k])[:80]}")
    order_a, order_b = [k for k in fa if k in fb], [k for k in fb if k in fa]
    if order_a != order_b:
        i = next(i for i, (x, y) in enumerate(zip(order_a, order_b)) if x != y)
        problems.append(f"keys in another order: ours has {order_a[i]} where ref has {order_b[i]}")
    return problems


MIXTURES = {"q4_k_m": "Q4_K_M", "iq4_nl": "IQ4_NL"}


def main() -> int:
    import argparse
    import filecmp

    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="q8_0,f16,q4_k_m,iq4_nl,q4_k_m+im,iq4_nl+im")
    ap.add_argument("models", nargs="*", default=["smollm2-135m", "qwen2.5-0.5b"])
    args = ap.parse_args()
    need_reference()
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for m in args.models:
            src = REAL / "hf" / m
            for target in args.targets.split(","):
                ours, ref = tmp / f"ours-{m}-{target}.gguf", tmp / f"ref-{m}-{target}.gguf"
                recipe, _, im = target.partition("+")
                f32, imat = tmp / f"ref-{m}-f32.gguf", tmp / f"{m}.imatrix.gguf"
                if recipe in MIXTURES and not f32.exists():
                    measure(reference_convert_cmd(src, "f32", f32))
                if im and not imat.exists():
                    measure([str(IMATRIX), "-m", str(f32), "-f", str(REAL / "text" / "emma.txt"), "-o", str(imat),
                             "-c", "256", "--chunks", "8", "-t", "2"])
                extra = (["--imatrix", str(imat)] if im else ["--no-calib"]) if recipe in MIXTURES else []
                measure(qconvert_cmd() + [str(src), "--to", recipe, "-o", str(ours), "--quiet", "--force"] + extra)
                if recipe in MIXTURES:
                    measure([str(QUANTIZE)] + (["--imatrix", str(imat)] if im else [])
                            + [str(f32), str(ref), MIXTURES[recipe], "2"])
                else:
                    measure(reference_convert_cmd(src, target, ref))
                problems = compare(ours, ref)
                whole = filecmp.cmp(ours, ref, shallow=False)
                same_gen = generate(ours) == generate(ref)
                if not same_gen:
                    problems.append("greedy generation differs")
                status = "IDENTICAL" if not problems else "DIFFERENT"
                print(f"{m:14s} {target:9s} {status}: tensors, metadata, 32-token greedy generation; "
                      f"whole file {'byte-identical' if whole else 'differs (key or tensor order)'}"
                      + ("" if not problems else "\n  " + "\n  ".join(problems[:20])), flush=True)
                failed |= bool(problems)
                ours.unlink()
                ref.unlink()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
