"""Safetensors checkpoint directories quantized one decoder layer at a time (GPTQ, AWQ, FP8):
the plan of every output tensor (metadata only, every problem found before any compute), and
the directory written as the layers are quantized.

The plan lists each quantized linear's tensors through its layout (layouts.py) and every other
tensor as a copy (float16 for GPTQ and AWQ, as their loaders expect; in the checkpoint's own
dtype for FP8, as llm-compressor saves it), in decoder-layer order. The writer streams them into shards under a
temporary directory that is renamed into place only when complete: what precedes the layers at
once, each layer's tensors as soon as the method has quantized it (flush), then the rest, the
configs and the tokenizer files.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from qconvert import __version__
from qconvert.arch.base import EXPERT, NOT_TEXT, SKIP_SUFFIXES, merged_expert
from qconvert.errors import InputError, UsageError
from qconvert.layouts import (AWQ, GPTQ, HQQ, LAYOUTS, Quanto, TORCH_DTYPES, BitsAndBytes4bit, BitsAndBytes8bit, Entry,
                               FloatQuantized, IntQuantized, Layout, PackQuantized, Params, TransformersFP8, to_numpy)
from qconvert.model import Model
from qconvert.quant import bnb, hqq
from qconvert.quant.blocks import first_nonfinite, to_float32
from qconvert.read.checkpoint import SIDE_FILES, Tensor
from qconvert.read.quantized import DequantizedLinear
from qconvert.read.safetensors import FLOAT_DTYPES
from qconvert.writers.safetensors import AtomicDir, ShardedWriter, check_replaceable_dir

GROUP_CHOICES = (32, 64, 128, 256)  # the loaders' CPU and GPU kernels take these (torch's int4 CPU kernel)
COPIED_FILES = [n for n in SIDE_FILES if n not in ("config.json", "README.md")]  # tokenizer, generation config
# what a checkpoint directory holds besides its shards (write_configs)
OWN_FILES = {"config.json", "quantize_config.json", "quanto_qmap.json", *COPIED_FILES}
# methods that quantize each linear from its weight alone (no calibration): the block of their scales
PER_TENSOR = {"fp8": None, "fp8-block": (128, 128)}
# bitsandbytes' formats, also from each weight alone: 4-bit NF4 and FP4 (in blocks), LLM.int8()
BNB = ("nf4", "fp4", "int8")
# the methods transformers applies while loading a float model, from each weight alone: bitsandbytes' and HQQ
ON_LOAD = (*BNB, "hqq")
# optimum-quanto's weight-only types, also from each weight alone (QuantizedModelForCausalLM.quantize)
QUANTO = ("quanto-int4", "quanto-int8")
# --format: the layouts each method writes, its own first (the default)
FORMATS = {"gptq": ("gptq", "compressed-tensors"), "awq": ("awq", "compressed-tensors"),
           "w8a8": ("compressed-tensors",), "fp8": ("compressed-tensors",),
           "fp8-block": ("compressed-tensors", "hf-fp8"), **{m: ("bitsandbytes",) for m in BNB}, "hqq": ("hqq",),
           **{m: ("quanto",) for m in QUANTO}}
DEFAULT_GROUP = {"nf4": 64, "fp4": 64, "hqq": 64}  # --group-size when not given; 128 for the others
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class CheckpointOptions:
    method: str = "gptq"  # "awq", "w8a8", or one of PER_TENSOR or ON_LOAD
    bits: int = 4
    group_size: int | None = 128  # None: the method's default (DEFAULT_GROUP), set by the plan
    act_order: bool = True  # gptq: static groups, g_idx stays k // group, desc_act false
    sym: bool = True
    damp: float = 0.05
    max_shard_bytes: int = 5 * 10 ** 9
    clip: bool = True  # awq: AutoAWQ's clipping search after the scales (llm-compressor's AWQ has none)
    dtype: str = "F16"  # the copies' and scales' dtype; FP8 takes the checkpoint's (set by the plan)
    fmt: str = ""  # one of FORMATS[method]; "": the method's own
    smoothing: float = 0.5  # w8a8: SmoothQuant's migration strength
    gptq: bool = True  # w8a8: GPTQ on the smoothed weights (else round to nearest)
    expert_min_tokens: int = 64  # gptq of experts: fewer routed tokens -> statistics from every token
    double_quant: bool = True  # nf4, fp4: the block scales quantized again (bnb_4bit_use_double_quant)
    compute_dtype: str = "float32"  # nf4, fp4: bnb_4bit_compute_dtype (BitsAndBytesConfig's default)

    @property
    def format(self) -> str:
        return self.fmt or FORMATS[self.method][0]

    @property
    def per_tensor(self) -> bool:
        return self.method in PER_TENSOR or self.method in ON_LOAD or self.method in QUANTO

    @property
    def layout(self) -> type[Layout]:
        if self.method == "hqq":
            return HQQ
        if self.method in QUANTO:
            return Quanto
        if self.method in BNB:
            return BitsAndBytes8bit if self.method == "int8" else BitsAndBytes4bit
        if self.per_tensor:
            return TransformersFP8 if self.format == "hf-fp8" else FloatQuantized
        if self.method == "w8a8":
            return IntQuantized
        return PackQuantized if self.format == "compressed-tensors" else LAYOUTS[self.method]

    @property
    def params(self) -> Params:
        if self.method == "hqq":
            return Params(self.bits, self.group_size, dtype=self.dtype)
        if self.method in QUANTO:
            return Params(self.bits, -1, dtype=self.dtype)
        if self.method in BNB:
            kind = "" if self.method == "int8" else self.method
            return Params(self.bits, self.group_size, dtype=self.dtype, kind=kind, double_quant=self.double_quant,
                          compute_dtype=self.compute_dtype)
        if self.per_tensor:
            return Params(8, -1, dtype="F32" if self.format == "hf-fp8" else self.dtype, block=PER_TENSOR[self.method])
        zero_points = self.method == "awq" if self.format == "compressed-tensors" else False
        return Params(self.bits, self.group_size, v2=zero_points or (self.method == "gptq" and not self.sym))

    @property
    def checkpoint_format(self) -> str:
        if self.format == "compressed-tensors":
            return self.layout.format
        if self.method in BNB:
            return "bitsandbytes"
        if self.method == "hqq":
            return "hqq"
        if self.method in QUANTO:
            return "quanto"
        if self.per_tensor:
            return "fp8"
        if self.method == "awq":
            return "awq_gemm"
        return "gptq" if self.sym else "gptq_v2"

    def check(self) -> None:
        if self.format not in FORMATS[self.method]:
            if self.format == "hf-fp8":
                raise UsageError(f"--format hf-fp8 (transformers' fp8 layout) stores 128 x 128 block scales: it applies "
                                 f"to --to fp8-block, not --to {self.method}")
            raise UsageError(f"--format {self.format} does not apply to --to {self.method}; it writes "
                             f"{' or '.join(FORMATS[self.method])}")
        if self.method in ("nf4", "fp4"):
            if self.group_size not in bnb.BLOCK_SIZES:
                raise UsageError(f"--group-size for --to {self.method} (bitsandbytes' blocksize) must be one of "
                                 f"{', '.join(map(str, bnb.BLOCK_SIZES))}, got {self.group_size}")
            if self.compute_dtype not in COMPUTE_DTYPES:
                raise UsageError(f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.method == "hqq":
            if self.bits not in hqq.BITS:
                raise UsageError(f"--bits for --to hqq must be one of {', '.join(map(str, hqq.BITS))}, got {self.bits}")
            if self.group_size < 8 or self.group_size % 8:
                raise UsageError(f"--group-size for --to hqq must be a multiple of 8 (hqq's rule), got {self.group_size}")
        if self.per_tensor:
            return
        if self.method == "w8a8" and not 0 <= self.smoothing <= 1:
            raise UsageError(f"--smoothing must be between 0 and 1, got {self.smoothing}")
        if self.method == "awq" and self.bits != 4:
            raise UsageError(f"--to awq writes 4-bit GEMM checkpoints; --bits {self.bits} is not available")
        if self.bits not in (2, 4, 8):
            raise UsageError(f"--bits must be 2, 4 or 8, got {self.bits}")
        if self.group_size != -1 and self.group_size not in GROUP_CHOICES:
            raise UsageError(f"--group-size must be -1 or one of {', '.join(map(str, GROUP_CHOICES))}, "
                             f"got {self.group_size}")
        if not 0 < self.damp < 1:
            raise UsageError(f"--damp must be between 0 and 1, got {self.damp}")


@dataclass
class Linear:
    name: str  # checkpoint name of the weight, without ".weight"
    hf: str  # the same as the forward knows it (text-model prefix removed)
    layer: int
    n_out: int
    n_in: int


@dataclass
class CheckpointPlan:
    model: Model
    path: Path
    opts: CheckpointOptions
    force: bool
    entries: list[Entry]
    linears: dict[str, Linear]  # by forward name
    copies: dict[str, Tensor]  # output name -> checkpoint tensor written as f16
    layer_of: dict[str, int]  # output name -> decoder layer (-1: written before the layers)
    names: dict[str, str]  # forward (HF) name -> checkpoint name
    ignore: list[str] = field(default_factory=list)  # FP8: the Linear modules (name parts) left unquantized

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def _layer(family, hf: str) -> int:
    if hf.startswith(NOT_TEXT):
        return -1
    if family.n_experts and (m := EXPERT.match(hf)):  # GGUF names only the experts stacked
        hf = merged_expert(m) + ".weight"
    g = family.map_name(hf)
    return int(g.split(".")[1]) if g.startswith("blk.") else -1


def plan_checkpoint(model: Model, path: Path, force: bool, opts: CheckpointOptions) -> CheckpointPlan:
    """Every output tensor of the checkpoint directory at `path`, from metadata only: layers whose
    widths do not fit the group size or the packing, and an output that may not be replaced,
    are found here."""
    if opts.group_size is None:
        opts = replace(opts, group_size=DEFAULT_GROUP.get(opts.method, 128))
    opts.check()
    ckpt, family = model.ckpt, model.family
    assert ckpt is not None
    if not family.safetensors_targets:
        raise UsageError(f"--to {opts.method}: qconvert writes {ckpt.config.architecture()}'s GGUF files, not yet its "
                         f"quantized safetensors checkpoints ({family.arch_name}'s fused experts have no layout there)")
    if family.n_experts and opts.layout not in (GPTQ, AWQ):
        raise UsageError(f"--to {opts.method}{' --format ' + opts.format if opts.method in ('gptq', 'awq') else ''}: "
                         f"{ckpt.config.architecture()} is a mixture of experts; qconvert writes its GGUF files and "
                         "GPTQ and AWQ checkpoints in their own layouts, not yet --to fp8, fp8-block, w8a8, nf4, fp4 "
                         "or int8, nor --format compressed-tensors")
    if opts.method in BNB:
        opts = replace(opts, bits=8 if opts.method == "int8" else 4,
                       group_size=-1 if opts.method == "int8" else opts.group_size, dtype=_float_dtype(ckpt))
    elif opts.method == "hqq":
        opts = replace(opts, dtype=_float_dtype(ckpt))
    elif opts.method in QUANTO:  # quanto's group size is its own per-linear rule
        opts = replace(opts, bits=int(opts.method[-1]), group_size=-1, dtype=_float_dtype(ckpt))
    elif opts.per_tensor:
        opts = replace(opts, bits=8, group_size=-1 if PER_TENSOR[opts.method] is None else PER_TENSOR[opts.method][1],
                       dtype=_float_dtype(ckpt))
    if opts.method == "w8a8":  # int8, one scale per output channel, symmetric
        opts = replace(opts, bits=8, group_size=-1, sym=True)
    check_replaceable_dir(path, force, opts.layout.method, OWN_FILES)
    g, per_word = opts.group_size, 32 // opts.bits
    linears: dict[str, Linear] = {}
    copies: dict[str, Tensor] = {}
    layer_of: dict[str, int] = {}
    entries_by_name: dict[str, list[Entry]] = {}
    misfits: list[str] = []
    for name, t in ckpt.tensors.items():
        if name.endswith(SKIP_SUFFIXES):
            continue
        hf = name.replace("language_model.", "")
        layer = _layer(family, hf)
        if layer >= 0 and hf.endswith(".weight") and len(t.shape) == 2 and not family.keeps_float(hf[:-7]):
            family.check_float(t)
            prefix, hp = family.output_name(name[:-len(".weight")]), hf[:-len(".weight")]
            if opts.layout in (FloatQuantized, PackQuantized, IntQuantized, TransformersFP8, BitsAndBytes4bit,
                               BitsAndBytes8bit, HQQ, Quanto) and family.transposed(hf):
                raise UsageError(f"{ckpt.path}: --to {opts.method} --format {opts.format} quantizes Linear modules "
                                 f"only; {ckpt.config.architecture()} stores {prefix} as a transposed Conv1D")
            n_out, n_in = (t.shape[1], t.shape[0]) if family.transposed(hf) else t.shape
            block = PER_TENSOR.get(opts.method)
            if block is not None and n_in % block[1]:
                raise UsageError(f"{ckpt.path}: --to {opts.method} needs linear inputs in whole blocks of {block[1]} "
                                 f"(its activations are quantized in groups of {block[1]}); {prefix} takes {n_in}; "
                                 "use --to fp8 (per-channel scales)")
            if block is not None and opts.format == "hf-fp8" and n_out % block[0]:
                raise UsageError(f"{ckpt.path}: --format hf-fp8 needs linear outputs in whole blocks of {block[0]} "
                                 f"(transformers leaves other linears unquantized, and its loader refuses them); "
                                 f"{prefix} gives {n_out}; use the default compressed-tensors format")
            gs = n_in if g == -1 else g
            if not opts.per_tensor and (n_in % gs or n_in % per_word or n_out % per_word):
                misfits.append(f"{prefix} ({n_in} in, {n_out} out)")
            if opts.method == "hqq" and not hqq.fits(n_out, n_in, g, opts.bits):
                misfits.append(f"{prefix} ({n_in} in, {n_out} out)")
            linears[hp] = Linear(prefix, hp, layer, n_out, n_in)
            entries_by_name[prefix] = opts.layout.entries(prefix, n_out, n_in, opts.params)
            for e in entries_by_name[prefix]:
                layer_of[e.name] = layer
        else:
            dtype = (opts.dtype if t.dtype == "F64" or not opts.per_tensor else t.dtype) \
                if t.dtype in FLOAT_DTYPES else t.dtype
            if t.dtype in FLOAT_DTYPES and name.endswith(family.float32_tensors):
                dtype = "F32"
            out = family.output_name(name)
            entries_by_name[out] = [Entry(out, dtype, tuple(t.shape))]
            copies[out] = t
            layer_of[out] = layer
    if opts.method == "awq" and opts.layout is PackQuantized and family.awq_extra_tensors():
        raise UsageError(f"{ckpt.path}: AWQ scales the activation inside {ckpt.config.architecture()}'s MLP, which "
                         "compressed-tensors cannot hold; use --format awq")
    if opts.method == "awq":
        for name, shape, layer in family.awq_extra_tensors():
            entries_by_name[name] = [Entry(name, "F16", shape)]
            layer_of[name] = layer
    if misfits and opts.method == "hqq":
        fits = [str(c) for c in hqq.GROUPS if all(hqq.fits(lin.n_out, lin.n_in, c, opts.bits) for lin in linears.values())]
        raise UsageError(f"{ckpt.path}: HQQ's {opts.bits}-bit packing of groups of {g} does not fit {len(misfits)} "
                         f"layers, e.g. {misfits[0]}; group sizes that fit every layer: {', '.join(fits) or 'none'}")
    if misfits:
        widths = {lin.n_in for lin in linears.values()}
        fits = [str(c) for c in GROUP_CHOICES if all(w % c == 0 for w in widths)]
        raise UsageError(f"{ckpt.path}: group size {g} and {opts.bits}-bit packing do not fit "
                         f"{len(misfits)} layers, e.g. {misfits[0]}; group sizes that fit every layer: "
                         f"{', '.join(fits) + ' or -1' if fits else '-1 (per channel)'}")
    if not linears:
        raise InputError(f"{ckpt.path}: no decoder linear layers found to quantize")
    order = sorted(entries_by_name, key=lambda n: (layer_of[entries_by_name[n][0].name], n))
    entries = [e for n in order for e in entries_by_name[n]]
    # tensors whose size is known only once they are computed (bitsandbytes' quant-state JSON)
    # go last, after every other, so that the shards before them are written as they come
    entries = [e for e in entries if e.exact] + [e for e in entries if not e.exact]
    for e in entries:
        if not e.exact:
            layer_of[e.name] = LAST
    names = {n.replace("language_model.", ""): family.output_name(n) for n in ckpt.tensors}
    # compressed-tensors quantizes every Linear but those named here: the output head, and the
    # modules of a multimodal checkpoint's other towers
    ignore = ["lm_head", *sorted({root.removeprefix("model.").rstrip(".") for root in NOT_TEXT
                                  if any(n.startswith(root) for n in ckpt.tensors)})]
    if (opts.method in ON_LOAD or opts.method in QUANTO) and len(ignore) > 1:
        raise UsageError(f"{ckpt.path}: --to {opts.method}: the checkpoint holds {', '.join(ignore[1:])} besides the "
                         f"language model; transformers' {opts.layout.method} path quantizes their linears too, which qconvert "
                         "does not yet (its GPTQ, AWQ and FP8 targets leave them float)")
    return CheckpointPlan(model, path, opts, force, entries, linears, copies, layer_of, names, ignore)


LAST = 1 << 30  # the layer of what is written after every layer


def _float_dtype(ckpt) -> str:
    """The dtype an FP8 checkpoint keeps its other tensors and its scales in: the float weights'
    (of a quantized source, those stored as floats; float32 for float64, which no FP8 loader
    takes)."""
    found = [t.dtype for n, t in ckpt.tensors.items() if n.endswith(".weight") and t.dtype in FLOAT_DTYPES
             and not isinstance(t, DequantizedLinear)]
    dtype = max(set(found), key=found.count) if found else "F16"
    return "F32" if dtype == "F64" else dtype


def stored(name: str, t, dtype: str, view: bool = False) -> np.ndarray:
    """A tensor as the checkpoint stores it: a float one in `dtype` (refusing NaN/Inf and, for
    float16, values beyond its range), other dtypes as they are. `view`: a tensor already in
    `dtype` comes back as the checkpoint's own (memory-mapped) array, not a copy; the caller
    releases it once written."""
    if t.dtype not in FLOAT_DTYPES:
        return np.asarray(t.array())
    if t.dtype == dtype:
        a = t.array()
        bad = first_nonfinite(to_float32(dtype, a))
        if bad >= 0:
            raise InputError(f"{name}: non-finite value at flat index {bad}")
        if view:
            return a
        out = np.array(a)
        t.release()
        return out
    a = to_float32(t.dtype, t.array())
    bad = first_nonfinite(a)
    if bad >= 0:
        raise InputError(f"{name}: non-finite value at flat index {bad}")
    x = tensor_view(a)  # torch's conversions use the job's threads; the same rounding as numpy's
    if dtype == "F16":
        big = largest_magnitude(x)
        if big > 65504:
            raise InputError(f"{name}: value {big:g} is beyond float16's range; cannot store it in 16 bits")
    out = to_numpy(x.to(TORCH_DTYPES[dtype]))
    t.release()
    return out


def largest_magnitude(x: torch.Tensor) -> float:
    """max |x| (0 for an empty tensor), without the copy abs() makes."""
    return float(max(x.max(), -x.min())) if x.numel() else 0.0


def to_f16(name: str, t) -> np.ndarray:
    """A tensor as a GPTQ or AWQ checkpoint stores it: float16, other dtypes as they are."""
    return stored(name, t, "F16")


def tensor_view(a: np.ndarray) -> torch.Tensor:
    """A torch tensor sharing a (possibly read-only, memory-mapped) array's memory, for reading
    only (torch warns about every read-only array it wraps)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(a)


