"""read -> plan -> (calibrate) -> quantize -> write. The whole job, one tensor at a time.

Each checkpoint tensor is read once (memory-mapped, in row chunks when no transform needs the
whole tensor), checked for NaN/Inf, converted to every requested output's type and appended to
every output file; its pages are then dropped, so memory holds about one chunk, not the model.
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from qconvert import __version__
from qconvert.arch.base import PlannedTensor
from qconvert.errors import InputError, Interrupted
from qconvert.plan import Plan, make_plan
from qconvert.writers.atomic import remove_dirs
from qconvert.quant import blocks
from qconvert.quant.recipes import Overrides, Recipe
from qconvert.calibrate import imatrix as imatrix_mod
from qconvert.calibrate import text
from qconvert.read.imatrix import load_imatrix

CHUNK_ELEMENTS = 1 << 22  # rows are streamed in chunks of about 16 MB of float32

Progress = Callable[[int, str], None]  # (elements done so far, current tensor name)


@dataclass
class CalibrationOptions:
    text: Path | None = None  # None: the text that ships with qconvert
    samples: int = 32
    seq_len: int = 512
    seed: int = 0
    exact: bool = False  # float32 matrix products in the calibration forward instead of int8
    progress: Callable[[int, int], None] | None = None  # (layers done, layers)


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
    dry_run: bool = False
    tensors: list[dict] = field(default_factory=list)
    calibration: dict | None = None

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["qconvert_version"] = __version__
        return d


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def convert(source: str, recipes: list[Recipe], output: Path | None = None, revision: str | None = None,
            force: bool = False, threads: int = 1, dry_run: bool = False,
            progress: Callable[[Plan], Progress] | None = None, overrides: Overrides | None = None,
            imatrix: Path | None = None, calibration: CalibrationOptions | None = None) -> Report:
    """`imatrix`: a llama.cpp importance matrix file for the mixtures; `calibration`: compute one
    (one layer-streamed pass over calibration text) when a mixture has none; neither: plain RTN."""
    start = time.perf_counter()
    im = load_imatrix(imatrix) if imatrix is not None else None
    plan = make_plan(source, recipes, output, revision, force, dry_run, overrides, im,
                     calibrate=im is None and calibration is not None)
    try:
        report = describe(plan, threads, dry_run)
        if not dry_run and plan.needs_calibration:
            assert calibration is not None
            calib = text.samples(plan.ckpt.path, calibration.text, calibration.samples, calibration.seq_len,
                                 calibration.seed, plan.bos_for_calibration(), plan.family.max_positions())
            made, _ = imatrix_mod.collect(plan.family, calib, threads, calibration.progress,
                                          path=Path("qconvert:calibration"), int8=not calibration.exact)
            plan.use_imatrix(made)
            report.calibration = {"dataset": calib.dataset, "samples": int(calib.tokens.shape[0]),
                                  "seq_len": int(calib.tokens.shape[1]), "entries": len(made.entries),
                                  "products": "float32" if calibration.exact else "int8"}
        if not dry_run:
            write(plan, threads, progress(plan) if progress else None)
            for o, entry in zip(plan.outputs, report.outputs):
                entry["bytes"], entry["sha256"] = o.writer.result  # type: ignore[attr-defined]
    except BaseException:
        remove_dirs(plan.created_dirs)
        raise
    finally:
        plan.ckpt.close()
    report.seconds = round(time.perf_counter() - start, 3)
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def describe(plan: Plan, threads: int, dry_run: bool) -> Report:
    ckpt = plan.ckpt
    r = Report(source=ckpt.source, model_dir=str(ckpt.path), architecture=ckpt.config.architecture(),
               revision=ckpt.revision, inputs=[{"path": str(p), "bytes": p.stat().st_size} for p in ckpt.weight_files],
               n_params=plan.n_params, threads=threads, dry_run=dry_run)
    for o in plan.outputs:
        r.outputs.append({"path": str(o.path), "target": o.recipe.name, "bytes": o.writer.file_size,
                          "tensor_bytes": o.tensor_bytes, "tensors": len(o.types),
                          "bits_per_weight": round(o.tensor_bytes * 8 / max(plan.n_params, 1), 4),
                          "sha256": None})
    for i, t in enumerate(plan.tensors):
        r.tensors.append({"name": t.name, "source": t.hf_name, "shape": list(t.shape[::-1]),
                          "types": [o.types[i].name for o in plan.outputs],
                          "bytes": [o.writer.tensors[i].nbytes for o in plan.outputs]})
    return r


def write(plan: Plan, threads: int, progress: Progress | None) -> None:
    writers = [o.writer for o in plan.outputs]
    done = 0
    try:
        for w in writers:
            w.open()
        for i, t in enumerate(plan.tensors):
            for w in writers:
                w.begin_tensor(t.name)
            for chunk in float_chunks(t, threads):
                amax = max(float(chunk.max()), -float(chunk.min())) if chunk.size else 0.0
                for o in plan.outputs:
                    if amax >= o.types[i].overflow:
                        raise InputError(f"tensor {t.hf_name!r} holds {amax:.4g}, beyond what {o.types[i].name} can "
                                         f"store for --to {o.recipe.name}; use --to bf16 or f32")
                    o.writer.write(o.types[i].quantize(chunk, threads, o.weights[i]))
                done += chunk.size
                if progress:
                    progress(done, t.name)
            for w in writers:
                w.end_tensor()
        for w in writers:
            w.result = w.finish()  # type: ignore[attr-defined]
    except KeyboardInterrupt:
        for w in writers:
            w.abort()
        raise Interrupted("interrupted; no output was left behind") from None
    except BaseException:
        for w in writers:
            w.abort()
        raise


def float_chunks(t: PlannedTensor, threads: int) -> Iterator[np.ndarray]:
    """The tensor's final float32 data as 2-D row chunks, checked for NaN/Inf."""
    if t.source is None:
        assert t.make is not None
        yield _checked(t, np.ascontiguousarray(t.make(), dtype=np.float32).reshape(_rows2d(t.shape)), 0)
        return
    src = t.source
    raw = src.array()
    if t.rows is not None:
        raw = raw[: t.rows]
    if t.transform is not None:
        data = t.transform(blocks.to_float32(src.dtype, raw, threads), src.dtype)
        data = np.ascontiguousarray(data, dtype=np.float32).reshape(_rows2d(t.shape))
        src.release()
        for r0, r1 in _row_ranges(data):
            yield _checked(t, data[r0:r1], r0)
        return
    rows = raw.reshape(_rows2d(t.shape))
    for r0, r1 in _row_ranges(rows):
        yield _checked(t, blocks.to_float32(src.dtype, rows[r0:r1], threads), r0)
        src.release()


def _rows2d(shape: tuple[int, ...]) -> tuple[int, int]:
    n = shape[-1] if shape else 1
    return (int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1, n)


def _row_ranges(a: np.ndarray) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(a.shape[1], 1))
    for r0 in range(0, a.shape[0], step):
        yield r0, min(r0 + step, a.shape[0])


def _checked(t: PlannedTensor, chunk: np.ndarray, row0: int) -> np.ndarray:
    at = blocks.first_nonfinite(chunk)
    if at >= 0:
        row, col = divmod(at, chunk.shape[1])
        value = chunk.reshape(-1)[at]
        where = getattr(getattr(t.source, "file", None), "path", None)
        prefix = f"{where}: " if where else ""
        raise InputError(f"{prefix}tensor {t.hf_name!r} has {value} at row {row0 + row}, column {col}; "
                         "refusing to write a broken model")
    return chunk
