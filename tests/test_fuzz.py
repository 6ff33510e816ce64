"""A seeded fuzz suite over every input qconvert reads (tests/fuzz_cases.py makes the cases):
every case exits 0, 2, 3 or 4 (never 1, the internal error), with one line on stderr and no
traceback; a failed run leaves no file behind (not even a .partial or an empty directory it
made); and whatever exits 0 loads: a GGUF file in llama.cpp, a checkpoint in our reader."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
MEMORY_LIMIT = 12 << 30  # a case that tries to allocate without bound fails instead of taking the machine


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    top = tmp_path_factory.mktemp("fuzz")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    log = top / "results.jsonl"
    r = subprocess.run([sys.executable, "-m", "tests.fuzz_cases", str(top / "inputs"), str(top / "cases"), str(log)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1200, preexec_fn=limit,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    assert r.returncode == 0, f"the fuzz run died after {len(lines)} cases: {r.stderr[-3000:]}"
    return lines


def test_enough_cases_of_every_kind(results):
    kinds = {r["name"].split("-")[0] for r in results}
    assert kinds == {"safetensors", "config", "index", "tokenizer", "gguf", "imatrix", "calib", "options", "eval"}
    assert len(results) > 300


def test_never_an_internal_error_and_always_one_line(results):
    bad = [f"{r['name']}: exit {r['code']}: {r['stderr'][-600:]}" for r in results
           if r["code"] not in (0, 2, 3, 4) or "Traceback" in r["stderr"]
           or (r["code"] != 0 and len([x for x in r["stderr"].splitlines() if x.strip()]) != 1)]
    assert not bad, "\n".join(bad)


def test_failures_leave_nothing_behind(results):
    bad = [f"{r['name']}: left {r['left'] + r['partial']}" for r in results
           if r["partial"] or (r["code"] != 0 and (r["left"] or r["out_exists"]))]
    assert not bad, "\n".join(bad)


def test_what_exits_zero_loads(results):
    """Every GGUF written with exit 0 loads in llama.cpp; every checkpoint in qconvert's reader."""
    from llama_cpp import Llama

    from qconvert.evaluate import open_model

    checked, bad = 0, []
    for r in results:
        if r["code"] != 0 or r["produces"] == "nothing":
            continue
        out = Path(r["out"])
        if r["produces"] == "gguf":
            for f in sorted(out.rglob("*.gguf")):
                if f.name.endswith(".imatrix.gguf"):
                    continue
                try:
                    Llama(str(f), n_ctx=32, verbose=False).close()
                except Exception as e:  # noqa: BLE001
                    bad.append(f"{r['name']}: {f.name} does not load in llama.cpp: {e}")
                checked += 1
        else:
            for cfg in sorted(out.rglob("config.json")):
                m = open_model(str(cfg.parent))
                import torch

                with torch.inference_mode():
                    if not torch.isfinite(m.forward().logits(torch.tensor([[1, 2, 3]]))).all():
                        bad.append(f"{r['name']}: {cfg.parent.name} gives non-finite logits")
                m.close()
                checked += 1
    assert not bad, "\n".join(bad)
    assert checked > 20