@dataclass
class CheckpointWriter:
    """Streams a plan's tensors, in plan order, into a directory that appears only when complete."""

    plan: CheckpointPlan
    produced: dict[str, np.ndarray] = field(default_factory=dict)
    layers: dict[int, list] = field(default_factory=dict)  # per decoder layer: what the method reports

    def __post_init__(self) -> None:
        p = self.plan
        self.dir = AtomicDir(p.path, p.force, p.opts.layout.method, OWN_FILES)
        self.shards = ShardedWriter(self.dir.tmp, p.entries, p.opts.max_shard_bytes,
                                    {"format": "pt", "quantizer": f"qconvert {__version__}"})

    @property
    def path(self) -> Path:
        return self.plan.path

    def add(self, name: str, data: np.ndarray) -> None:
        """A tensor the method produced (a linear's packed parts, a changed norm)."""
        self.produced[name] = data

    def add_linear(self, lin: Linear, q, scales, zeros, g_idx) -> None:
        packed = self.plan.opts.layout.pack(np.asarray(q), np.asarray(scales), np.asarray(zeros),
                                            None if g_idx is None else np.asarray(g_idx), self.plan.opts.params)
        for k, v in packed.items():
            self.add(f"{lin.name}.{k}", v)

    def flush(self, upto_layer: int) -> None:
        """Write every planned tensor up to the end of `upto_layer`, in plan order."""
        w = self.shards
        while w.pos < len(w.order):
            e = w.order[w.pos][1]
            if self.plan.layer_of[e.name] > upto_layer:
                return
            if e.name in self.produced:
                w.write(e.name, self.produced.pop(e.name))
                continue
            t = self.plan.copies[e.name]
            w.write(e.name, stored(e.name, t, e.dtype, view=True))  # written from the mapped file, then let go
            t.release()

    def finish(self, calibration: dict) -> None:
        """Every tensor, the configs and the tokenizer files written; not yet in place."""
        self.flush(LAST)
        self.shards.finish()
        write_configs(self.plan, self.dir.tmp, quantization_config(self.plan, calibration))

    def commit(self) -> None:
        """The directory appears at its path; `result` is its size and sha256 (over its files'
        names and sha256s, sorted)."""
        self.dir.commit()
        self.result = (sum(f.stat().st_size for f in self.plan.path.iterdir()), tree_sha256(self.plan.path))

    def abort(self) -> None:
        self.shards.abort()
        self.dir.abort()


