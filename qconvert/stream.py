"""GGUF files streamed one tensor at a time, for every GGUF output at once: each checkpoint
tensor is read once (memory-mapped, in row chunks when no transform needs the whole tensor),
checked for NaN/Inf, converted to every output's type for it and appended to every file; its
pages are then dropped, so memory holds about one chunk, not the model."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterator

import numpy as np

from qconvert.arch.spec import PlannedTensor
from qconvert.errors import InputError
from qconvert.plan import Plan
from qconvert.quant import blocks

CHUNK_ELEMENTS = 1 << 22  # rows are streamed in chunks of about 16 MB of float32


def write_gguf(plan: Plan, threads: int, progress: Callable[[str, int, int], None] | None) -> list:
    """Every GGUF output, one read of each tensor for all of them; complete, not yet in place."""
    writers = [o.writer() for o in plan.outputs]
    what = f"writing {len(writers)} GGUF file{'s' if len(writers) > 1 else ''}"
    done = 0
    try:
        for w in writers:
            w.open()
        for i, t in enumerate(plan.tensors):
            # tensors already quantized (--method gptq's spill): written whole, the chunks still
            # read for the other outputs and for the checks
            spilled = [o.feedback is not None and t.name in o.feedback.spill for o in plan.outputs]
            # outputs of the type the source already holds copy its bytes (MXFP4 experts)
            native = [t.native is not None and o.types[i].name == t.native for o in plan.outputs]
            for o, w, s, n in zip(plan.outputs, writers, spilled, native):
                w.begin_tensor(t.name)
                if s:
                    w.write(o.feedback.spill.get(t.name))
                elif n:
                    for part in t.parts or (t.source,):
                        w.write(part.gguf_bytes())
            spilled = [s or n for s, n in zip(spilled, native)]
            row = 0
            for chunk in float_chunks(t, threads):
                amax = max(float(chunk.max()), -float(chunk.min())) if chunk.size else 0.0
                for o, w, s in zip(plan.outputs, writers, spilled):
                    if amax >= o.types[i].overflow:
                        raise InputError(f"tensor {t.hf_name!r} holds {amax:.4g}, beyond what {o.types[i].name} can "
                                         f"store for --to {o.recipe.name}; use --to bf16 or f32")
                    if not s:
                        w.write(o.types[i].quantize(chunk, threads, chunk_weights(o.weights[i], t, row)))
                done += chunk.size
                row += chunk.shape[0]
                if progress:
                    progress(what, done, plan.n_params)
            for w in writers:
                w.end_tensor()
        for w in writers:
            w.result = w.finish(commit=False)  # type: ignore[attr-defined]
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return writers


def chunk_weights(weights: np.ndarray | None, t: PlannedTensor, row: int) -> np.ndarray | None:
    """A chunk's importance weights: the tensor's row of them, or, for experts stacked in a 3-D
    tensor (one row of weights per expert, as llama-imatrix keeps them), the row of the expert
    the chunk starting at `row` belongs to (chunks never span experts)."""
    if weights is None or weights.ndim == 1:
        return weights
    return weights[row // t.shape[-2]]


def float_chunks(t: PlannedTensor, threads: int) -> Iterator[np.ndarray]:
    """The tensor's final float32 data as 2-D row chunks, checked for NaN/Inf; stacked experts
    one after the other, no chunk spanning two."""
    if t.source is None:
        assert t.make is not None
        yield _checked(t, np.ascontiguousarray(t.make(), dtype=np.float32).reshape(_rows2d(t.shape)), 0)
        return
    if t.parts:
        for part in t.parts:
            yield from float_chunks(replace(t, source=part, parts=(), shape=t.shape[1:]), threads)
        return
    src = t.source
    raw = src.array()
    if t.rows is not None:
        raw = raw[: t.rows]
    if t.transform is not None:
        data = t.transform(blocks.to_float32(src.dtype, raw, threads), src.dtype)
        data = np.ascontiguousarray(data, dtype=np.float32).reshape(_rows2d(t.shape))
        src.release()
        per = t.shape[-2] if len(t.shape) == 3 else data.shape[0]  # chunks never span a 3-D tensor's matrices
        for m0 in range(0, data.shape[0], per):
            for r0, r1 in _row_ranges(data[m0:m0 + per]):
                yield _checked(t, data[m0 + r0:m0 + r1], m0 + r0)
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
