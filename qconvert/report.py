"""What a job did, for the terminal and for --json: inputs, every output (path, size, sha256, and
what a checkpoint method reports per layer), the calibration passes, time and peak memory."""
from __future__ import annotations

import resource
from dataclasses import dataclass, field

import numpy as np

from qconvert import __version__
from qconvert.checkpoint import CheckpointPlan
from qconvert.read.quantized import DequantizedLinear
from qconvert.model import Model
from qconvert.plan import Plan
from qconvert.quant import blocks


@dataclass
class Report:
    source: str
    model_dir: str
    architecture: str
    revision: str | None
    inputs: list[dict]
    outputs: list[dict] = field(default_factory=list)
    n_params: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    threads: int = 1
    backend: str = blocks.BACKEND
    kernels: str = field(default_factory=blocks.backend_description)
    dry_run: bool = False
    tensors: list[dict] = field(default_factory=list)  # the GGUF outputs' tensors
    calibration: dict | None = None  # samples, and the passes that ran over them
    source_quantization: dict | None = None  # a quantized source: its method and the linears decoded as read

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["qconvert_version"] = __version__
        return d


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def describe(model: Model, plan: Plan | None, checkpoints: list[CheckpointPlan], targets: list, threads: int,
             dry_run: bool) -> Report:
    """The report of a planned job: every output with its planned size."""
    ckpt = model.ckpt
    n_params = plan.n_params if plan is not None else \
        sum(int(np.prod(t.shape, dtype=np.int64)) for t in ckpt.tensors.values())
    r = Report(source=ckpt.source, model_dir=str(ckpt.path), architecture=ckpt.config.architecture(),
               revision=ckpt.revision, inputs=[{"path": str(p), "bytes": p.stat().st_size} for p in ckpt.weight_files],
               n_params=n_params, threads=threads, dry_run=dry_run)
    if model.kind not in ("float", "gguf"):
        q = ckpt.config.data.get("quantization_config") or {}
        decoded = sum(isinstance(t, DequantizedLinear) for t in ckpt.tensors.values())
        r.source_quantization = {"quant_method": model.kind, "format": q.get("format") or q.get("checkpoint_format"),
                                 "linears": decoded}
    cps = iter(checkpoints)
    gguf_outputs = iter(plan.outputs if plan is not None else [])
    for t in targets:
        if t.kind == "gguf":
            o = next(gguf_outputs)
            r.outputs.append({"target": o.recipe.name, "kind": "gguf", "path": str(o.path), "bytes": o.file_size,
                              "tensor_bytes": o.tensor_bytes, "tensors": len(o.types),
                              "bits_per_weight": round(o.tensor_bytes * 8 / max(plan.n_params, 1), 4),
                              "sha256": None})
        else:
            cp = next(cps)
            o = cp.opts
            r.outputs.append({"target": t.name, "kind": "checkpoint", "path": str(cp.path), "bytes": cp.total_bytes,
                              "sha256": None, "method": o.method, "bits": o.bits, "group_size": o.group_size,
                              "act_order": o.act_order if o.method == "gptq" or (o.method == "w8a8" and o.gptq) else False,
                              "sym": o.sym if o.method == "gptq" else False,
                              "clip": o.clip if o.method == "awq" else False,
                              "scales": _scales(o),
                              "dtype": o.dtype if o.per_tensor else "F16",
                              **({"smoothing": o.smoothing, "gptq": o.gptq} if o.method == "w8a8" else {}),
                              **({"double_quant": o.double_quant, "compute_dtype": o.compute_dtype}
                                 if o.method in ("nf4", "fp4") else {}),
                              **({"expert_min_tokens": o.expert_min_tokens}
                                 if o.method in ("gptq", "awq") and cp.model.family.n_experts else {}),
                              "checkpoint_format": o.checkpoint_format, "n_linears": len(cp.linears),
                              "tensors": [{"name": e.name, "dtype": e.dtype, "shape": list(e.shape)} for e in cp.entries]})
    if plan is not None:
        for i, t in enumerate(plan.tensors):
            r.tensors.append({"name": t.name, "source": t.hf_name, "shape": list(t.shape[::-1]),
                              "types": [o.types[i].name for o in plan.outputs],
                              "bytes": [o.infos[i].nbytes for o in plan.outputs]})
    return r


def _scales(o) -> str | None:
    """How a checkpoint's scales are laid out, where bits and group size do not say it."""
    if o.method in ("nf4", "fp4"):
        return f"absmax per {o.group_size}" + (", double-quantized" if o.double_quant else "")
    if o.method == "int8":
        return "per row"
    if o.method == "quanto-int8":
        return "per channel"
    if o.method == "quanto-int4":
        return "scale and shift per 128 (or per channel)"
    if o.method == "hqq":
        return f"{o.bits}-bit, scale and zero per {o.group_size}"
    if o.per_tensor or o.method == "w8a8":
        return "per channel" if o.group_size == -1 else f"{o.group_size} x {o.group_size} blocks"
    return None