def file_sha256(path: Path) -> bytes:
    one = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            one.update(block)
    return one.digest()


def tree_sha256(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in d.iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0" + file_sha256(f))
    return h.hexdigest()


def quantization_config(plan: CheckpointPlan, calib: dict | None) -> dict:
    opts = plan.opts
    if opts.per_tensor:
        return opts.layout.config(opts.params, {"ignore": plan.ignore, "method": opts.method})
    if opts.method == "w8a8":
        return opts.layout.config(opts.params, {"act_order": opts.act_order and opts.gptq, "method": "w8a8",
                                                "smoothing": opts.smoothing, "gptq": opts.gptq,
                                                **({"damp_percent": opts.damp} if opts.gptq else {}),
                                                "calibration": calib, "ignore": plan.ignore})
    if opts.layout is PackQuantized:
        return opts.layout.config(opts.params, {"act_order": opts.act_order and opts.method == "gptq",
                                                "method": opts.method, "calibration": calib, "ignore": plan.ignore,
                                                **({"damp_percent": opts.damp} if opts.method == "gptq" else {}),
                                                **({"clip": opts.clip} if opts.method == "awq" else {})})
    family = plan.model.family
    if opts.method == "awq":
        # clip is recorded only when off, so that default checkpoints keep their bytes
        cfg = opts.layout.config(opts.params, {"calibration": calib, **({} if opts.clip else {"clip": False})})
        if family.float_linears:
            # transformers' AWQ loader makes every nn.Linear a quantized one but those whose names
            # end so: the router, Qwen2-MoE's shared-expert gate
            cfg["modules_to_not_convert"] = [family.output_name("." + n)[1:] for n in family.float_linears]
    else:
        cfg = opts.layout.config(opts.params, {"act_order": opts.act_order, "damp_percent": opts.damp,
                                               "calibration": calib})
        if family.float_linears:
            # transformers' GPTQ loader (optimum's) makes every nn.Linear of a layer a quantized one
            # unless this list names it (by the end of its name): the router and Qwen2-MoE's
            # shared-expert gate stay float
            cfg["modules_in_block_to_quantize"] = [sorted({lin.name.rsplit(".", 1)[1]
                                                           for lin in plan.linears.values()})]
    if family.n_experts:
        cfg["meta"]["expert_min_tokens"] = opts.expert_min_tokens
    return cfg


def transformers4_config(cfg: dict) -> dict:
    """config.json for a checkpoint only transformers 4.x loads (HQQ: 5.x neither quantizes nor
    loads it): transformers 5's `rope_parameters` also as 4.x's `rope_theta` and `rope_scaling`,
    which 4.x reads instead (without them it takes rope theta 10000: Qwen2.5's 1e6 lost, its
    logits 14% off)."""
    rope = cfg.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" in cfg:
        return cfg
    out = dict(cfg)
    if isinstance(rope.get("full_attention"), dict):  # per layer type (Gemma 3): 4.x's local base frequency
        local = rope.get("sliding_attention")
        if isinstance(local, dict) and "rope_theta" in local:
            out["rope_local_base_freq"] = local["rope_theta"]
        rope = rope["full_attention"]
    rope = dict(rope)
    if "rope_theta" in rope:
        out["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default" and "rope_scaling" not in cfg:
        out["rope_scaling"] = rope
    return out


def write_configs(plan: CheckpointPlan, directory: Path, qcfg: dict) -> None:
    src = plan.model.ckpt.path
    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if qcfg is not None:
        cfg["quantization_config"] = qcfg
    if plan.opts.layout is Quanto:  # quanto's own file naming every quantized module
        qmap = Quanto.qmap([lin.name for lin in plan.linears.values()], plan.opts.params)
        (directory / "quanto_qmap.json").write_text(json.dumps(qmap, indent=4), encoding="utf-8")
    if not plan.opts.per_tensor:  # FP8 keeps the checkpoint's dtype
        cfg["dtype"] = "float16"
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = "float16"
    if plan.opts.method == "hqq":
        cfg = transformers4_config(cfg)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    if qcfg is not None and qcfg["quant_method"] == "gptq":  # AutoGPTQ-era loaders read this file
        (directory / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n", encoding="utf-8")
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, directory / name)
