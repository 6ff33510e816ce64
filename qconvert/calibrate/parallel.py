"""Data-parallel calibration: one model's calibration samples split over worker processes on
this machine (`--workers N`) or Ray actors on a cluster (`--ray`).

Every worker opens the model itself (the same path, or the hub cache, on its node), holds its
share of the samples (whole calibration units, driver.UNIT samples each) and runs the layer loop
on them with the method's statistics part as its observer. Where the method needs statistics
over every sample (a GPTQ Hessian before a linear is quantized; the importance matrix's sums at
a layer's end), each worker sends its share to this process, which sums the shares, runs the
method and sends back what the workers apply (the quantized weight), in lockstep. Hidden states
stay in the workers: only statistics, weights and the token ids cross between processes.

The result does not depend on the number of workers: a unit's activations do not (batches never
split a unit, and the products are the same for every batch holding it), and statistics are
summed per unit and then over units in one pairwise tree fixed by the unit numbers (Tree): a
worker sums the whole subtrees its units make, this process the rest of the same tree.
"""
from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import queue
import signal
import threading
import traceback
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from qconvert import errors
from qconvert.calibrate.driver import ALLOCATOR, UNIT, Progress, run_layers

Block = tuple[int, int, Any]  # (first unit, number of units: a power of two, aligned to it; the sum)


class Tree:
    """Sums of per-unit values in the pairwise tree over unit numbers (node [lo, lo + 2^k) =
    [lo, lo + 2^(k-1)) + the rest, lo a multiple of 2^k). Units arrive in increasing order; a
    unit may arrive in several parts (its batches), which are added in arrival order. blocks()
    gives the maximal whole subtrees seen (at most log2(units) + 1 values held at once)."""

    def __init__(self) -> None:
        self.stack: list[list] = []  # [lo, size, value]: each a whole subtree
        self.open: list | None = None  # [unit, value] still receiving parts

    def add(self, unit: int, value: Any) -> None:
        if self.open is not None and self.open[0] == unit:
            self.open[1] += value
            return
        self._close()
        self.open = [unit, value]

    def at(self, unit: int, make: Callable[[], Any]) -> Any:
        """The value of `unit`, to add its parts into in place; make() starts it."""
        if self.open is None or self.open[0] != unit:
            self._close()
            self.open = [unit, make()]
        return self.open[1]

    def _close(self) -> None:
        if self.open is None:
            return
        unit, value = self.open
        self.open = None
        if self.stack and self.stack[-1][0] + self.stack[-1][1] > unit:
            raise ValueError(f"calibration unit {unit} after a later one")
        self.stack.append([unit, 1, value])
        while len(self.stack) > 1:
            (lo, size, left), (lo2, size2, right) = self.stack[-2], self.stack[-1]
            if size != size2 or lo % (2 * size) or lo2 != lo + size:
                break
            left += right  # the tree's node: its left half plus its right
            self.stack[-2:] = [[lo, 2 * size, left]]

    def blocks(self) -> list[Block]:
        self._close()
        return [tuple(b) for b in self.stack]


