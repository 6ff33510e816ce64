"""Regenerate qconvert/arch/bpe_pre.tsv from llama.cpp's convert_hf_to_gguf.py.

usage: python formats/gguf/bpe_pre_table.py LLAMA_CPP_DIR > qconvert/arch/bpe_pre.tsv
LLAMA_CPP_DIR is the llama.cpp vendored in the llama-cpp-python 0.3.36 sdist
(`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`). The table is facts
(hash of the token ids of a fixed check text -> the pre-tokenizer name llama.cpp expects), in the
order the script tests them: when a hash repeats, the later row wins, as it does there.
"""
import re
import sys
from pathlib import Path

root = Path(sys.argv[1])
src = (root / "conversion" / "base.py").read_text(encoding="utf-8")
body = src[src.index("# Marker: Start get_vocab_base_pre"):src.index("# Marker: End get_vocab_base_pre")]
print("# sha256 of str(token ids) of the check text -> tokenizer.ggml.pre, and the model it was taken from.")
print("# From llama.cpp's convert_hf_to_gguf.py (get_vocab_base_pre), as vendored in llama-cpp-python 0.3.36;")
print("# made by formats/gguf/bpe_pre_table.py. A repeated hash: the later row wins.")
pattern = r'if chkhsh == "([0-9a-f]{64})":\s*\n((?:\s*#[^\n]*\n)*)\s*res = "([^"]+)"'
for m in re.finditer(pattern, body):
    h, comments, name = m.groups()
    ref = re.search(r"ref:\s*(\S+)", comments)
    print("\t".join((h, name, ref.group(1).replace("https://huggingface.co/", "") if ref else "")))
