"""Every `--to` name, one row each: what it writes, which options apply to it, what it needs
from calibration, and where its output goes.

`--to`'s help, the top-level help, the README's table of targets and the check that every
option given applies to a chosen target are all read from these rows. GGUF rows come from the
recipes (quant/recipes.py: the per-tensor types llama.cpp's tools choose); checkpoint rows are
safetensors directories quantized one decoder layer at a time (checkpoint.py, with their
layouts in layouts.py), calibrated (GPTQ, AWQ) or each linear from its weight alone (FP8).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from qconvert.errors import UsageError
from qconvert.quant.recipes import RECIPES, Recipe

# how calibration text becomes samples, and where they run
CALIBRATION = ("calib", "calib_samples", "calib_seq_len", "seed", "workers", "ray")
MIXTURE = ("no_calib", "imatrix", "exact_calib", "tensor_type", "output_tensor_type", "token_embedding_type",
           "pure", "method", "damp", "act_order", *CALIBRATION)  # llama-quantize's options, the importance
# matrix's and --method gptq's


@dataclass(frozen=True)
class Target:
    name: str  # what --to takes
    kind: str  # "gguf": a .gguf file for llama.cpp; "checkpoint": a safetensors directory
    summary: str
    calibration: str  # "": none; "default": by default, --no-calib turns it off; "always": the method needs it
    loaders: str  # the programs that run what it writes
    options: tuple[str, ...] = ()  # the command's options (parameter names) that apply to it
    recipe: Recipe | None = None  # GGUF: the per-tensor types
    label: str = ""  # what output names carry: MODEL-Q8_0.gguf, MODEL-GPTQ/


GGUF_LOADERS = "llama.cpp and everything built on it"


def _gguf(r: Recipe) -> Target:
    mixture = r.quantizes_like_llama_quantize
    return Target(r.name, "gguf", r.summary, "default" if mixture and r.takes_imatrix else "", GGUF_LOADERS,
                  MIXTURE if mixture else (), r, r.label)


TARGETS: dict[str, Target] = {t.name: t for t in sorted([
    *(_gguf(r) for r in RECIPES.values()),
    Target("awq", "checkpoint", "AWQ 4-bit GEMM, zero points, group 128", "always", "transformers, GPTQModel, vLLM",
           ("bits", "group_size", "clip", "max_shard_size", "fmt", "expert_min_tokens", *CALIBRATION), label="AWQ"),
    Target("fp8", "checkpoint", "FP8 E4M3 weights with per-channel scales, dynamic per-token FP8 activations "
           "(compressed-tensors float-quantized, llm-compressor's FP8_DYNAMIC)", "", "vLLM (GPUs), transformers",
           ("max_shard_size", "fmt"), label="FP8"),
    Target("fp8-block", "checkpoint", "FP8 E4M3 weights with 128 x 128 block scales, dynamic FP8 activations per "
           "group of 128 (compressed-tensors float-quantized, llm-compressor's FP8_BLOCK; `--format hf-fp8`: "
           "transformers' fp8 layout)", "", "vLLM (GPUs), transformers", ("max_shard_size", "fmt"), label="FP8-BLOCK"),
    Target("nf4", "checkpoint", "bitsandbytes 4-bit NormalFloat in blocks of 64, double quantization "
           "(QLoRA's format, the -bnb-4bit checkpoints)", "", "transformers with bitsandbytes (GPUs and CPUs)",
           ("group_size", "double_quant", "compute_dtype", "max_shard_size"), label="NF4"),
    Target("fp4", "checkpoint", "bitsandbytes 4-bit float (FP4) in blocks of 64, double quantization", "",
           "transformers with bitsandbytes (GPUs and CPUs)",
           ("group_size", "double_quant", "compute_dtype", "max_shard_size"), label="FP4"),
    Target("hqq", "checkpoint", "HQQ 4-bit (2, 3, 8) in groups of 64 with zero points, half-quadratic optimised, "
           "calibration-free (transformers' HqqConfig layout)", "", "transformers 4.x with hqq, hqq",
           ("bits", "group_size", "max_shard_size"), label="HQQ"),
    Target("quanto-int4", "checkpoint", "optimum-quanto qint4: 4-bit weights with a scale and shift per group of 128 "
           "inputs (quanto's rule for narrower layers)", "", "optimum-quanto (QuantizedModelForCausalLM)",
           ("max_shard_size",), label="QUANTO-INT4"),
    Target("quanto-int8", "checkpoint", "optimum-quanto qint8: int8 weights with a scale per output channel", "",
           "optimum-quanto (QuantizedModelForCausalLM)", ("max_shard_size",), label="QUANTO-INT8"),
    Target("int8", "checkpoint", "bitsandbytes LLM.int8(): int8 weights with a scale per row", "",
           "transformers with bitsandbytes (GPUs and CPUs)", ("max_shard_size",), label="INT8"),
    Target("w8a8", "checkpoint", "int8 weights per output channel and dynamic per-token int8 activations, after "
           "SmoothQuant, by GPTQ (compressed-tensors int-quantized, llm-compressor's W8A8)", "always",
           "vLLM (GPUs and CPUs), transformers",
           ("smoothing", "gptq", "act_order", "damp", "max_shard_size", "exact_calib", *CALIBRATION), label="W8A8"),
    Target("gptq", "checkpoint", "GPTQ 4-bit (2, 8), group 128, symmetric, activation order", "always",
           "transformers, GPTQModel, vLLM",
           ("bits", "group_size", "act_order", "sym", "damp", "max_shard_size", "fmt", "exact_calib",
            "expert_min_tokens", *CALIBRATION), label="GPTQ"),
], key=lambda t: (t.kind != "gguf", t.name))}


def _mixtures(keep) -> tuple[str, ...]:
    return tuple(t.name for t in TARGETS.values() if t.recipe is not None and t.recipe.quantizes_like_llama_quantize
                 and keep(t.name))


# named sets of GGUF targets, as a publisher would guess them: `--to k-quants`
SETS: dict[str, tuple[str, ...]] = {
    "k-quants": _mixtures(lambda n: n.startswith("q") and "_k" in n and n != "q2_k_s"),
    "i-quants": _mixtures(lambda n: n.startswith("iq")),
    "legacy-quants": (*_mixtures(lambda n: n in ("q4_0", "q4_1", "q5_0", "q5_1")), "q8_0"),
    # every GGUF file but f32 (the reference), the ternary types and q1_0's signs (for models
    # trained ternary or binary; q1_0 also stops on rows that fit no block of 128)
    # (mxfp4_moe: MXFP4 experts, for mixtures of experts; a dense model's would be q8_0's)
    "all-gguf": tuple(t.name for t in TARGETS.values()
                      if t.kind == "gguf" and t.name not in ("f32", "tq1_0", "tq2_0", "q1_0", "mxfp4_moe")),
}


def names(kind: str | None = None) -> list[str]:
    return [t.name for t in TARGETS.values() if kind is None or t.kind == kind]


def parse(spec: str) -> list[Target]:
    """`--to q8_0,gptq` -> rows, in order, without repeats."""
    out: list[Target] = []
    parts = [p.strip() for p in spec.split(",")]
    parts = [n for p in parts for n in (SETS[p.lower()] if p.lower() in SETS else (p,))]
    for part in parts:
        name = part.strip().lower()
        if not name:
            continue
        if name not in TARGETS:
            raise UsageError(f"--to: unknown target {part.strip()!r}; known: {', '.join(TARGETS)}, and the sets "
                             f"{', '.join(SETS)}")
        if TARGETS[name] not in out:
            out.append(TARGETS[name])
    if not out:
        raise UsageError("--to: name at least one target, e.g. --to q8_0")
    return out


def check_options(chosen: list[Target], given: dict[str, str]) -> None:
    """`given`: the options on the command line (parameter name -> flag as typed). One that
    applies to none of the chosen targets is a usage error naming the targets it applies to."""
    mixtures = _mixtures(lambda n: True)
    for param, flag in given.items():
        users = [t.name for t in TARGETS.values() if param in t.options]
        if users and not any(param in t.options for t in chosen):
            if set(mixtures) <= set(users):  # the GGUF mixtures by one name: there are many
                users = ["the GGUF mixtures (q4_k_m, iq4_xs, ...)", *(u for u in users if u not in mixtures)]
            raise UsageError(f"{flag} applies to {', '.join(users)}, not to --to "
                             f"{','.join(t.name for t in chosen)}")


def output_paths(label: str, chosen: list[Target], output: Path | None) -> list[Path]:
    """Where each chosen target writes. Default: MODEL-TYPE.gguf files and MODEL-GPTQ/ (...)
    directories in the current directory. `-o` names the output itself when there is one target
    (a .gguf file, or the checkpoint directory); otherwise the directory they all go in."""
    names = [f"{label}-{t.label}.gguf" if t.kind == "gguf" else f"{label}-{t.label}" for t in chosen]
    if output is None:
        return [Path.cwd() / n for n in names]
    if len(chosen) == 1:
        t = chosen[0]
        if t.kind == "checkpoint":
            return [output]
        if not (output.is_dir() or str(output).endswith(os.sep) or output.suffix.lower() != ".gguf"):
            return [output]
    elif output.suffix.lower() == ".gguf" and not output.is_dir():
        raise UsageError(f"-o {output}: several targets need an output directory, not a file name")
    return [output / n for n in names]


def help_line() -> str:
    """`--to`'s help: every target, grouped by kind."""
    calibrated = [t.name for t in TARGETS.values() if t.kind == "checkpoint" and t.calibration]
    direct = [t.name for t in TARGETS.values() if t.kind == "checkpoint" and not t.calibration]
    return (f"Target(s), comma-separated, any mix. GGUF files: {', '.join(names('gguf'))}; sets of them: "
            f"{', '.join(SETS)}. Safetensors checkpoints: {', '.join(calibrated)} (calibrated), {', '.join(direct)} "
            "(no calibration). The checkpoint is read once for every GGUF file, calibration runs once per method.")


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
