"""One module per model family (llama.py, qwen2.py, ...): its tensor table and transforms in both
directions, GGUF metadata, forward and AWQ groups; base.py what they share, layers.py the torch
pieces their forwards are built from, generic.py the forward from transformers' own modules.
qconvert/families.py is the table of them."""
