"""FP8: qconvert against llm-compressor 0.14 (QuantizationModifier with the FP8_DYNAMIC or
FP8_BLOCK preset, `ignore=["lm_head"]`, data-free oneshot, `save_pretrained(save_compressed=True)`,
as its FP8 examples do) on the same checkpoint, in its own venv (bench/awq.py builds it; its
transformers pin is not ours), on the CPU, the model loaded in its own dtype.

usage: python bench/fp8.py [--model qwen2.5-0.5b] [--scheme fp8|fp8-block] [--chunks 16] [--keep DIR]

Prints wall time and peak RSS of both, whether every tensor of the two checkpoints has the same
name, dtype, shape and bytes (and the first that differ if not), whether the two
quantization_configs agree (but for the version and qconvert's meta), and perplexity / KL
divergence / top-1 of our checkpoint on northangerabbey.txt against the float model (scored by
`qconvert eval`; llm-compressor's too when the bytes differ).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from awq import llmcompressor_python  # noqa: E402
from common import compare_checkpoints, leave_bench_dir, measure, qconvert_cmd, real_model  # noqa: E402


def run_llmcompressor(src: str, out: str, scheme: str) -> None:
    """In a child process (llm-compressor's venv): its FP8 recipe, saved compressed."""
    leave_bench_dir()
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]))
    model.save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)


def tensors_of(d: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, raw bytes) of every tensor of a safetensors directory."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__", None)
        for name, e in header.items():
            b, end = e["data_offsets"]
            out[name] = (e["dtype"], e["shape"], raw[8 + n + b:8 + n + end])
    return out


def compare_bytes(ours: Path, theirs: Path) -> bool:
    a, b = tensors_of(ours), tensors_of(theirs)
    if set(a) != set(b):
        print(f"tensor names differ: only ours {sorted(set(a) - set(b))[:5]}, only theirs {sorted(set(b) - set(a))[:5]}")
    common = sorted(set(a) & set(b))
    differ = [n for n in common if a[n] != b[n]]
    print(f"{len(common) - len(differ)} of {len(common)} common tensors identical (name, dtype, shape, bytes)")
    for n in differ[:5]:
        (da, sa, ba), (db, sb, bb) = a[n], b[n]
        same = sum(x == y for x, y in zip(ba, bb)) if len(ba) == len(bb) else 0
        print(f"  {n}: ours {da} {sa}, theirs {db} {sb}; {same} of {len(ba)} bytes equal")
    leave_bench_dir()  # compressed-tensors imports transformers, which imports `kernels`
    from compressed_tensors.quantization import QuantizationConfig

    qa = json.loads((ours / "config.json").read_text())["quantization_config"]
    qb = json.loads((theirs / "config.json").read_text())["quantization_config"]
    # as compressed-tensors reads them (its versions serialise defaults differently), but for the
    # observer llm-compressor records (how it computed the scales at calibration; no loader reads it)
    ca, cb = (QuantizationConfig.model_validate(q).to_dict() for q in (qa, qb))
    for c in (ca, cb):
        for g in c["config_groups"].values():
            for args in (g.get("weights"), g.get("input_activations")):
                if args:
                    args.pop("observer", None)
    same_cfg = ca == cb
    print(f"quantization_config {'the same' if same_cfg else 'differs'} as compressed-tensors reads them "
          "(but for the observer llm-compressor records)")
    if not same_cfg:
        print(f"  ours   {json.dumps(ca, sort_keys=True)}")
        print(f"  theirs {json.dumps(cb, sort_keys=True)}")
    return set(a) == set(b) and not differ and same_cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--scheme", choices=("fp8", "fp8-block"), default="fp8")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--keep", type=Path)
    ap.add_argument("--run-llmcompressor", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_llmcompressor:
        return run_llmcompressor(*args.run_llmcompressor)
    src = real_model(args.model)
    preset = {"fp8": "FP8_DYNAMIC", "fp8-block": "FP8_BLOCK"}[args.scheme]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours, theirs = tmp / "qconvert", tmp / "llmcompressor"
        rows = {f"qconvert --to {args.scheme}": (ours, measure(qconvert_cmd() + [
            str(src), "--to", args.scheme, "-o", str(ours), "-q", "-j", "2"]))}
        env = dict(os.environ, OMP_NUM_THREADS="2")
        t_theirs = measure([str(llmcompressor_python()), str(Path(__file__).resolve()), "--run-llmcompressor",
                            str(src), str(theirs), preset], env=env, cwd=tmp)
        identical = compare_bytes(ours, theirs)
        if not identical:
            rows[f"llm-compressor 0.14 ({preset})"] = (theirs, t_theirs)
        else:
            print(f"llm-compressor 0.14 ({preset}): {t_theirs[0]:.1f} s, {t_theirs[1] / 1e6:.0f} MB, the same bytes")
        if args.keep:
            for d in (ours, theirs):
                shutil.copytree(d, args.keep / d.name, dirs_exist_ok=True)
        compare_checkpoints(f"{args.model}: {args.scheme} ({preset}); scored on northangerabbey.txt, {args.chunks} x "
                            "512 tokens", rows, src, args.chunks, pairs=[] if identical else None)
        w, r = rows[f"qconvert --to {args.scheme}"][1]
        print(f"qconvert / llm-compressor: time ratio {w / t_theirs[0]:.2f}x, memory ratio {r / t_theirs[1]:.2f}x")


if __name__ == "__main__":
    main()
