"""Safetensors checkpoint directories quantized one decoder layer at a time (GPTQ, AWQ): the
plan of every output tensor (metadata only, every problem found before any compute), and the
directory written as the layers are quantized.

The plan lists each quantized linear's tensors through its layout (layouts.py) and every other
tensor as a float16 copy, in decoder-layer order. The writer streams them into shards under a
temporary directory that is renamed into place only when complete: what precedes the layers at
once, each layer's tensors as soon as the method has quantized it (flush), then the rest, the
configs and the tokenizer files.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qconvert import __version__
from qconvert.arch.base import NOT_TEXT, SKIP_SUFFIXES
from qconvert.errors import InputError, UsageError
from qconvert.layouts import LAYOUTS, Entry, Layout, Params
from qconvert.model import Model
from qconvert.quant.blocks import first_nonfinite, to_float32
from qconvert.read.checkpoint import SIDE_FILES, Tensor
from qconvert.read.safetensors import FLOAT_DTYPES
from qconvert.writers.safetensors import AtomicDir, ShardedWriter, check_replaceable_dir

GROUP_CHOICES = (32, 64, 128, 256)  # the loaders' CPU and GPU kernels take these (torch's int4 CPU kernel)
COPIED_FILES = [n for n in SIDE_FILES if n not in ("config.json", "README.md")]  # tokenizer, generation config
# what a checkpoint directory holds besides its shards (write_configs)
OWN_FILES = {"config.json", "quantize_config.json", *COPIED_FILES}


@dataclass
class CheckpointOptions:
    method: str = "gptq"  # or "awq"
    bits: int = 4
    group_size: int = 128
    act_order: bool = True  # gptq: static groups, g_idx stays k // group, desc_act false
    sym: bool = True
    damp: float = 0.05
    max_shard_bytes: int = 5 * 10 ** 9
    clip: bool = True  # awq: AutoAWQ's clipping search after the scales (llm-compressor's AWQ has none)

    @property
    def layout(self) -> type[Layout]:
        return LAYOUTS[self.method]

    @property
    def params(self) -> Params:
        return Params(self.bits, self.group_size, v2=self.method == "gptq" and not self.sym)

    @property
    def checkpoint_format(self) -> str:
        if self.method == "awq":
            return "awq_gemm"
        return "gptq" if self.sym else "gptq_v2"

    def check(self) -> None:
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

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def _layer(family, hf: str) -> int:
    if hf.startswith(NOT_TEXT):
        return -1
    g = family.map_name(hf)
    return int(g.split(".")[1]) if g.startswith("blk.") else -1


def plan_checkpoint(model: Model, path: Path, force: bool, opts: CheckpointOptions) -> CheckpointPlan:
    """Every output tensor of the checkpoint directory at `path`, from metadata only: layers whose
    widths do not fit the group size or the packing, and an output that may not be replaced,
    are found here."""
    opts.check()
    ckpt, family = model.ckpt, model.family
    assert ckpt is not None
    check_replaceable_dir(path, force, opts.method, OWN_FILES)
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
        if layer >= 0 and hf.endswith(".weight") and len(t.shape) == 2:
            family.check_float(t)
            prefix, hp = name[:-len(".weight")], hf[:-len(".weight")]
            n_out, n_in = (t.shape[1], t.shape[0]) if family.transposed(hf) else t.shape
            gs = n_in if g == -1 else g
            if n_in % gs or n_in % per_word or n_out % per_word:
                misfits.append(f"{prefix} ({n_in} in, {n_out} out)")
            linears[hp] = Linear(prefix, hp, layer, n_out, n_in)
            entries_by_name[prefix] = opts.layout.entries(prefix, n_out, n_in, opts.params)
            for e in entries_by_name[prefix]:
                layer_of[e.name] = layer
        else:
            entries_by_name[name] = [Entry(name, "F16" if t.dtype in FLOAT_DTYPES else t.dtype, tuple(t.shape))]
            copies[name] = t
            layer_of[name] = layer
    if opts.method == "awq":
        for name, shape, layer in family.awq_extra_tensors():
            entries_by_name[name] = [Entry(name, "F16", shape)]
            layer_of[name] = layer
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
    names = {n.replace("language_model.", ""): n for n in ckpt.tensors}
    return CheckpointPlan(model, path, opts, force, entries, linears, copies, layer_of, names)


def to_f16(name: str, t) -> np.ndarray:
    """A tensor as the checkpoint stores it: float16 (refusing NaN/Inf and values beyond its
    range), other dtypes as they are."""
    if t.dtype not in FLOAT_DTYPES:
        return np.asarray(t.array())
    a = to_float32(t.dtype, t.array())
    bad = first_nonfinite(a)
    if bad >= 0:
        raise InputError(f"{name}: non-finite value at flat index {bad}")
    x = torch.from_numpy(a)  # torch's conversions use the job's threads; the same rounding as numpy's
    big = float(max(x.max(), -x.min())) if x.numel() else 0.0
    if big > 65504:
        raise InputError(f"{name}: value {big:g} is beyond float16's range; cannot store it in 16 bits")
    out = x.half().numpy()
    t.release()
    return out


@dataclass
class CheckpointWriter:
    """Streams a plan's tensors, in plan order, into a directory that appears only when complete."""

    plan: CheckpointPlan
    produced: dict[str, np.ndarray] = field(default_factory=dict)
    layers: dict[int, list] = field(default_factory=dict)  # per decoder layer: what the method reports

    def __post_init__(self) -> None:
        p = self.plan
        self.dir = AtomicDir(p.path, p.force, p.opts.method, OWN_FILES)
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
            data = self.produced.pop(e.name) if e.name in self.produced else to_f16(e.name, self.plan.copies[e.name])
            w.write(e.name, data)

    def finish(self, calibration: dict) -> None:
        """Every tensor, the configs and the tokenizer files written; not yet in place."""
        self.flush(1 << 30)
        self.shards.finish()
        write_configs(self.plan, self.dir.tmp, quantization_config(self.plan.opts, calibration))

    def commit(self) -> None:
        """The directory appears at its path; `result` is its size and sha256 (over its files'
        names and sha256s, sorted)."""
        self.dir.commit()
        self.result = (sum(f.stat().st_size for f in self.plan.path.iterdir()), tree_sha256(self.plan.path))

    def abort(self) -> None:
        self.shards.abort()
        self.dir.abort()


def tree_sha256(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in d.iterdir() if p.is_file()):
        one = hashlib.sha256()
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                one.update(block)
        h.update(f.name.encode() + b"\0" + one.digest())
    return h.hexdigest()


def quantization_config(opts: CheckpointOptions, calib: dict) -> dict:
    if opts.method == "awq":
        # clip is recorded only when off, so that default checkpoints keep their bytes
        return opts.layout.config(opts.params, {"calibration": calib, **({} if opts.clip else {"clip": False})})
    return opts.layout.config(opts.params, {"act_order": opts.act_order, "damp_percent": opts.damp,
                                            "calibration": calib})


def write_configs(plan: CheckpointPlan, directory: Path, qcfg: dict) -> None:
    src = plan.model.ckpt.path
    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    cfg["quantization_config"] = qcfg
    cfg["dtype"] = "float16"
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = "float16"
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    if qcfg["quant_method"] == "gptq":  # AutoGPTQ-era loaders read this file
        (directory / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n", encoding="utf-8")
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, directory / name)
