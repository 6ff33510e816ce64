"""`qconvert batch` against the same jobs run one after another as single commands.

Eight jobs, tiny to small (SmolLM2-135M from real-models.sh, a random model at Qwen2.5-0.5B's
widths with 4 layers, tests/models.py's tiny Llama, Gemma 3 and Phi-3), several targets each. Three runs of the same jobs, each
into its own directory:

  serial   each job as `qconvert convert ...` in turn, all cores to each (what a shell script does)
  batch    `qconvert batch JOBS` on this machine (jobs side by side as cores and memory allow)
  ray      `qconvert batch JOBS --ray local` (a Ray cluster of this machine, started by the batch)

Printed: wall time of each and its ratio to serial, each job's peak RSS against the batch's
estimate of it, and whether the three runs wrote the same bytes.

usage: python bench/batch.py [--no-ray] [--calib-samples 32]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import leave_bench_dir, qconvert_cmd, real_model  # noqa: E402

TINY = ["llama-wide", "gemma3", "phi3"]  # tests/models.py's random models


def make_models(root: Path) -> dict[str, Path]:
    """SmolLM2-135M; Qwen2.5-0.5B's widths at 4 layers, random; three tiny random families."""
    from gptq import MAKE_MODEL

    leave_bench_dir()  # bench/kernels.py would shadow the `kernels` package transformers imports
    from tests.models import build

    out = {"smollm2": real_model("smollm2-135m")}
    qwen = real_model("qwen2.5-0.5b")
    out["qwen2"] = root / "qwen2-4layers"
    subprocess.run([sys.executable, "-c", MAKE_MODEL, str(qwen), str(out["qwen2"]), "4"], check=True,
                   capture_output=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out["qwen2"] / f).write_bytes((qwen / f).read_bytes())
    for family in TINY:
        out[family.split("-")[0]] = build(family, root / family)
    return out


def jobs(models: dict[str, Path], out: Path, calib: dict) -> list[dict]:
    g32 = {**calib, "group-size": 32}
    return [
        {"source": str(models["smollm2"]), "to": "q8_0,q4_k_m,iq4_xs", "output": str(out / "smollm2-gguf"),
         "options": calib},
        {"source": str(models["smollm2"]), "to": "gptq", "output": str(out / "smollm2-gptq"),
         "options": {**calib, "group-size": 64}},
        {"source": str(models["smollm2"]), "to": "nf4,fp8", "output": str(out / "smollm2-nf4-fp8")},
        {"source": str(models["llama"]), "to": "q8_0,q4_k_m,q6_k", "output": str(out / "llama"), "options": calib},
        {"source": str(models["qwen2"]), "to": "awq", "output": str(out / "qwen2-awq"), "options": g32},
        {"source": str(models["qwen2"]), "to": "f16,q5_k_m", "output": str(out / "qwen2-gguf"),
         "options": calib},
        {"source": str(models["gemma3"]), "to": "gptq,hqq", "output": str(out / "gemma3"), "options": g32},
        {"source": str(models["phi3"]), "to": "q8_0,int8,quanto-int4", "output": str(out / "phi3")},
    ]


def argv(job: dict) -> list[str]:
    args = ["convert", job["source"], "--to", job["to"], "-o", job["output"], "--json"]
    for k, v in (job.get("options") or {}).items():
        args += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return args


def digest(path: Path) -> dict[str, str]:
    import hashlib

    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return {str(f.relative_to(path.parent)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray run")
    ap.add_argument("--calib-samples", type=int, default=32)
    a = ap.parse_args()
    calib = {"calib-samples": a.calib_samples}
    with tempfile.TemporaryDirectory(prefix="qconvert-bench-batch-") as tmp:
        root = Path(tmp)
        models = make_models(root / "models")
        runs = {}
        # serial: one command after another, as a shell loop runs them
        js = jobs(models, root / "serial", calib)
        t = time.perf_counter()
        serial = []
        for j in js:
            r = subprocess.run([*qconvert_cmd(), *argv(j)], capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{j}: {r.stderr[-2000:]}")
            serial.append(json.loads(r.stdout))
        runs["serial"] = (time.perf_counter() - t, [x["peak_rss_bytes"] for x in serial], [None] * len(js))
        kinds = [("batch", [])] + ([] if a.no_ray else [("ray", ["--ray", "local"])])
        for name, extra in kinds:
            js = jobs(models, root / name, calib)
            path = root / f"{name}.jsonl"
            path.write_text("".join(json.dumps(j) + "\n" for j in js))
            t = time.perf_counter()
            r = subprocess.run([*qconvert_cmd(), "batch", str(path), "--json", *extra], capture_output=True, text=True)
            wall = time.perf_counter() - t
            if r.returncode:
                sys.exit(f"{name}: {r.stderr[-3000:]}")
            rep = json.loads(r.stdout)
            runs[name] = (wall, [j["peak_rss_bytes"] for j in rep["jobs"]], [j["estimate_bytes"] for j in rep["jobs"]])
        same = {name: all(digest(root / name / Path(j["output"]).name) == digest(root / "serial" / Path(j["output"]).name)
                          for j in jobs(models, root / name, calib)) for name in runs if name != "serial"}
    base = runs["serial"][0]
    print(f"{len(js)} jobs, {sum(len(j['to'].split(',')) for j in js)} outputs; calibration {a.calib_samples} x 512")
    print("| run | wall s | vs serial | largest job peak MB | same bytes as serial |")
    print("|---|---|---|---|---|")
    for name, (wall, peaks, _) in runs.items():
        print(f"| {name} | {wall:.1f} | {wall / base:.2f}x | {max(peaks) / 1e6:.0f} | "
              f"{'-' if name == 'serial' else same[name]} |")
    print("\nper job: peak RSS (batch run) against the batch's estimate, MB")
    wall, peaks, estimates = runs["batch"]
    for j, p, e in zip(jobs(models, Path("."), calib), peaks, estimates):
        print(f"  {Path(j['output']).name:18s} {j['to']:26s} peak {p / 1e6:7.0f}  estimate {e / 1e6:7.0f}  "
              f"({e / p:.2f}x)")


if __name__ == "__main__":
    main()
