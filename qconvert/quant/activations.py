"""The activation quantization a loader applies at run time to the input of each quantized
linear layer of a W8A8 or FP8 checkpoint, as its quantization_config asks for it, so that
`qconvert eval` scores what a server runs and not only the weights.

The maths is compressed-tensors' `forward_quantize` with dynamic scales (what transformers runs
for these checkpoints), per token or per group of `group` inputs of a token:

    int8:  s = max |x| / 127.5 in x's dtype (x's epsilon where that is 0, underflow included),
           x' = clamp(round_half_even(x / s), -128, 127) * s
    fp8:   s = max |x| / 448 (the same guard), x' = float(e4m3(clamp(x / s, -448, 448))) * s

vLLM divides by 127 instead of 127.5 and clamps to [-127, 127]; the two differ by 0.4% of the
step and in no other way. transformers' own `fp8` layout asks for the fp8 rule per group of the
weight block's width (its GPU kernel's act_quant)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qconvert.errors import InputError
from qconvert.quant.fp8 import E4M3_MAX, FP8


@dataclass(frozen=True)
class ActivationQuant:
    kind: str  # "int8" | "fp8"
    group: int | None = None  # None: one scale per token
    simulated: bool = True  # False: per-tensor or static input scales, which eval does not simulate

    @property
    def label(self) -> str:
        per = "per token" if self.group is None else f"per group of {self.group}"
        return f"{self.kind} {per}" if self.simulated else f"{self.kind}, static or per-tensor scales (not simulated)"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x quantized and dequantized along its last dimension, in x's dtype."""
        K = x.shape[-1]
        g = K if self.group is None else self.group
        pad = -K % g
        v = torch.nn.functional.pad(x, (0, pad)) if pad else x  # zeros change no group's maximum
        v = v.reshape(*x.shape[:-1], -1, g)
        qmax = 127.5 if self.kind == "int8" else E4M3_MAX
        s = v.abs().amax(-1, keepdim=True) / qmax
        s = torch.where(s == 0, torch.finfo(x.dtype).eps, s)  # a zero (or underflowed) scale: epsilon
        if self.kind == "int8":
            q = torch.clamp(torch.round(v / s), -128, 127)
        else:
            q = torch.clamp(v / s, -E4M3_MAX, E4M3_MAX).to(FP8).to(x.dtype)
        out = (q * s).reshape(*x.shape[:-1], -1)
        return out[..., :K] if pad else out

    @classmethod
    def from_compressed_tensors(cls, args: dict | None, where: object) -> ActivationQuant | None:
        """From a config group's `input_activations` (None: weight-only)."""
        if not args:
            return None
        kind = (args.get("num_bits"), str(args.get("type", "int")).lower())
        strategy = str(args.get("strategy", "")).lower()
        if kind not in ((8, "int"), (8, "float")) or not args.get("symmetric", True) \
                or strategy not in ("token", "group", "tensor"):
            raise InputError(f"{where}: input activations {args.get('num_bits')}-bit {args.get('type')} "
                             f"{strategy or '(no strategy)'} cannot be read; 8-bit int or float, symmetric, per token "
                             "or group can")
        group = args.get("group_size") if strategy == "group" else None
        if strategy == "group" and not (type(group) is int and group > 0):
            raise InputError(f"{where}: input activations group_size must be a positive integer, got {group!r}")
        dynamic = args.get("dynamic") not in (False, "false") and strategy != "tensor"
        return cls("int8" if kind[1] == "int" else "fp8", group, simulated=dynamic)
