"""Every `--to` name, one row each: what it writes, and what it needs from calibration.

`--to`'s help, the top-level help and the README's target table are read from these rows.
GGUF rows come from the recipes (quant/recipes.py); checkpoint rows are the safetensors
directories quantized one decoder layer at a time (layerwise.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from qconvert.quant.recipes import RECIPES


@dataclass(frozen=True)
class Target:
    name: str  # what --to takes
    kind: str  # "gguf": a .gguf file for llama.cpp; "checkpoint": a safetensors directory
    summary: str
    calibration: str  # "": none; "default": by default, --no-calib turns it off; "always": the method needs it
    loaders: str  # the programs that run what it writes


GGUF_LOADERS = "llama.cpp and everything built on it"


def _gguf_rows() -> list[Target]:
    rows = []
    for r in RECIPES.values():
        calib = "default" if r.quantizes_like_llama_quantize else ""
        rows.append(Target(r.name, "gguf", r.summary, calib, GGUF_LOADERS))
    return rows


TARGETS: dict[str, Target] = {t.name: t for t in sorted([
    *_gguf_rows(),
    Target("awq", "checkpoint", "AWQ 4-bit GEMM, zero points, group 128", "always",
           "transformers, GPTQModel, vLLM"),
    Target("gptq", "checkpoint", "GPTQ 4-bit (2, 8), group 128, symmetric", "always",
           "transformers, GPTQModel, vLLM"),
], key=lambda t: (t.kind != "gguf", t.name))}


def names(kind: str | None = None) -> list[str]:
    return [t.name for t in TARGETS.values() if kind is None or t.kind == kind]


def help_line() -> str:
    """`--to`'s help: every target, grouped by kind."""
    return (f"Target(s), comma-separated. GGUF files: {', '.join(names('gguf'))}; several GGUF targets read "
            f"the checkpoint once. Safetensors checkpoints (calibrated, one per command): "
            f"{', '.join(names('checkpoint'))}.")


def summary() -> str:
    """What qconvert writes, for the top-level help."""
    return (f"GGUF files for llama.cpp ({', '.join(names('gguf'))}) and safetensors checkpoints for "
            f"transformers, GPTQModel and vLLM ({', '.join(names('checkpoint'))})")


_CALIBRATION = {"": "none", "default": "importance matrix, by default (`--no-calib`, `--imatrix FILE`)",
                "always": "always (the method needs it)"}


def markdown_table() -> str:
    """The README's table of targets (tests/test_targets.py keeps the README equal to it)."""
    lines = ["| `--to` | writes | what | calibration | runs in |", "|---|---|---|---|---|"]
    for t in TARGETS.values():
        what = "a `.gguf` file" if t.kind == "gguf" else "a safetensors directory"
        lines.append(f"| `{t.name}` | {what} | {t.summary} | {_CALIBRATION[t.calibration]} | {t.loaders} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
