"""Whole-file parity of qconvert's mixture-of-experts GGUF files with llama.cpp's
convert_hf_to_gguf.py: tiny random Qwen3-MoE, Mixtral, Qwen2-MoE and OLMoE checkpoints (transformers' own configs,
bf16, saved as transformers saves them) that carry a real tokenizer the converter knows (Qwen2.5's
for the Qwens and OLMoE, SmolLM2's for Mixtral; from ../shared/tools/real-models.sh), converted by both to f32, f16, bf16 and
q8_0; every tensor (name, type, shape, bytes) and every key/value compared (bench/parity.py's
compare). Then the importance matrices both ways, at 8 experts per layer: llama-imatrix's matrix
of the converter's f32 file, given to `qconvert --imatrix` and to llama-quantize, and qconvert's
own (`qconvert imatrix`), given to both again: q4_k_m and iq3_m files whole-file identical.

usage: python bench/parity_moe.py
"""
from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# transformers imports the `kernels` package, which bench/kernels.py would shadow: import its
# modules before bench/ is on the path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
import transformers  # noqa: E402
import transformers.activations  # noqa: E402,F401

sys.path.insert(0, str(ROOT / "bench"))
from common import IMATRIX, QUANTIZE, REAL, need_reference, qconvert_cmd, reference_convert_cmd  # noqa: E402
from parity import compare  # noqa: E402


def build(family: str, out: Path) -> Path:
    import torch

    tok = REAL / "hf" / ("smollm2-135m" if family == "mixtral" else "qwen2.5-0.5b")
    out.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, out / f)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=4096, num_experts_per_tok=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    if family == "olmoe":  # as many kv heads as heads: llama.cpp loads OLMoE's k norm as [hidden]
        cfg = transformers.OlmoeConfig(vocab_size=151936, intermediate_size=32, num_experts=8,
                                       **{**common, "num_key_value_heads": 4})
        model = transformers.OlmoeForCausalLM(cfg)
    elif family == "qwen2moe":
        cfg = transformers.Qwen2MoeConfig(vocab_size=151936, intermediate_size=128, moe_intermediate_size=32,
                                          shared_expert_intermediate_size=64, num_experts=8, **common)
        model = transformers.Qwen2MoeForCausalLM(cfg)
    elif family == "qwen3moe":
        cfg = transformers.Qwen3MoeConfig(vocab_size=151936, intermediate_size=128, moe_intermediate_size=32,
                                          num_experts=8, head_dim=16, norm_topk_prob=True, **common)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        cfg = transformers.MixtralConfig(vocab_size=49152, intermediate_size=32, num_local_experts=8, **common)
        model = transformers.MixtralForCausalLM(cfg)
    model.to(torch.bfloat16).save_pretrained(out)
    return out


def main() -> int:
    need_reference()
    from tests.helpers import convert_to

    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for family in ("qwen3moe", "mixtral", "qwen2moe", "olmoe"):
            src = build(family, tmp / family)
            for outtype in ("f32", "f16", "bf16", "q8_0"):
                ref = tmp / f"{family}-ref-{outtype}.gguf"
                subprocess.run(reference_convert_cmd(src, outtype, ref), check=True, capture_output=True)
                ours = convert_to(src, outtype, tmp / f"{family}-ours-{outtype}.gguf").outputs[0]["path"]
                problems = compare(ours, ref)
                bad += bool(problems)
                print(f"{family:9s} {outtype:5s} {'identical, tensor for tensor and key for key' if not problems else problems[:5]}")
            bad += imatrices(src, tmp / f"{family}-ref-f32.gguf", tmp / family)
    return 1 if bad else 0


def imatrices(src: Path, f32: Path, tmp: Path) -> int:
    """llama-imatrix's matrix and ours, each given to llama-quantize and to qconvert: the same files."""
    calib = ROOT / "qconvert" / "calibrate" / "data" / "emma.txt"
    theirs, ours = tmp / "llama.imatrix.gguf", tmp / "ours.imatrix.gguf"
    subprocess.run([str(IMATRIX), "-m", str(f32), "-f", str(calib), "-o", str(theirs), "-c", "128", "--chunks", "8",
                    "-t", "2"], check=True, capture_output=True)
    subprocess.run(qconvert_cmd() + ["imatrix", str(src), "-o", str(ours), "-q", "--calib-samples", "8",
                                     "--calib-seq-len", "128"], check=True, capture_output=True)
    bad = 0
    for im in (theirs, ours):
        for recipe in ("q4_k_m", "iq3_m"):
            ref, mine = tmp / f"ref-{im.stem}-{recipe}.gguf", tmp / f"ours-{im.stem}-{recipe}.gguf"
            subprocess.run([str(QUANTIZE), "--imatrix", str(im), str(f32), str(ref), recipe.upper(), "2"], check=True,
                           capture_output=True)
            subprocess.run(qconvert_cmd() + [str(src), "--to", recipe, "-o", str(mine), "-q", "--imatrix", str(im)],
                           check=True, capture_output=True)
            same = filecmp.cmp(ref, mine, shallow=False)
            bad += not same
            who = "llama-imatrix's" if im == theirs else "qconvert's"
            print(f"{src.name:9s} {recipe:6s} from {who} importance matrix: whole file "
                  f"{'identical to llama-quantize' if same else 'DIFFERS'}")
    return bad


if __name__ == "__main__":
    sys.exit(main())
