"""qconvert: Hugging Face causal-LM checkpoints to quantized GGUF, GPTQ and AWQ files."""

__version__ = "0.1.0"
