"""The whole job, for any mix of targets:

    open the model -> plan every output (metadata only: all problems found here)
      -> calibration passes (the layer loop, each method an observer) -> stream the GGUF files
      -> every output into place -> report

GGUF files share one read of each tensor (memory-mapped, in row chunks) and one importance
matrix; each calibrated checkpoint method runs its own pass over the calibration samples,
because their maths differ (the importance matrix's forward uses int8 products, GPTQ's feeds the
quantized layer's output forward, AWQ's the float one); a per-tensor method (FP8) reads each
linear once and quantizes it from its weight alone. Outputs appear only when every one is complete;
a failure or an interruption leaves none behind.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from qconvert.calibrate import imatrix as imatrix_mod
from qconvert.calibrate import text
from qconvert.calibrate.awq import AWQObserver
from qconvert.calibrate.driver import native_bf16, native_int8, run_layers
from qconvert.calibrate.parallel import Parallel
from qconvert.calibrate.gptq import GPTQObserver
from qconvert.calibrate.w8a8 import W8A8Observer
from qconvert.checkpoint import CheckpointOptions, CheckpointPlan, CheckpointWriter, largest_magnitude, plan_checkpoint
from qconvert.errors import InputError, Interrupted, UsageError
from qconvert.layouts import TORCH_DTYPES, from_numpy, to_numpy
from qconvert.model import Model, open_model
from qconvert.plan import Plan, make_plan, model_label
from qconvert.quant import bnb, fp8
from qconvert.quant.blocks import to_float32
from qconvert.quant.recipes import Overrides
from qconvert.read.imatrix import load_imatrix
from qconvert.report import Report, describe, peak_rss_bytes
from qconvert.stream import write_gguf
from qconvert.targets import Target, output_paths
from qconvert.writers.atomic import check_replaceable_file, remove_dirs, remove_stale

Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass
class CalibrationOptions:
    text: Path | None = None  # None: the text that ships with qconvert
    samples: int = 32
    seq_len: int = 512
    seed: int = 0
    exact: bool = False  # float32 matrix products in the calibration forwards (not int8, not bfloat16)


@dataclass
class Job:
    source: str
    targets: list[Target]
    output: Path | None = None
    revision: str | None = None
    force: bool = False
    threads: int = 1
    dry_run: bool = False
    overrides: Overrides | None = None  # llama-quantize's per-tensor options, for the GGUF mixtures
    imatrix: Path | None = None  # an importance matrix file for the mixtures
    no_calib: bool = False  # the mixtures round to nearest, as llama-quantize without --imatrix
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    checkpoint: CheckpointOptions = field(default_factory=CheckpointOptions)  # method set per target
    parallel: Parallel = field(default_factory=Parallel)  # the calibration over workers (--workers, --ray)
    # the GGUF mixtures' rounding: "imatrix" (llama-quantize's, importance-weighted to nearest) or
    # "gptq" (error feedback through each layer's Hessian, quant/feedback.py); --damp, --act-order
    method: str = "imatrix"
    method_damp: float = 0.01


def convert(job: Job, progress: Progress | None = None) -> Report:
    """The whole job, for any mix of targets; outputs appear together, when all are complete."""
    start = time.perf_counter()
    im = load_imatrix(job.imatrix) if job.imatrix is not None else None
    model = open_model(job.source, job.revision)
    plan: Plan | None = None
    written: list = []
    try:
        # plan: metadata only, every problem found before any compute
        paths = output_paths(model_label(model.ckpt), job.targets, job.output)
        ggufs = [(t.recipe, p) for t, p in zip(job.targets, paths) if t.kind == "gguf"]
        if ggufs:
            plan = make_plan(model, [r for r, _ in ggufs], [p for _, p in ggufs], job.force, job.dry_run,
                             job.overrides, im, calibrate=im is None and not job.no_calib)
        checkpoints = [plan_checkpoint(model, p, job.force, replace(job.checkpoint, method=t.name))
                       for t, p in zip(job.targets, paths) if t.kind == "checkpoint"]
        check_spread(model, job, checkpoints)
        feedback_outputs = check_method(model, job, plan)
        report = describe(model, plan, checkpoints, job.targets, job.threads, job.dry_run)
        if job.dry_run:
            return report
        # calibrate and write: one importance matrix for the GGUF mixtures, one pass per method
        torch.set_num_threads(max(1, job.threads))
        samples = None
        if any(not cp.opts.per_tensor for cp in checkpoints) or (plan is not None and plan.needs_calibration) \
                or feedback_outputs:
            c = job.calibration
            samples = text.samples(model.ckpt.path, c.text, c.samples, c.seq_len, c.seed, model.bos,
                                   model.family.max_positions())
        passes = []
        spread = (model, job.revision, job.parallel) if job.parallel.spread and samples is not None else None
        with job.parallel.connected() if spread else contextlib.nullcontext():
            if plan is not None:
                if plan.needs_calibration and not feedback_outputs:
                    passes.append(imatrix_pass(model, plan, samples, job.calibration.exact, job.threads, progress,
                                               spread))
                for o in feedback_outputs:
                    passes.append(feedback_pass(model, plan, o, samples, job, progress, spread))
                    if o.weights is None:  # no --imatrix: the pass's own statistics are the file's matrix
                        o.use_imatrix(plan.tensors, o.feedback.imatrix(samples))
                written += write_gguf(plan, job.threads, progress)
                for o, w in zip(plan.outputs, written[-len(plan.outputs):]):
                    if o.feedback is not None:
                        w.report = {"rounding": "gptq", "layers": o.feedback.report()}
            for cp in checkpoints:
                if cp.opts.per_tensor:
                    written.append(tensor_pass(model, cp, progress))
                    continue
                writer, done = checkpoint_pass(model, cp, samples, job.calibration.exact, progress, spread,
                                               job.threads)
                written.append(writer)
                passes.append(done)
        for w in written:  # every output into place, together
            w.commit()
    except BaseException as e:
        for w in written:
            w.abort()
        if plan is not None:
            plan.close_spills()
            remove_dirs(plan.created_dirs)
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted("interrupted; no output was left behind") from None
        raise
    finally:
        if plan is not None:
            plan.close_spills()
        model.close()
    results = {str(w.path): w for w in written}
    for entry in report.outputs:
        w = results[entry["path"]]
        entry["bytes"], entry["sha256"] = w.result
        entry.update(getattr(w, "report", {}))
    if samples is not None:
        report.calibration = {"dataset": samples.dataset, "samples": int(samples.tokens.shape[0]),
                              "seq_len": int(samples.tokens.shape[1]), "passes": passes}
    report.seconds = round(time.perf_counter() - start, 3)
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def check_spread(model: Model, job: Job, checkpoints: list[CheckpointPlan]) -> None:
    """--workers / --ray: refused, before any compute, for the methods whose calibration does not
    yet run over workers."""
    if not job.parallel.spread:
        return
    for cp in checkpoints:
        method = cp.opts.method
        if cp.opts.per_tensor:
            continue
        if model.family.n_experts:
            raise UsageError(f"--to {method}: a mixture of experts' {method.upper()} calibration does not run over "
                             "workers yet (each worker's tokens reach other experts); leave out --workers/--ray")


def check_method(model: Model, job: Job, plan: Plan | None) -> list:
    """`--method gptq`: the GGUF mixtures it rounds (all the job's), refused before any compute
    where it cannot run."""
    if job.method == "imatrix":
        return []
    if job.method != "gptq":
        raise UsageError(f"--method: unknown rounding {job.method!r}; known: imatrix, gptq")
    mixtures = [o for o in plan.outputs if o.recipe.quantizes_like_llama_quantize] if plan is not None else []
    if not mixtures:
        raise UsageError("--method gptq applies to the GGUF mixtures (q4_k_m, iq4_xs, ...), none of which is chosen")
    if not 0 < job.method_damp < 1:
        raise UsageError(f"--damp must be between 0 and 1, got {job.method_damp}")
    if job.no_calib:
        raise UsageError("--method gptq rounds through the Hessians of calibration inputs: leave out --no-calib")
    if model.family.n_experts:
        raise UsageError("--method gptq: a mixture of experts' GGUF files are not yet rounded with error feedback "
                         "(its experts' stacked tensors); leave out --method")
    return mixtures


def feedback_pass(model: Model, plan: Plan, o, samples: text.Calibration, job: Job, progress: Progress | None,
                  spread=None) -> dict:
    """One GGUF mixture's layer loop with error feedback (calibrate/feedback.py): its decoder
    linears quantized into a spill file, which write_gguf() then writes in their place. Without
    --imatrix no importance-matrix pass runs first: each linear's block scales are searched with
    its own input's mean squares (diag(H) / 2, on the quantized layers' outputs), and those are
    the matrix the file records."""
    from qconvert.calibrate.feedback import FeedbackObserver
    t = time.perf_counter()
    observer = FeedbackObserver(plan, o, job.method_damp, job.checkpoint.act_order, job.threads)
    o.feedback = observer
    products, where = layer_loop(model, observer, samples, job.calibration.exact, spread, job.threads,
                                 _labelled(progress, f"{o.recipe.name.upper()}: rounding layers with error feedback"))
    return {"method": "gptq", "targets": [o.recipe.name], "forward": products, "feeds": observer.feeds,
            "tensors": len(observer.tensors), **({"kept_nearest": observer.kept} if observer.kept else {}),
            **_spread_report(where), "seconds": round(time.perf_counter() - t, 3)}


def _spread_report(where: dict | None) -> dict:
    return {"workers": where} if where else {}


def imatrix_pass(model: Model, plan: Plan, samples: text.Calibration, exact: bool, threads: int,
                 progress: Progress | None, spread=None) -> dict:
    """The float model (int8 products unless `exact`) with the importance matrix's collector;
    the GGUF mixtures get its weights."""
    t = time.perf_counter()
    int8 = not exact and native_int8()
    made, rec = imatrix_mod.collect(model.family, samples, threads, _labelled(progress, "calibrating"),
                                    path=Path("qconvert:calibration"), int8=int8, spread=spread)
    served = plan.use_imatrix(made)
    return {"method": "imatrix", "targets": [o.recipe.name for o in served],
            "forward": "int8" if int8 else "float32", "feeds": imatrix_mod.Collector.feeds, "entries": len(made.entries),
            **unreached_experts(rec), **_spread_report(rec.where), "seconds": round(time.perf_counter() - t, 3)}


def unreached_experts(rec) -> dict:
    """Experts no calibration token was routed to: their importance is 1 for every column, as
    llama-quantize gives an expert whose count is 0 (llama-imatrix writes such entries as
    partial data)."""
    missed = rec.unreached()
    return {"experts_unreached": [f"{name} expert {e}" for name, e in missed]} if missed else {}


OBSERVERS = {"gptq": GPTQObserver, "awq": AWQObserver, "w8a8": W8A8Observer}  # a checkpoint method's observer of the layer loop


def checkpoint_pass(model: Model, cp: CheckpointPlan, samples: text.Calibration, exact: bool,
                    progress: Progress | None, spread=None, threads: int = 1) -> tuple[CheckpointWriter, dict]:
    """The layer loop with the method's observer, writing the checkpoint as each layer is
    quantized; the directory is complete, not yet in place. The forward's products are the
    method's fast ones where this CPU has them, float32 when `exact`. `spread`: (model,
    revision, parallel.Parallel) to run the samples over workers."""
    t = time.perf_counter()
    method = cp.opts.method
    writer = CheckpointWriter(cp)
    try:
        observer = OBSERVERS[method](writer)
        writer.flush(-1)  # embeddings and whatever precedes the decoder layers
        products, where = layer_loop(model, observer, samples, exact, spread, threads,
                                     _labelled(progress, f"{method.upper()}: quantizing layers"))
        calib = {"dataset": samples.dataset, "samples": int(samples.tokens.shape[0]),
                 "seq_len": int(samples.tokens.shape[1])}
        writer.finish(calib)
    except BaseException:
        writer.abort()
        raise
    writer.report = {"layers": observer.report(), "calibration": calib}
    return writer, {"method": method, "targets": [method], "forward": products,
                    "feeds": observer.feeds, **_spread_report(where),
                    "seconds": round(time.perf_counter() - t, 3)}


def layer_loop(model: Model, observer, samples: text.Calibration, exact: bool, spread, threads: int,
               label: Callable[[int, int], None] | None) -> tuple[str, dict | None]:
    """A layer-wise method's pass over the samples, here or over workers (`spread`): (the
    products the forward ran, where the samples ran). The forward's products are the method's
    fast ones where this CPU has them, float32 when `exact`."""
    fw = model.forward()
    fast = observer.fast_products
    products = fw.use_products("float32" if exact or (fast == "bfloat16" and not native_bf16()) else fast)
    if spread is None:
        run_layers(fw, torch.from_numpy(samples.tokens), (observer.observer(len(samples.tokens)),), label)
        return products, None
    from qconvert.calibrate import parallel
    return products, parallel.run(spread[0], spread[1], samples.tokens, observer.handle, observer.part,
                                  observer.part_args(len(samples.tokens)), products, spread[2], threads, label)


def _fp8(quantize, block):
    def run(w: torch.Tensor, cp: CheckpointPlan) -> tuple[dict, torch.Tensor]:
        q, s = quantize(w)
        return cp.opts.layout.pack(to_numpy(q), to_numpy(s), None, None, cp.opts.params), fp8.dequantize(q, s, block)
    return run


def _bnb_4bit(w: torch.Tensor, cp: CheckpointPlan) -> tuple[dict, torch.Tensor]:
    p = cp.opts.params
    parts = bnb.quantize_linear_4bit(w, p.group_size, p.kind, p.double_quant)
    state = bnb.read_state(parts[f"weight.quant_state.bitsandbytes__{p.kind}"].numpy())
    return {k: v.numpy() for k, v in parts.items()}, bnb.dequantize_4bit(parts, state)


def _bnb_int8(w: torch.Tensor, cp: CheckpointPlan) -> tuple[dict, torch.Tensor]:
    big = largest_magnitude(w)
    if big > 65504:  # LLM.int8() quantizes the float16 weight
        raise InputError(f"{cp.model.ckpt.path}: a weight value {big:g} is beyond float16's range, which "
                         "bitsandbytes' int8 quantizes from")
    codes, scb = bnb.quantize_int8(w)
    return ({"weight": codes.numpy(), "SCB": scb.numpy(), "weight_format": np.zeros((), np.uint8)},
            bnb.dequantize_int8(codes, scb))


def _by_layout(w: torch.Tensor, cp: CheckpointPlan) -> tuple[dict, torch.Tensor]:
    """A layout that quantizes a weight itself (HQQ, quanto)."""
    return cp.opts.layout.quantized(w, cp.opts.params)


# a per-tensor method in a format: (weight [N, K] in the checkpoint's dtype, plan) -> (the linear's
# tensors by the name after its prefix, its dequantized weight)
TENSOR_METHODS = {("fp8", "compressed-tensors"): _fp8(fp8.channel, None),
                  ("fp8-block", "compressed-tensors"): _fp8(fp8.blockwise, (128, 128)),
                  ("fp8-block", "hf-fp8"): _fp8(fp8.transformers_blockwise, (128, 128)),
                  ("nf4", "bitsandbytes"): _bnb_4bit, ("fp4", "bitsandbytes"): _bnb_4bit,
                  ("int8", "bitsandbytes"): _bnb_int8, ("hqq", "hqq"): _by_layout,
                  ("quanto-int4", "quanto"): _by_layout, ("quanto-int8", "quanto"): _by_layout}


def tensor_pass(model: Model, cp: CheckpointPlan, progress: Progress | None) -> CheckpointWriter:
    """Each decoder layer's linears quantized from their weights alone, one tensor in memory at
    a time, and written as each layer is done; the directory is complete, not yet in place. The
    report gives each linear's relative squared error, |W - W'|^2 / |W|^2."""
    method = cp.opts.method
    quantize = TENSOR_METHODS[method, cp.opts.format]
    writer = CheckpointWriter(cp)
    tensors = cp.model.ckpt.tensors
    by_layer: dict[int, list] = {}
    for lin in cp.linears.values():
        by_layer.setdefault(lin.layer, []).append(lin)
    n = max(by_layer) + 1
    try:
        writer.flush(-1)
        for i in range(n):
            for lin in by_layer.get(i, []):
                t = tensors[lin.name + ".weight"]
                w = from_checkpoint(t, cp.opts.dtype)
                parts, dequantized = quantize(w, cp)
                w32 = w.float()
                diff = dequantized.to(torch.float32, copy=True).sub_(w32)
                norm = torch.linalg.vector_norm
                err = float(norm(diff) ** 2 / (norm(w32) ** 2).clamp(min=1e-30))
                for k, v in parts.items():
                    writer.add(f"{lin.name}.{k}", v)
                writer.layers.setdefault(i, []).append({"name": lin.name, "error": round(err, 9)})
                t.release()
            writer.flush(i)
            if progress:
                progress(f"{method.upper()}: quantizing layers", i + 1, n)
        writer.finish(None)
    except BaseException:
        writer.abort()
        raise
    writer.report = {"layers": [{"layer": i, "linears": es} for i, es in sorted(writer.layers.items())]}
    return writer


def from_checkpoint(t, dtype: str) -> torch.Tensor:
    """A float checkpoint tensor as torch in `dtype` (its own, or float32 for float64), refusing
    NaN and infinity."""
    a = to_float32(t.dtype, t.array()) if t.dtype != dtype else t.array()
    w = from_numpy(a, dtype if t.dtype == dtype else "F32")
    if w.dtype != TORCH_DTYPES[dtype]:
        w = w.to(TORCH_DTYPES[dtype])
    if w.numel() and not bool(torch.isfinite(torch.stack([w.amax(), w.amin()])).all()):  # NaN and inf show there
        bad = ~torch.isfinite(w)
        raise InputError(f"{t.name}: non-finite value at flat index {int(bad.flatten().nonzero()[0])}")
    return w


def _labelled(progress: Progress | None, what: str) -> Callable[[int, int], None] | None:
    return (lambda done, total: progress(what, done, total)) if progress else None


def make_imatrix(source: str, output: Path | None, calibration: CalibrationOptions, threads: int, force: bool,
                 revision: str | None = None, progress: Progress | None = None,
                 parallel: Parallel | None = None) -> dict:
    """`qconvert imatrix`: one calibration pass, written in llama.cpp's GGUF imatrix format."""
    start = time.perf_counter()
    model = open_model(source, revision)
    try:
        model.family.check_tokenizer()
        path = output or Path.cwd() / f"{model_label(model.ckpt)}.imatrix.gguf"
        check_replaceable_file(path, force)
        remove_stale(path)
        samples = text.samples(model.ckpt.path, calibration.text, calibration.samples, calibration.seq_len,
                               calibration.seed, model.bos, model.family.max_positions())
        spread = (model, revision, parallel) if parallel is not None and parallel.spread else None
        int8 = not calibration.exact and native_int8()
        with parallel.connected() if spread else contextlib.nullcontext():
            _, rec = imatrix_mod.collect(model.family, samples, threads, _labelled(progress, "calibrating"),
                                         int8=int8, spread=spread)
        size, sha = imatrix_mod.write_imatrix(path, rec, [samples.dataset], *samples.tokens.shape, force=force)
    except KeyboardInterrupt:
        raise Interrupted("interrupted; no output was left behind") from None
    finally:
        model.close()
    return {"path": str(path), "bytes": size, "sha256": sha, "entries": len(rec.sums), **unreached_experts(rec),
            **_spread_report(rec.where),
            "dataset": samples.dataset,
            "samples": int(samples.tokens.shape[0]), "seq_len": int(samples.tokens.shape[1]),
            "products": "int8" if int8 else "float32", "seconds": round(time.perf_counter() - start, 3),
            "peak_rss_bytes": peak_rss_bytes()}
