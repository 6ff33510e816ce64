"""qconvert: Hugging Face causal-LM checkpoints to quantized GGUF, GPTQ and AWQ files."""

import os

__version__ = "0.1.0"

# MKL's float32 products take code paths that depend on the operands' memory alignment, so the
# same product can round differently in two processes (measured on an AVX2 AMD EPYC: the
# calibration statistics of --workers 2 differed from one process's in the last bits). Its
# conditional numerical reproducibility mode fixes the path; set before torch loads MKL, and
# inherited by the worker processes.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