def total(shares: list[list[Block]]) -> Any:
    """The tree's root over the blocks of every share (none where no unit contributed): the same
    value however the units were shared, as long as each block is a whole subtree."""
    blocks: dict[tuple[int, int], Any] = {}
    for share in shares:
        for lo, size, value in share:
            if (lo, size) in blocks:
                raise ValueError(f"calibration units {lo}..{lo + size - 1} summed twice")
            blocks[lo, size] = value
    if not blocks:
        return None
    end = max(lo + size for lo, size in blocks)
    top = 1 << max(0, math.ceil(math.log2(end)))

    def node(lo: int, size: int) -> Any:
        if (lo, size) in blocks:
            return blocks.pop((lo, size))
        if size == 1 or lo >= end:
            return None
        left, right = node(lo, size // 2), node(lo + size // 2, size // 2)
        if left is None or right is None:
            return right if left is None else left
        left += right
        return left
    root = node(0, top)
    if blocks:
        raise ValueError(f"calibration units {sorted(blocks)} overlap others")
    return root


def shares(samples: int, workers: int) -> list[tuple[int, int]]:
    """Each worker's units [first, last), as even as whole units allow; at most one worker per
    unit."""
    units = -(-samples // UNIT)
    n = max(1, min(workers, units))
    return [(w * units // n, (w + 1) * units // n) for w in range(n)]


# ---- workers ----

Send = Callable[[Any, str, Any, Any], Any]  # (forward, kind, key, payload) -> the reply


@dataclass
class WorkerSpec:
    source: str
    revision: str | None
    tokens: np.ndarray  # the worker's samples [n, T]
    first_unit: int
    threads: int
    products: str  # the forward's matrix products
    method: str  # a key of PARTS
    args: dict = field(default_factory=dict)


def _parts() -> dict[str, Callable[..., Any]]:
    from qconvert.calibrate.awq import AWQStatistics
    from qconvert.calibrate.gptq import GPTQStatistics
    from qconvert.calibrate.imatrix import Collector
    return {"imatrix": lambda family, send: Collector(family, send),
            "gptq": lambda family, send, **a: GPTQStatistics(send=send, **a),
            "awq": lambda family, send, **a: AWQStatistics(send=send, **a)}


class Worker:
    """One share of the samples through the layer loop, in a thread; step(reply) hands the
    loop the reply to its last message and returns its next: (kind, key, payload), ending with
    ("done", ...) or ("error", error class name, message)."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.messages: queue.Queue = queue.Queue()
        self.replies: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None

    def step(self, reply: Any = None) -> tuple:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, daemon=True, name="qconvert calibration worker")
            self.thread.start()
        else:
            self.replies.put(reply)
        return self.messages.get()

    def _send(self, fw, kind: str, key: Any, payload: Any) -> Any:  # noqa: ARG002 - the forward stays here
        self.messages.put((kind, key, payload))
        return self.replies.get()

    def _run(self) -> None:
        from qconvert.model import open_model
        s = self.spec
        try:
            torch.set_num_threads(max(1, s.threads))
            model = open_model(s.source, s.revision)
            try:
                fw = model.forward()
                fw.use_products(s.products)
                part = _parts()[s.method](model.family, self._send, **s.args)
                run_layers(fw, torch.from_numpy(s.tokens), (part,), first_unit=s.first_unit)
            finally:
                model.close()
            self.messages.put(("done", None, None))
        except errors.QConvertError as e:
            self.messages.put(("error", type(e).__name__, str(e)))
        except BaseException as e:  # noqa: BLE001 - reported to the driver, which raises it
            detail = f"\n{traceback.format_exc()}" if os.environ.get("QCONVERT_DEBUG") else ""
            self.messages.put(("error", "InternalError", f"{type(e).__name__}: {e}{detail}"))


def _process_main(conn) -> None:  # pragma: no cover - runs in the worker process
    from qconvert.batch import die_with_parent
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver stops its workers itself
    die_with_parent()
    if not os.environ.get("QCONVERT_DEBUG"):  # the libraries' chatter once is enough (the driver's)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
    reply = None
    try:
        w = Worker(conn.recv())
        while True:
            msg = w.step(reply)
            conn.send(msg)
            if msg[0] in ("done", "error"):
                return
            reply = conn.recv()
    except (EOFError, OSError):  # the driver stopped: nothing of ours to clean up
        return


class LocalPool:
    """Workers as processes on this machine."""

    def __init__(self, specs: list[WorkerSpec]):
        ctx = multiprocessing.get_context("spawn")  # not fork: torch's thread pools do not survive it
        self.conns, self.procs = [], []
        for _ in specs:
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_process_main, args=(theirs,), daemon=True, name="qconvert-worker")
            p.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(p)
        # the spec (the samples) through the pipe, not the start: a child killed while starting
        # would leave the start writing to it for ever
        self.lost: set[int] = set()
        self._send(specs)
        self.started = False
        self.where = "local processes"

    def _send(self, messages: list) -> None:
        for i, (c, m) in enumerate(zip(self.conns, messages)):
            try:
                c.send(m)
            except OSError:
                self.lost.add(i)

    def step(self, replies: list) -> list[tuple]:
        if self.started:
            self._send(replies)
        self.started = True
        out = []
        for i, (c, p) in enumerate(zip(self.conns, self.procs)):
            try:
                if i in self.lost:
                    raise EOFError
                out.append(c.recv())
            except (EOFError, OSError):
                p.join(timeout=1)
                out.append(("error", "WorkerLost", "a calibration worker process ended before its share was done "
                                                   f"(exit code {p.exitcode})"))
                break
        return out

    def close(self, finished: bool) -> None:
        """Finished: the workers have sent their last message and end by themselves; otherwise
        (an error, an interruption) they are stopped at once: they hold nothing to keep."""
        for c in self.conns:
            c.close()
        for p in self.procs:
            p.join(timeout=10 if finished else 0)
            if p.is_alive():
                p.kill()
                p.join()


class RayPool:
    """Workers as Ray actors, each asking for its threads as CPUs."""

    def __init__(self, specs: list[WorkerSpec], ray):
        self.ray = ray

        class _Actor:
            def __init__(self, spec):
                self.worker = Worker(spec)

            def step(self, reply):
                return self.worker.step(reply)
        actor = ray.remote(_Actor)
        self.actors = [actor.options(num_cpus=s.threads, name=None, max_restarts=0).remote(s) for s in specs]
        self.where = "Ray actors"

    def step(self, replies: list) -> list[tuple]:
        from ray import exceptions as rx
        try:
            return self.ray.get([a.step.remote(r) for a, r in zip(self.actors, replies)])
        except rx.RayError as e:
            return [("error", "WorkerLost", f"a calibration worker (Ray actor) was lost ({type(e).__name__})")]

    def close(self, finished: bool) -> None:  # noqa: ARG002 - an actor holds nothing to keep
        for a in self.actors:
            self.ray.kill(a)


@dataclass
class Parallel:
    """How one model's calibration runs: here (workers 1, no Ray), or over worker processes or
    Ray actors."""

    workers: int = 1
    ray: str | None = None  # None: this machine; "local", "auto" or a cluster's address
    _ray: Any = field(default=None, repr=False)  # the connected ray module, within connected()

    @property
    def spread(self) -> bool:
        return self.workers > 1 or self.ray is not None

    @contextlib.contextmanager
    def connected(self):
        """One connection to the Ray cluster for every pass of a job (nothing to do locally)."""
        if self.ray is None or self._ray is not None:
            yield
            return
        from qconvert.cluster import ray_cluster
        with ray_cluster(self.ray) as ray:
            self._ray = ray
            try:
                yield
            finally:
                self._ray = None


def run(model, revision: str | None, tokens: np.ndarray, handle: Callable[[Any, str, Any, list], Any], method: str,
        args: dict, products: str, parallel: Parallel, threads: int, progress: Progress | None = None) -> dict:
    """The layer loop over workers: each worker's messages, in lockstep, go to `handle(forward,
    kind, key, payloads)` (the forward holds this process's copy of the layer's weights, read
    as handle asks for them); its reply goes back to every worker. `threads` are shared among
    the workers; on Ray each worker asks for its share as CPUs (at most a node's), and
    --workers defaults to one per node. Returns where it ran."""
    local = Path(model.source)
    source = str(local.resolve()) if local.exists() else model.source  # a hub id: each node's own cache

    def specs(workers: int, most: int = 0) -> tuple[list[WorkerSpec], list[tuple[int, int]]]:
        split = shares(len(tokens), workers)
        each = max(1, threads // len(split))
        each = min(each, most) if most else each
        return [WorkerSpec(source, revision, np.ascontiguousarray(tokens[a * UNIT:b * UNIT]), a, each, products,
                           method, args) for a, b in split], split
    if parallel.ray is None:
        made, split = specs(parallel.workers)
        return _drive(LocalPool(made), model, handle, progress, split)
    from qconvert.cluster import node_resources
    with parallel.connected():
        ray = parallel._ray
        most, _, nodes = node_resources(ray)
        made, split = specs(parallel.workers if parallel.workers > 1 else nodes, most)
        return _drive(RayPool(made, ray), model, handle, progress, split)


def _drive(pool, model, handle, progress: Progress | None, split: list[tuple[int, int]]) -> dict:
    fw = model.forward()
    layers = model.family.n_layers
    finished = False
    try:
        replies: list = [None] * len(split)
        while True:
            msgs = pool.step(replies)
            for m in msgs:
                if m[0] == "error":
                    raise _error(m[1], f"{model.ckpt.path}: {m[2]}" if m[1] == "WorkerLost" else m[2])
            kind, key = msgs[0][0], msgs[0][1]
            if any((m[0], m[1]) != (kind, key) for m in msgs):
                got = ", ".join(f"{m[0]} {m[1]}" for m in msgs)
                raise errors.InputError(f"{model.ckpt.path}: the calibration workers left lockstep ({got}): "
                                        "this model's layers do not run the same linears for every sample")
            if kind == "done":
                finished = True
                break
            reply = handle(fw, kind, key, [m[2] for m in msgs])
            if kind == "end":
                fw.clear()
                if progress:
                    progress(key + 1, layers)
                ALLOCATOR.release()
            replies = [reply] * len(split)
    finally:
        pool.close(finished)
    return {"workers": len(split), "where": pool.where, "units": [list(s) for s in split]}


def _error(kind: str, message: str) -> Exception:
    cls = getattr(errors, kind, None)  # WorkerLost among them
    if isinstance(cls, type) and issubclass(cls, errors.QConvertError):
        return cls(message)
    return RuntimeError(f"calibration worker: {message}")
