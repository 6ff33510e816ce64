"""Throughput of qconvert's C block kernels against ggml's ggml_quantize_chunk (the function
llama-quantize calls), same rows, same run: MB of float32 input per second, one thread and all
cores, without and with importance weights. Targets: >= 1.0x ggml on one thread for every type,
>= 1.5x for IQ4_NL and the K-quants with importance weights.

usage: python bench/kernels.py [--rows 512] [--cols 4096] [--repeat 3] [--types Q2_K,Q3_K]
ggml comes from llama-cpp-python's libggml-base.so; its multi-threaded figure splits rows over
threads as llama-quantize does.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qconvert import _kernels  # noqa: E402
from qconvert.quant import blocks  # noqa: E402
from tests.oracles import ggml  # noqa: E402

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q1_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
         "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"]


def ours(kind, rows, qw, threads):
    bt = blocks.get(kind)
    if bt.lattice is not None:
        blocks._build_lattice(bt.lattice)  # once; the bindings refuse before it
    out = np.empty((rows.shape[0], rows.shape[1] // bt.block * bt.block_bytes), np.uint8)
    _kernels.quantize(kind, rows, out, rows.shape[0], rows.shape[1], threads, qw)
    return out


def theirs(kind, rows, qw, threads):
    lib = ggml()
    bt = blocks.get(kind)
    t = int(bt.ggml)
    lib.ggml_quantize_init(t)
    nrows, n = rows.shape
    row_size = n // bt.block * bt.block_bytes
    out = np.empty((nrows, row_size), np.uint8)
    qp = None if qw is None else qw.ctypes.data

    def run(r0, r1):
        lib.ggml_quantize_chunk(t, rows[r0:r1].ctypes.data, out[r0:r1].ctypes.data, 0, r1 - r0, n, qp)
    bounds = np.linspace(0, nrows, threads + 1).astype(int)
    if threads == 1:
        run(0, nrows)
    else:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda i: run(bounds[i], bounds[i + 1]), range(threads)))
    return out


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def check_real(model_dir: Path, kinds: list[str]) -> None:
    """Byte equality with ggml on rows of a real checkpoint's weights, every type, +-imatrix."""
    from safetensors.numpy import safe_open

    with safe_open(str(next(model_dir.glob("*.safetensors"))), "np") as f:
        keys = sorted(f.keys())
        picked = [next(n for n in keys if n.endswith(s)) for s in ("down_proj.weight", "q_proj.weight",
                                                                     "embed_tokens.weight")]
        for name in picked:
            w = np.ascontiguousarray(f.get_tensor(name)[:64], dtype=np.float32)
            qw = (np.random.default_rng(1).lognormal(0, 1.5, w.shape[1]) + 1e-3).astype(np.float32)
            for kind in kinds:
                if not blocks.get(kind).fits(w.shape[1]):
                    continue
                for imat in (None, qw):
                    if imat is None and blocks.get(kind).needs_imatrix:
                        continue  # ggml_quantize_chunk aborts without importance weights
                    expect = theirs(kind, w, imat, 1)
                    assert np.array_equal(ours(kind, w, imat, 2), expect), f"{name} {kind}: C bytes differ from ggml"
                    ref = blocks.get(kind).reference.quantize(w, imat)
                    assert np.array_equal(ref, expect), f"{name} {kind}: numpy bytes differ from ggml"
            print(f"real weights {model_dir.name}:{name} {list(w.shape)}: every type that fits is byte-identical "
                  f"to ggml in C and in numpy, with and without importance weights")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated block types (default: all)")
    ap.add_argument("--real", type=Path, action="append", default=[],
                    help="also check byte equality on rows of this checkpoint (repeatable)")
    args = ap.parse_args()
    kinds = [k.strip().upper() for k in args.types.split(",") if k.strip()]
    for d in args.real:
        check_real(d, kinds)
    rng = np.random.default_rng(0)
    rows = (rng.standard_t(5, size=(args.rows, args.cols)) * 0.02).astype(np.float32)
    qw = (rng.lognormal(0, 1.5, args.cols) + 1e-3).astype(np.float32)
    mb = rows.nbytes / 1e6
    cores = len(os.sched_getaffinity(0))
    print(f"{mb:.0f} MB of float32 rows [{args.rows} x {args.cols}], best of {args.repeat}; MB/s and ratio ours/ggml")
    print(f"{'type':7s} {'imatrix':7s} | {'ours 1t':>8s} {'ggml 1t':>8s} {'x':>5s} | "
          f"{'ours ' + str(cores) + 't':>8s} {'ggml ' + str(cores) + 't':>8s} {'x':>5s}")
    for kind in kinds:
        for use_qw in (False, True):
            if kind == "Q8_0" and use_qw:
                continue  # ggml ignores importance weights for Q8_0
            if blocks.get(kind).needs_imatrix and not use_qw:
                continue  # ggml_quantize_chunk aborts without them
            w = qw if use_qw else None
            cells = []
            for threads in (1, cores):
                ta, a = best_of(lambda: ours(kind, rows, w, threads), args.repeat)
                tb, b = best_of(lambda: theirs(kind, rows, w, threads), args.repeat)
                assert np.array_equal(a, b), f"{kind}: bytes differ from ggml"
                cells.append((mb / ta, mb / tb, tb / ta))
            (a1, b1, x1), (an, bn, xn) = cells
            print(f"{kind:7s} {'yes' if use_qw else 'no':7s} | {a1:8.0f} {b1:8.0f} {x1:5.2f} | {an:8.0f} {bn:8.0f} {xn:5.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
