"""AWQ: qconvert against AutoAWQ 0.2.9 on the same model, calibration tokens and group size.

usage: python bench/awq.py [--model qwen2.5-0.5b] [--samples 16] [--seq-len 512] [--chunks 16] [--depth]
                         [--keep DIR]

Both quantize 4-bit GEMM with zero points, group size 128, on the same calibration token samples
(qconvert's default text, seeded selection), 2 threads. AutoAWQ 0.2.9 runs on the CPU in a
child process in float32, in a venv of its own with the transformers it was written for
(AUTOAWQ_VENV, built from the package registry on first use; its quantizer also runs under
transformers 5, which it was not written for). AutoAWQ's scale search has a bug that shows only
on a CPU (see patch_autoawq_on_cpu); the child fixes that one line, as a GPU run would have it.
It reads the model through a copy of its config.json in transformers 4's terms (see
transformers4_view): transformers 4.51 ignores transformers 5's `rope_parameters` and would
calibrate Qwen2.5 with rope theta 10000, not its 1e6.
Prints wall time, peak RSS, and perplexity / KL divergence / top-1 on northangerabbey.txt, both
checkpoints scored by `qconvert eval` (the same forward for both). --depth: peak memory against
depth, as bench/gptq.py.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REAL, calibration_tokens, compare_checkpoints, measure, qconvert_cmd, tool_venv  # noqa: E402
from gptq import depth_check  # noqa: E402

AUTOAWQ_VENV = Path(os.environ.get("QCONVERT_AUTOAWQ", Path.home() / ".cache" / "qconvert-autoawq"))
# AutoAWQ 0.2.9 asks for transformers>=4.45 and runs with 4.51.3 here
AUTOAWQ_DEPS = ["transformers==4.51.3", "accelerate", "datasets", "zstandard", "numpy", "safetensors"]


def autoawq_python() -> Path:
    """AUTOAWQ_VENV's interpreter (torch first: a bare torch pulls CUDA)."""
    return tool_venv(AUTOAWQ_VENV, (["torch==2.13.0"], AUTOAWQ_DEPS, ["--no-deps", "autoawq==0.2.9"]))


def patch_autoawq_on_cpu() -> None:
    """AutoAWQ 0.2.9's scale search keeps the block's weights as `{k: v.cpu() for k, v in
    state_dict().items()}` to restore them after each ratio, then scales the weights in place
    (`fc.weight.mul_(s)`). On a GPU .cpu() is a copy; on a CPU it is the same tensor, so the
    "restore" keeps every ratio's scaling and the weights end multiplied by all 20 (SmolLM2-135M
    quantized so: KL divergence 8 from the float model, its own forward, transformers 4.51 or 5).
    The one change here: the snapshot is a copy, as it is on the GPU AutoAWQ was written for."""
    from awq.quantize.quantizer import AwqQuantizer

    search = AwqQuantizer._compute_best_scale

    def compute_best_scale(self, x, w_mean, x_mean, module2inspect, *args, **kwargs):
        state_dict = module2inspect.state_dict
        module2inspect.state_dict = lambda *a, **k: {n: v.clone() for n, v in state_dict(*a, **k).items()}
        try:
            return search(self, x, w_mean, x_mean, module2inspect, *args, **kwargs)
        finally:
            del module2inspect.state_dict

    AwqQuantizer._compute_best_scale = compute_best_scale


def transformers4_view(src: Path, dst: Path) -> Path:
    """`dst`: src's files linked, with a config.json that transformers 4 reads as transformers 5
    reads src's. Transformers 5 writes rope settings as `rope_parameters`; transformers 4 reads
    only `rope_theta` / `rope_scaling` and takes its default theta (10000) without them."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f.resolve())
    cfg = json.loads((src / "config.json").read_text())
    rope = dict(cfg.get("rope_parameters") or {})
    if "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = rope
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def run_autoawq(src: str, out: str, tokens: str) -> None:
    """In a child process: AutoAWQ's own quantize + save on the given token samples, in float32
    (its default dtype here, the checkpoint's bfloat16, runs matrix products ~4x slower on a CPU)."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.modules.pop("awq", None)  # this script is named awq.py too
    import torch
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    patch_autoawq_on_cpu()
    ids = np.load(tokens)
    model = AutoAWQForCausalLM.from_pretrained(src, torch_dtype=torch.float32, device_map="cpu")
    cfg = json.loads((Path(src) / "config.json").read_text())
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    if theta is not None and getattr(model.config, "rope_theta", theta) != theta:  # calibrating another model
        sys.exit(f"{src}: AutoAWQ's transformers reads rope theta {model.config.rope_theta}, the config says {theta}")
    model.quantize(AutoTokenizer.from_pretrained(src),
                   quant_config={"zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "GEMM"},
                   calib_data=[row.tolist() for row in ids], max_calib_samples=len(ids),
                   max_calib_seq_len=ids.shape[1])
    model.save_quantized(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--depth", action="store_true")
    ap.add_argument("--keep", type=Path, help="copy both checkpoints into this directory before it ends")
    ap.add_argument("--run-autoawq", nargs=3, metavar=("SRC", "OUT", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_autoawq:
        return run_autoawq(*args.run_autoawq)
    src = REAL / "hf" / args.model
    if not src.is_dir():
        sys.exit(f"missing {src}: run ../shared/tools/real-models.sh first")
    ref_py = autoawq_python()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokens = tmp / "tokens.npy"
        calibration_tokens(src, args.samples, args.seq_len, tokens)
        ours, theirs = tmp / "qconvert-awq", tmp / "autoawq-awq"
        t_ours = measure(qconvert_cmd() + [str(src), "--to", "awq", "-o", str(ours), "-q", "-j", "2",
                                           "--calib-samples", str(args.samples), "--calib-seq-len", str(args.seq_len)])
        env = dict(os.environ, OMP_NUM_THREADS="2")
        view = transformers4_view(src, tmp / "model-for-transformers4")
        t_ref = measure([str(ref_py), str(Path(__file__).resolve()), "--run-autoawq", str(view), str(theirs),
                         str(tokens)], env=env, cwd=tmp)
        if args.keep:
            for d in (ours, theirs):
                shutil.copytree(d, args.keep / d.name, dirs_exist_ok=True)
        compare_checkpoints(f"{args.model}: AWQ 4-bit GEMM group 128, {args.samples} x {args.seq_len} calibration "
                            f"tokens, 2 threads; scored on northangerabbey.txt, {args.chunks} x 512 tokens",
                            {"qconvert": (ours, t_ours), "AutoAWQ 0.2.9": (theirs, t_ref)}, src, args.chunks)
        if args.depth:
            depth_check(tmp, "awq")


if __name__ == "__main__":
    main()
