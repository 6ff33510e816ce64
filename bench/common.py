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


def need_reference() -> None:
    missing = [p for p in (CONVERT, CONVERT_PY, QUANTIZE, REAL / "hf") if not p.exists()]
    if missing:
        sys.exit(f"missing {missing[0]}: run {SHARED}/real-models.sh and {SHARED}/llama-cpp-tools.sh first")


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of `cmd`; raises if it fails."""
    import tempfile

    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty tool would block on a full pipe
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
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
