"""AWQ: qconvert against llm-compressor 0.14 (the maintained AWQ) and AutoAWQ 0.2.9 (deprecated),
on the same model and calibration tokens.

usage: python bench/awq.py [--model qwen2.5-0.5b] [--samples 16] [--seq-len 512] [--chunks 16] [--depth]
                         [--keep DIR] [--reference llm-compressor|autoawq|both] [--group-size 128]
                         [--defaults-only]

llm-compressor runs its AWQ recipe as its documentation gives it (AWQModifier with its default
settings and mappings, W4A16_ASYM: 4-bit, group 128, zero points, lm_head left alone) in a venv of
its own (its transformers pin, 5.15-5.17, is not ours), on the CPU, float32. Its AWQ has no
clipping search, AutoAWQ's (and our default) has: defaults against defaults is qconvert's
default against llm-compressor's, like for like is `qconvert --no-clip` against llm-compressor's
(the same scale search, mappings, grid and zero-point quantizer). Its checkpoint is scored through
compressed-tensors' own fake quantization (the weights its kernels compute with), saved as a
float checkpoint for `qconvert eval`.

AutoAWQ: both quantize 4-bit GEMM with zero points, group size 128, on the same calibration token samples
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
from common import (calibration_tokens, compare_checkpoints, leave_bench_dir, measure, qconvert_cmd,  # noqa: E402
                    real_model, tool_venv)
from gptq import depth_check  # noqa: E402

AUTOAWQ_VENV = Path(os.environ.get("QCONVERT_AUTOAWQ", Path.home() / ".cache" / "qconvert-autoawq"))
LLMC_VENV = Path(os.environ.get("QCONVERT_LLMCOMPRESSOR", Path.home() / ".cache" / "qconvert-llmcompressor"))


def llmcompressor_python() -> Path:
    return tool_venv(LLMC_VENV, (["torch==2.13.0"], ["llmcompressor==0.14.0.1"]))


def run_llmcompressor(src: str, out: str, tokens: str, group: str) -> None:
    """In a child process (llm-compressor's venv): its AWQ recipe on the given token samples,
    then every quantized Linear's weight replaced by compressed-tensors' fake quantization of it
    (what its kernels compute with) and saved as a plain float checkpoint."""
    leave_bench_dir()
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    # llm-compressor 0.14 pins its cached activations before each AWQ grid search, for faster
    # host-to-GPU copies; without an accelerator torch refuses to pin ("Cannot access accelerator
    # device"), so every CPU run fails there. Pinning changes no value: it is made a no-op.
    from llmcompressor.pipelines.cache import IntermediatesCache
    IntermediatesCache.pin_memory = lambda self, *a, **k: None
    ids = np.load(tokens)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    scheme = "W4A16_ASYM"
    quant = QuantizationModifier(ignore=["lm_head"], scheme=scheme, targets=["Linear"])
    if int(group) != 128:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        quant = QuantizationModifier(ignore=["lm_head"], config_groups={"group_0": QuantizationScheme(
            targets=["Linear"], weights=QuantizationArgs(num_bits=4, type="int", symmetric=False,
                                                         strategy="group", group_size=int(group)))})
    data = Dataset.from_dict({"input_ids": [r.tolist() for r in ids], "attention_mask": [[1] * ids.shape[1]] * len(ids)})
    oneshot(model=model, dataset=data, recipe=[AWQModifier(), quant], max_seq_length=ids.shape[1],
            num_calibration_samples=len(ids))
    names = set()
    for name, m in model.named_modules():
        scheme_ = getattr(m, "quantization_scheme", None)
        if scheme_ is not None and scheme_.weights is not None and hasattr(m, "weight_scale"):
            zp = getattr(m, "weight_zero_point", None)
            with torch.no_grad():
                m.weight.data = fake_quantize(m.weight.data, m.weight_scale, zp, scheme_.weights)
            names.add(name)
    keep = json.loads((Path(src) / "config.json").read_text())
    from safetensors import safe_open
    with safe_open(str(Path(src) / "model.safetensors"), "pt") as f:
        wanted = set(f.keys())
    state = {k: v.detach().contiguous().float() for k, v in model.state_dict().items() if k in wanted}
    Path(out).mkdir()
    save_file(state, str(Path(out) / "model.safetensors"), metadata={"format": "pt"})
    (Path(out) / "config.json").write_text(json.dumps(keep, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (Path(src) / f).is_file():
            shutil.copy(Path(src) / f, Path(out) / f)
    (Path(out) / "quantized_linears.json").write_text(json.dumps(sorted(names)))
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
    leave_bench_dir()  # this script is named awq.py too
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
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--reference", choices=("llm-compressor", "autoawq", "both"), default="llm-compressor")
    ap.add_argument("--depth", action="store_true")
    ap.add_argument("--defaults-only", action="store_true", help="skip the like-for-like `--no-clip` run")
    ap.add_argument("--keep", type=Path, help="copy the checkpoints into this directory before it ends")
    ap.add_argument("--run-autoawq", nargs=3, metavar=("SRC", "OUT", "TOKENS"), help=argparse.SUPPRESS)
    ap.add_argument("--run-llmcompressor", nargs=4, metavar=("SRC", "OUT", "TOKENS", "GROUP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_autoawq:
        return run_autoawq(*args.run_autoawq)
    if args.run_llmcompressor:
        return run_llmcompressor(*args.run_llmcompressor)
    src = real_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokens = tmp / "tokens.npy"
        calibration_tokens(src, args.samples, args.seq_len, tokens)
        ours = tmp / "qconvert-awq"
        t_ours = measure(qconvert_cmd() + [str(src), "--to", "awq", "-o", str(ours), "-q", "-j", "2",
                                           "--group-size", str(args.group_size),
                                           "--calib-samples", str(args.samples), "--calib-seq-len", str(args.seq_len)])
        rows = {"qconvert (defaults)": (ours, t_ours)}
        pairs = []
        env = dict(os.environ, OMP_NUM_THREADS="2")
        if args.reference in ("llm-compressor", "both"):
            theirs = tmp / "llmcompressor-awq"
            rows["llm-compressor 0.14 (defaults)"] = (theirs, measure(
                [str(llmcompressor_python()), str(Path(__file__).resolve()), "--run-llmcompressor", str(src),
                 str(theirs), str(tokens), str(args.group_size)], env=env, cwd=tmp))
            pairs.append(("qconvert (defaults)", "llm-compressor 0.14 (defaults)"))
            if not args.defaults_only:
                plain = tmp / "qconvert-awq-no-clip"
                rows["qconvert --no-clip"] = (plain, measure(
                    qconvert_cmd() + [str(src), "--to", "awq", "-o", str(plain), "-q", "-j", "2", "--no-clip",
                                      "--group-size", str(args.group_size), "--calib-samples", str(args.samples),
                                      "--calib-seq-len", str(args.seq_len)]))
                pairs.append(("qconvert --no-clip", "llm-compressor 0.14 (defaults)"))
        if args.reference in ("autoawq", "both"):
            theirs = tmp / "autoawq-awq"
            view = transformers4_view(src, tmp / "model-for-transformers4")
            rows["AutoAWQ 0.2.9"] = (theirs, measure([str(autoawq_python()), str(Path(__file__).resolve()),
                                                      "--run-autoawq", str(view), str(theirs), str(tokens)],
                                                     env=env, cwd=tmp))
            pairs.append(("qconvert (defaults)", "AutoAWQ 0.2.9"))
        if args.keep:
            for d, _ in rows.values():
                shutil.copytree(d, args.keep / d.name, dirs_exist_ok=True)
        compare_checkpoints(f"{args.model}: AWQ 4-bit group {args.group_size} zero points, {args.samples} x "
                            f"{args.seq_len} calibration tokens, 2 threads; scored on northangerabbey.txt, "
                            f"{args.chunks} x 512 tokens", rows, src, args.chunks, pairs)
        if args.depth:
            depth_check(tmp, "awq")


if __name__ == "__main__":
    main()
