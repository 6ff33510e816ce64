"""Safetensors targets quantized per decoder layer (GPTQ, AWQ): plan, calibrate, quantize, write.

The plan (metadata only) lists every output tensor and finds every problem first: layers whose
widths do not fit the group size or the packing, an existing output, a missing tokenizer. Then
the calibration samples run through the model one decoder layer at a time, all samples at once
through a layer: before each linear layer runs, its Hessian is taken from its actual input and
the layer is quantized, so q/k/v are quantized on the norm's output, o on the attention output
of the already-quantized q/k/v, gate/up after o, down after gate/up, and the quantized layer's
output feeds the next layer. Memory holds one decoder layer, its Hessians and the activations.
Each finished layer is streamed into the shards of a directory that appears only when complete.

AWQ follows AutoAWQ instead: the layer runs once on the float weights with every linear's input
captured (its float output feeds the next layer); then the scale search of each group of
linears sharing an input, the scales folded into the preceding norm or linear, the clipping
search, and the zero-point quantization of every linear.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from qconvert import __version__
from qconvert.arch.base import NOT_TEXT, SKIP_SUFFIXES
from qconvert.errors import InputError, UsageError
from qconvert.read.checkpoint import SIDE_FILES
from qconvert.writers.safetensors import AtomicDir, Entry, ShardedWriter, check_replaceable_dir

GROUP_CHOICES = (32, 64, 128, 256)
COPIED_FILES = [n for n in SIDE_FILES if n not in ("config.json", "README.md")]  # tokenizer, generation config
# what a checkpoint directory holds besides its shards (write_configs)
OWN_FILES = {"config.json", "quantize_config.json", *COPIED_FILES}


@dataclass
class GPTQOptions:
    method: str = "gptq"  # or "awq"
    bits: int = 4
    group_size: int = 128
    act_order: bool = False
    sym: bool = True
    damp: float = 0.05
    max_shard_bytes: int = 5 * 10 ** 9

    @property
    def checkpoint_format(self) -> str:
        if self.method == "awq":
            return "awq_gemm"
        return "gptq" if self.sym else "gptq_v2"

    def check(self) -> None:
        if self.method == "awq" and self.bits != 4:
            raise UsageError(f"--to awq writes 4-bit GEMM checkpoints; --bits {self.bits} is not available")
        if self.method == "awq" and self.act_order:
            raise UsageError("--act-order is a GPTQ option; AWQ has no column order")
        if self.bits not in (2, 4, 8):
            raise UsageError(f"--bits must be 2, 4 or 8, got {self.bits}")
        if self.group_size != -1 and self.group_size not in GROUP_CHOICES:
            # the loaders' CPU and GPU kernels take these (torch's int4 CPU kernel: 32 to 256)
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
class LayerwisePlan:
    ckpt: object
    family: object
    bos: int | None
    path: Path
    entries: list[Entry]
    linears: dict[str, Linear]  # by forward name
    copies: dict[str, object]  # output name -> checkpoint tensor written as f16
    layer_of: dict[str, int]  # output name -> decoder layer (-1: written before the layers)
    opts: GPTQOptions
    names: dict[str, str]  # forward (HF) name -> checkpoint name
    force: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def _layer(family, hf: str) -> int:
    if hf.startswith(NOT_TEXT):
        return -1
    g = family.map_name(hf)
    return int(g.split(".")[1]) if g.startswith("blk.") else -1


def plan_layerwise(source: str, output: Path | None, revision: str | None, force: bool, opts: GPTQOptions) -> LayerwisePlan:
    from qconvert.plan import make_plan, model_label

    opts.check()
    base = make_plan(source, [], None, revision, force, dry_run=True)
    ckpt, family = base.ckpt, base.family
    try:
        if getattr(family, "forward_name", None) is None:
            raise InputError(f"{ckpt.path}: no forward for {family.arch_name}; GPTQ needs one")
        g = opts.group_size
        path = output or Path.cwd() / (f"{model_label(ckpt)}-{opts.method.upper()}-{opts.bits}bit-"
                                       f"{'g' + str(g) if g > 0 else 'perchannel'}")
        check_replaceable_dir(path, force, opts.method, OWN_FILES)
        per_word = 32 // opts.bits
        linears: dict[str, Linear] = {}
        copies: dict[str, object] = {}
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
                lin = Linear(prefix, hp, layer, n_out, n_in)
                gs = n_in if g == -1 else g
                if n_in % gs or n_in % per_word or n_out % per_word:
                    misfits.append(f"{prefix} ({n_in} in, {n_out} out)")
                linears[hp] = lin
                n_groups = -(-n_in // gs)
                if opts.method == "awq":  # packed along the output dimension, no g_idx
                    entries_by_name[prefix] = [
                        Entry(prefix + ".qweight", "I32", (n_in, n_out * opts.bits // 32)),
                        Entry(prefix + ".qzeros", "I32", (n_groups, n_out * opts.bits // 32)),
                        Entry(prefix + ".scales", "F16", (n_groups, n_out))]
                else:
                    entries_by_name[prefix] = [
                        Entry(prefix + ".qweight", "I32", (n_in * opts.bits // 32, n_out)),
                        Entry(prefix + ".qzeros", "I32", (n_groups, n_out * opts.bits // 32)),
                        Entry(prefix + ".scales", "F16", (n_groups, n_out)),
                        Entry(prefix + ".g_idx", "I32", (n_in,))]
                for e in entries_by_name[prefix]:
                    layer_of[e.name] = layer
            else:
                if t.dtype in ("F32", "F16", "BF16", "F64"):
                    entries_by_name[name] = [Entry(name, "F16", tuple(t.shape))]
                else:
                    entries_by_name[name] = [Entry(name, t.dtype, tuple(t.shape))]
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
        return LayerwisePlan(ckpt, family, base.bos_for_calibration(), path, entries, linears, copies, layer_of, opts,
                             names, force)
    except BaseException:
        ckpt.close()
        raise


def _f16(name: str, t) -> np.ndarray:
    from qconvert.quant.blocks import first_nonfinite, to_float32

    if t.dtype not in ("F32", "F16", "BF16", "F64"):
        return np.asarray(t.array())
    a = to_float32(t.dtype, t.array())
    bad = first_nonfinite(a)
    if bad >= 0:
        raise InputError(f"{name}: non-finite value at flat index {bad}")
    big = np.abs(a).max(initial=0.0)
    if big > 65504:
        raise InputError(f"{name}: value {big:g} is beyond float16's range; cannot store it in 16 bits")
    out = a.astype(np.float16)
    t.release()
    return out


@dataclass
class LayerwiseReport:
    source: str
    path: str
    method: str
    bits: int
    group_size: int
    act_order: bool
    sym: bool
    checkpoint_format: str
    bytes: int
    n_linears: int
    calibration: dict
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    layers: list[dict] = field(default_factory=list)  # per layer: GPTQ and round-to-nearest errors
    tensors: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        from dataclasses import asdict
        return asdict(self)


def quantization_config(opts: GPTQOptions, calib: dict) -> dict:
    if opts.method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": opts.group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": None,
                "meta": {"quantizer": [f"qconvert:{__version__}"], "calibration": calib}}
    return {"bits": opts.bits, "group_size": opts.group_size, "desc_act": False, "sym": opts.sym,
            "lm_head": False, "quant_method": "gptq", "checkpoint_format": opts.checkpoint_format,
            "format": opts.checkpoint_format,
            "pack_dtype": "int32", "damp_percent": opts.damp, "true_sequential": True,
            "static_groups": opts.act_order,
            "meta": {"quantizer": [f"qconvert:{__version__}"], "act_order": opts.act_order,
                     "damp_percent": opts.damp, "calibration": calib}}


def write_configs(plan: LayerwisePlan, directory: Path, qcfg: dict) -> None:
    src = plan.ckpt.path
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


def run_layerwise(plan: LayerwisePlan, tokens: np.ndarray, dataset: str, threads: int,
                  progress: Callable[[int, int], None] | None = None) -> LayerwiseReport:
    import torch

    from qconvert.arch.forward import hidden_states
    from qconvert.quant.blocks import first_nonfinite
    from qconvert.quant.gptq import gptq
    from qconvert.writers.gptq import gptq_tensors
    from qconvert.pipeline import peak_rss_bytes

    start = time.perf_counter()
    opts = plan.opts
    torch.set_num_threads(max(1, threads))
    calib = {"dataset": dataset, "samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1])}
    report = LayerwiseReport(str(plan.ckpt.source), str(plan.path), opts.method, opts.bits, opts.group_size,
                             opts.act_order, opts.sym, opts.checkpoint_format, 0, len(plan.linears), calib)
    out = AtomicDir(plan.path, plan.force, opts.method, OWN_FILES)
    writer = ShardedWriter(out.tmp, plan.entries, opts.max_shard_bytes,
                           {"format": "pt", "quantizer": f"qconvert {__version__}"})
    produced: dict[str, np.ndarray] = {}
    errors: dict[int, list] = {}
    state: dict = {"x": None, "H": None}

    def flush(upto_layer: int) -> None:
        """Write every planned tensor up to the end of `upto_layer`, in plan order."""
        while writer.pos < len(writer.order):
            e = writer.order[writer.pos][1]
            if plan.layer_of[e.name] > upto_layer:
                return
            data = produced.pop(e.name) if e.name in produced else _f16(e.name, plan.copies[e.name])
            writer.write(e.name, data)

    def hook(fw, hf: str, x) -> None:
        lin = plan.linears[hf]
        if state["x"] is not x:  # q/k/v (and gate/up) share their input: one Hessian
            X = x.reshape(-1, x.shape[-1]).float()
            state["x"], state["H"] = x, (X.T @ X) * (2.0 / X.shape[0])
        W = fw.linear_weight(hf).float()
        bad = first_nonfinite(W.numpy())
        if bad >= 0:
            raise InputError(f"{plan.ckpt.path}: tensor {lin.name}.weight has a non-finite value at flat index {bad}")
        r = gptq(W, state["H"], opts.bits, opts.group_size, opts.sym, opts.act_order, opts.damp)
        fw.set_linear_weight(hf, r.weight)
        for k, v in gptq_tensors(r, opts.bits, v2=not opts.sym).items():
            produced[f"{lin.name}.{k}"] = v
        errors.setdefault(lin.layer, []).append({"name": lin.name, "gptq": r.error, "rtn": r.rtn_error,
                                                 "damp": r.damp})

    def on_layer(done: int, total: int) -> None:
        state["x"] = state["H"] = None
        if opts.method == "awq":
            awq_layer(plan, fw, done - 1, captured, produced, errors)
            captured.clear()
        flush(done - 1)
        if progress:
            progress(done, total)

    captured: dict = {}

    def capture(fw, hf: str, x) -> None:
        captured[hf] = x

    try:
        flush(-1)  # embeddings and whatever precedes the decoder layers
        fw = plan.family.forward()
        fw.hook = capture if opts.method == "awq" else hook
        hidden_states(fw, torch.from_numpy(tokens), progress=on_layer, batch=len(tokens))
        flush(1 << 30)
        writer.finish()
        write_configs(plan, out.tmp, quantization_config(opts, calib))
        out.commit()
    except BaseException:
        writer.abort()
        out.abort()
        raise
    finally:
        plan.ckpt.close()
    report.bytes = sum(f.stat().st_size for f in plan.path.iterdir())
    for layer in sorted(errors):
        es = errors[layer]
        if opts.method == "awq":
            report.layers.append({"layer": layer, "groups": es})
        else:
            report.layers.append({"layer": layer, "gptq_error": sum(e["gptq"] for e in es),
                                  "rtn_error": sum(e["rtn"] for e in es), "linears": es})
    report.tensors = [{"name": e.name, "dtype": e.dtype, "shape": list(e.shape)} for e in plan.entries]
    report.seconds = round(time.perf_counter() - start, 3)
    report.peak_rss_bytes = peak_rss_bytes()
    return report


NO_CLIP = ("q_proj", "k_proj", "query", "key", "c_attn", "qkv")  # AutoAWQ leaves queries and keys unclipped


def awq_layer(plan: LayerwisePlan, fw, i: int, captured: dict, produced: dict, errors: dict) -> None:
    """AWQ for decoder layer i from its linears' captured float inputs; fills `produced`."""
    import torch

    from qconvert.arch.forward import samples_within
    from qconvert.quant import awq
    from qconvert.writers.awq import awq_tensors

    hook, fw.hook = fw.hook, None
    g = plan.opts.group_size
    modified: set[str] = set()
    # sequences per forward of an inspected block, by its widest input (float32)
    widest = max(t.shape[-1] for t in captured.values())
    rows = samples_within(4 * widest * next(iter(captured.values())).shape[1])
    try:
        for group in fw.scale_groups(i):
            x = captured[group.linears[0]]
            originals = [fw.linear_weight(hf).clone() for hf in group.linears]
            inspect = group.inspect or (lambda t, hf=group.linears[0]: fw.apply_linear(hf, t))

            def run(weights, xs, group=group, inspect=inspect):
                for hf, w in zip(group.linears, weights):
                    fw.set_linear_weight(hf, w)
                return torch.cat([inspect(xs[j:j + rows]) for j in range(0, len(xs), rows)])
            try:
                s, ratio = awq.best_scale(x, originals, g, run)
            except FloatingPointError as e:
                names = ", ".join(plan.linears[hf].name for hf in group.linears)
                raise InputError(f"{plan.ckpt.path}: AWQ scale search for {names}: {e}") from None
            for hf, w in zip(group.linears, originals):
                fw.set_linear_weight(hf, w * s)
            kind, name = group.prev
            if kind == "norm":
                fw.set(name, fw.w(name) / s)
                modified.add(name)
            elif kind == "norm1p":  # Gemma's (1 + w) norms
                fw.set(name, (1 + fw.w(name)) / s - 1)
                modified.add(name)
            elif kind == "act":  # a new scale after the activation (act(x) / s)
                fw.set(name, s.clone())
                modified.add(name)
            elif kind == "layernorm":
                for part in (".weight", ".bias"):
                    fw.set(name + part, fw.w(name + part) / s)
                    modified.add(name + part)
            else:  # a linear before: its output rows (the consumers' input channels) take 1/s
                w = fw.linear_weight(name).clone()
                w[-len(s):] /= s[:, None]
                fw.set_linear_weight(name, w)
                if fw.has(name + ".bias"):
                    b = fw.w(name + ".bias").clone()
                    b[-len(s):] /= s
                    fw.set(name + ".bias", b)
                    modified.add(name + ".bias")
            scaled = x / s
            for hf in group.linears:
                captured[hf] = scaled
            errors.setdefault(i, []).append({"linears": [plan.linears[hf].name for hf in group.linears],
                                             "ratio": ratio})
        for hf in [hf for hf in plan.linears if plan.linears[hf].layer == i]:
            w = fw.linear_weight(hf)
            if not hf.rsplit(".", 1)[-1].startswith(NO_CLIP):
                w = awq.apply_clip(w, awq.best_clip(w, captured[hf], g), g)
            for k, v in awq_tensors(awq.quantize(w, g)).items():
                produced[f"{plan.linears[hf].name}.{k}"] = v
        for name in modified:
            out = plan.names.get(name, name)
            produced[out] = _f16(out, _Array(fw.w(name)))
    finally:
        fw.hook = hook
        fw.clear()


class _Array:
    """A torch tensor where _f16 expects a checkpoint tensor."""

    dtype = "F32"

    def __init__(self, t):
        self.t = t

    def array(self):
        return self.t.numpy()

    def release(self) -> None:
        pass
