"""Shared by the bench scripts: where the reference tools and real models are, and how to
measure a command's wall time and peak RSS (of the whole process tree, via wait4)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REAL = Path(os.environ.get("QCONVERT_REAL", Path.home() / ".cache" / "qconvert-real"))
LLAMACPP = Path(os.environ.get("QCONVERT_LLAMACPP", Path.home() / ".cache" / "qconvert-llamacpp"))
CONVERT = LLAMACPP / "llama.cpp" / "convert_hf_to_gguf.py"
CONVERT_PY = LLAMACPP / "venv" / "bin" / "python"
QUANTIZE = LLAMACPP / "llama.cpp" / "build" / "bin" / "llama-quantize"
IMATRIX = LLAMACPP / "llama.cpp" / "build" / "bin" / "llama-imatrix"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "tools"


BENCH = Path(__file__).resolve().parent


def real_model(name: str) -> Path:
    """real-models.sh's checkpoint `name`, or exit saying how to make it."""
    src = REAL / "hf" / name
    if not src.is_dir():
        sys.exit(f"missing {src}: run ../shared/tools/real-models.sh first")
    return src


def leave_bench_dir() -> None:
    """Before a reference tool is imported: this directory's scripts (kernels.py, awq.py, ...)
    shadow packages of the same names (Hugging Face's `kernels`, AutoAWQ's `awq`), so the
    directory leaves the path and any script imported under such a name is forgotten."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
    for f in BENCH.glob("*.py"):
        m = sys.modules.get(f.stem)
        if m is not None and Path(getattr(m, "__file__", None) or "/").resolve().parent == BENCH:
            del sys.modules[f.stem]


def need_reference() -> None:
    missing = [p for p in (CONVERT, CONVERT_PY, QUANTIZE, REAL / "hf") if not p.exists()]
    if missing:
        sys.exit(f"missing {missing[0]}: run {SHARED}/real-models.sh and {SHARED}/llama-cpp-tools.sh first")


def tool_venv(root: Path, steps: tuple[list[str], ...], remove: tuple[str, ...] = ()) -> Path:
    """The interpreter of a reference tool's own venv at `root`, built again whenever `steps`
    (pip install arguments, in order) or `remove` (packages uninstalled after) change: a stamp
    in the venv holds them."""
    py = root / "bin" / "python"
    done = root / ".installed"
    stamp = repr((steps, remove))
    if not done.exists() or done.read_text() != stamp:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)], check=True)
        for args in steps:
            subprocess.run([str(py), "-m", "pip", "install", "-q", *args], check=True)
        if remove:
            subprocess.run([str(py), "-m", "pip", "uninstall", "-q", "-y", *remove], check=True)
        done.write_text(stamp)
    return py


def measure(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of `cmd`, run in `cwd` (default: here); raises if it fails."""
    import tempfile

    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty tool would block on a full pipe
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=cwd)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed: {log.read().decode(errors='replace')[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def qconvert_cmd() -> list[str]:
    return [sys.executable, "-m", "qconvert"]


def reference_convert_cmd(model: Path, outtype: str, out: Path) -> list[str]:
    return [str(CONVERT_PY), str(CONVERT), str(model), "--outtype", outtype, "--outfile", str(out)]


def calibration_tokens(src: Path, samples: int, seq_len: int, out: Path) -> None:
    """qconvert's default calibration samples for `src` (seed 0), saved for a reference tool."""
    import numpy as np

    from qconvert.calibrate import text
    from qconvert.model import open_model

    model = open_model(str(src))
    try:
        np.save(out, text.samples(src, None, samples, seq_len, 0, model.bos).tokens)
    finally:
        model.close()


def evaluate(path: Path, src: Path, chunks: int) -> dict:
    """`qconvert eval --json` of a checkpoint on northangerabbey.txt against the float model."""
    import json

    cmd = qconvert_cmd() + ["eval", str(path), "--text", str(REAL / "text" / "northangerabbey.txt"), "--base", str(src),
                            "--chunks", str(chunks), "--json"]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def compare_checkpoints(title: str, rows: dict[str, tuple[Path, tuple[float, int]]], src: Path, chunks: int,
                        pairs: list[tuple[str, str]] | None = None) -> None:
    """Print the measured (wall, peak RSS) of each tool first (scoring takes a while and may
    fail), then the table with each checkpoint's size and scores; ratios are ours / the
    reference's for each (ours, reference) pair of row names, by default the first row / second."""
    pairs = [tuple(rows)[:2]] if pairs is None else pairs
    print("wall time and peak RSS: " + ", ".join(f"{name} {wall:.1f} s {rss / 1e6:.0f} MB"
                                                  for name, (_, (wall, rss)) in rows.items()), flush=True)
    print(title)
    w = max(18, *map(len, rows))
    print(f"{'tool':{w}s} {'s':>8s} {'peak MB':>8s} {'MB on disk':>10s} {'PPL':>9s} {'KLD':>9s} {'top-1':>7s}")
    base = None
    for name, (path, (wall, rss)) in rows.items():
        r = evaluate(path, src, chunks)
        base = r["base_perplexity"]
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        print(f"{name:{w}s} {wall:8.1f} {rss / 1e6:8.0f} {size / 1e6:10.1f} {r['perplexity']:9.3f} "
              f"{r['kl_divergence']:9.5f} {r['top1_agreement']:7.3f}", flush=True)
    print(f"float model perplexity {base:.3f}")
    for a, b in pairs:
        (_, ours), (_, ref) = rows[a], rows[b]
        print(f"{a} / {b}: time ratio {ours[0] / ref[0]:.2f}x, memory ratio {ours[1] / ref[1]:.2f}x")
