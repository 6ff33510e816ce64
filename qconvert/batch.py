"""`qconvert batch JOBS`: many models, each to its targets, as one resumable run.

    read the jobs file (every problem in it found before anything runs)
      -> the manifest: a job whose outputs are recorded there, unchanged, is skipped
      -> each remaining job is one `qconvert convert` process (one read of its checkpoint for all
         its targets, exactly the single command's bytes), side by side as memory allows, or a Ray
         task whose CPUs and memory are the same estimate
      -> each finished job's outputs and their sha256 into the manifest, at once
      -> one summary

A job runs as a process of its own, not in this one: a job that dies (killed, out of memory)
takes nothing else with it, its memory goes back when it ends, and its partial outputs are what
a single command leaves (none: the next attempt removes a killed run's temporary files). A job
that failed for a reason that a second attempt can cure (its process was killed, its Ray worker
or node was lost, it was interrupted from outside) is retried; one that failed because of its
input or output (exit codes 2, 3, 4, 1) is reported, and the others go on.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qconvert.errors import Interrupted, UsageError

MANIFEST_VERSION = 1
BASE_BYTES = 500 * 10 ** 6  # a job's floor: the interpreter, torch, numpy and qconvert (tiny models peak there)
# a calibration worker lost, interrupted, or killed (SIGKILL / SIGTERM) through a shell or a container
TRANSIENT_CODES = {6, 130, 137, 143}
# keys of a job; options hold the convert command's long option names
KEYS = ("source", "to", "output", "revision", "options")
# the batch sets these for every job itself
RESERVED = {"to", "output", "revision", "json", "quiet", "dry-run", "force", "threads", "help"}


@dataclass
class Flag:
    """One long option of `qconvert convert`: its name and how a value becomes arguments."""
    name: str  # without the dashes
    takes_value: bool
    negative: str | None = None  # "--no-clip" for a boolean pair
    repeatable: bool = False
    param: str = ""  # the command's parameter it sets ("fmt" for --format)
    path: bool = False  # a file the job reads (--calib, --imatrix): made absolute, as the source is


@dataclass
class BatchJob:
    index: int  # 1-based, in the file's order
    where: str  # "jobs.jsonl:3", for messages
    source: str
    to: str
    output: Path
    revision: str | None
    options: dict[str, Any]
    args: list[str]  # the options as command-line arguments

    @property
    def key(self) -> str:
        """What the job makes: a finished job is recorded under this, so editing a job (another
        target, another option) makes it a new one."""
        what = {"source": self.source, "to": self.to, "output": str(self.output), "revision": self.revision,
                "options": self.options}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def argv(self, threads: int, force: bool) -> list[str]:
        out = ["convert", self.source, "--to", self.to, "-o", str(self.output), "--json", "-j", str(threads)]
        if self.revision:
            out += ["--revision", self.revision]
        return out + self.args + (["--force"] if force else [])


@dataclass
class Outcome:
    job: BatchJob
    status: str = "pending"  # done, skipped (finished before, verified), failed
    attempts: int = 0
    seconds: float = 0.0
    exit_code: int | None = None
    error: str | None = None
    outputs: list[dict] = field(default_factory=list)  # path, bytes, sha256
    estimate_bytes: int = 0
    peak_rss_bytes: int | None = None
    where: str = ""  # the machine it ran on (Ray: the node's host name)
    started: float | None = None  # the last attempt's, time.time()
    ended: float | None = None
    report: dict | None = None  # the job's own --json report, when it ran in this batch

    def as_dict(self) -> dict:
        j = self.job
        return {"job": j.index, "source": j.source, "to": j.to, "output": str(j.output), "status": self.status,
                "attempts": self.attempts, "seconds": round(self.seconds, 3), "exit_code": self.exit_code,
                "error": self.error, "outputs": self.outputs, "estimate_bytes": self.estimate_bytes,
                "peak_rss_bytes": self.peak_rss_bytes, "ran_on": self.where or None,
                "started": _iso(self.started), "ended": _iso(self.ended), "report": self.report}


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


# ---- the jobs file -----------------------------------------------------------------------------

def read_jobs(path: Path, flags: dict[str, Flag]) -> list[BatchJob]:
    """JSON Lines (one object per line; blank lines and lines starting with # ignored) or YAML
    (a list of mappings, or a mapping whose `jobs` is one), by the file's suffix."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"{path}: cannot read the jobs file ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: the jobs file is not UTF-8 text") from None
    entries: list[tuple[str, Any]] = []
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UsageError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        if isinstance(data, dict) and "jobs" in data:
            data = data["jobs"]
        if not isinstance(data, list):
            raise UsageError(f"{path}: a YAML jobs file is a list of jobs (or a mapping with a 'jobs' list)")
        entries = [(f"{path}: job {i}", d) for i, d in enumerate(data, 1)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                entries.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{n}: not a JSON object ({e.msg}, column {e.colno})") from None
    if not entries:
        raise UsageError(f"{path}: no jobs in the file")
    jobs = [_job(i, where, d, flags) for i, (where, d) in enumerate(entries, 1)]
    seen: dict[Path, str] = {}
    for j in jobs:
        if j.output in seen:
            raise UsageError(f"{j.where}: output {j.output} is also {seen[j.output]}'s; each job needs its own")
        seen[j.output] = j.where
    return jobs


def _job(index: int, where: str, d: Any, flags: dict[str, Flag]) -> BatchJob:
    from qconvert import targets

    if not isinstance(d, dict):
        raise UsageError(f"{where}: a job is an object with the keys {', '.join(KEYS)}")
    unknown = sorted(set(d) - set(KEYS))
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r}; a job has {', '.join(KEYS)}")
    for key in ("source", "to", "output"):
        if not d.get(key):
            raise UsageError(f"{where}: '{key}' is missing")
    to = d["to"]
    if isinstance(to, list) and all(isinstance(t, str) for t in to):
        to = ",".join(to)
    if not isinstance(to, str) or not isinstance(d["source"], str) or not isinstance(d["output"], str):
        raise UsageError(f"{where}: 'source' and 'output' are strings, 'to' a string or a list of them")
    try:
        chosen = targets.parse(to)
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None
    revision = d.get("revision")
    if revision is not None and not isinstance(revision, str):
        raise UsageError(f"{where}: 'revision' is a string or null")
    options = d.get("options") or {}
    if not isinstance(options, dict):
        raise UsageError(f"{where}: 'options' is an object of the convert command's long option names")
    args, given, named = [], {}, {}
    for name, value in options.items():
        name = str(name).lstrip("-")
        flag = flags.get(name)
        if flag is not None and flag.path and isinstance(value, str):
            value = str(Path(value).expanduser().resolve())  # the same file whichever directory a worker starts in
        named[name] = value
        arg, param = _option_args(where, name, value, flags)
        args += arg
        if param is not None:
            given[param] = "--" + name
    options = named
    for name in ("calib-samples", "calib-seq-len"):  # the memory estimate reads them
        if name in options and (isinstance(options[name], bool) or not isinstance(options[name], int)
                                or options[name] < 1):
            raise UsageError(f"{where}: option {name!r} is a positive whole number")
    try:
        targets.check_options(chosen, given)
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None
    source = d["source"]
    local = Path(source).expanduser()
    if local.exists() or source.startswith((".", "/", "~")):
        source = str(local.resolve())  # the same directory whichever directory a worker starts in
    return BatchJob(index, where, source, ",".join(t.name for t in chosen), Path(d["output"]).expanduser().resolve(),
                    revision, options, args)


def _option_args(where: str, name: str, value: Any, flags: dict[str, Flag]) -> tuple[list[str], str | None]:
    """An option's value as arguments of `qconvert convert`, and the parameter it sets."""
    if name in RESERVED:
        raise UsageError(f"{where}: option {name!r} is the batch's to set (use the job's own keys, or batch's "
                         "--force / --threads)")
    for flag in flags.values():
        if flag.negative == "--" + name:  # "no-clip": true is the same as "clip": false
            if not isinstance(value, bool):
                raise UsageError(f"{where}: option {name!r} is true or false")
            name, value = flag.name, not value
            break
    flag = flags.get(name)
    if flag is None:
        close = sorted(flags, key=lambda f: _distance(f, name))[:1]
        raise UsageError(f"{where}: unknown option {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    param = flag.param or name.replace("-", "_")
    if not flag.takes_value:
        if not isinstance(value, bool):
            raise UsageError(f"{where}: option {name!r} is true or false")
        if value:
            return [f"--{name}"], param
        if flag.negative is None:
            return [], None  # an off switch left off
        return [flag.negative], param
    values = value if isinstance(value, list) and flag.repeatable else [value]
    out = []
    for v in values:
        if isinstance(v, (dict, list)) or v is None or isinstance(v, bool):
            raise UsageError(f"{where}: option {name!r} takes " + ("a value or a list of values" if flag.repeatable
                                                                    else "one value"))
        out += [f"--{name}", str(v)]
    return out, param


def _distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


# ---- the manifest ------------------------------------------------------------------------------

def output_sha256(path: Path) -> str | None:
    """A file's sha256, a checkpoint directory's as its report gives it; None where it is gone."""
    from qconvert.checkpoint import file_sha256, tree_sha256

    try:
        if path.is_dir():
            return tree_sha256(path)
        return file_sha256(path).hex() if path.is_file() else None
    except OSError:
        return None


class Manifest:
    """What finished, and each output's sha256: a JSON file rewritten (atomically) whenever a job
    finishes, so an interrupted batch resumes where it stopped."""

    def __init__(self, path: Path):
        self.path = path
        self.jobs: dict[str, dict] = {}
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("version") != MANIFEST_VERSION or not isinstance(data.get("jobs"), dict) or not all(
                        isinstance(e, dict) and isinstance(e.get("outputs"), list) and all(
                            isinstance(o, dict) and isinstance(o.get("path"), str) and isinstance(o.get("sha256"), str)
                            for o in e["outputs"]) for e in data["jobs"].values()):
                    raise ValueError("not a qconvert batch manifest")
            except (OSError, ValueError, AttributeError) as e:
                raise UsageError(f"{path}: cannot read the batch manifest ({e}); move it away to start afresh") from None
            self.jobs = data["jobs"]

    def verify(self, job: BatchJob) -> tuple[bool, str | None]:
        """(recorded, problem): recorded and unchanged is (True, None)."""
        entry = self.jobs.get(job.key)
        if entry is None:
            return False, None
        for o in entry["outputs"]:
            now = output_sha256(Path(o["path"]))
            if now is None:
                return True, f"{o['path']} is gone since the batch recorded it"
            if now != o["sha256"]:
                return True, f"{o['path']} changed since the batch recorded it (sha256 {now[:12]}…, recorded " \
                             f"{o['sha256'][:12]}…)"
        return True, None

    def record(self, job: BatchJob, outcome: Outcome) -> None:
        self.jobs[job.key] = {"source": job.source, "to": job.to, "output": str(job.output), "revision": job.revision,
                              "options": job.options, "outputs": outcome.outputs,
                              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "seconds": round(outcome.seconds, 3), "peak_rss_bytes": outcome.peak_rss_bytes}
        self.save()

    def save(self) -> None:
        from qconvert.writers.atomic import output_error, temporary

        tmp = temporary(self.path, "partial")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"version": MANIFEST_VERSION, "jobs": self.jobs}, indent=1) + "\n",
                           encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise output_error(self.path, e) from None


# ---- memory ------------------------------------------------------------------------------------

def estimate_peak_bytes(job: BatchJob) -> int:
    """A job's peak memory, from its checkpoint's headers and config (nothing read but those):
    the floor, the largest tensor in float32 twice (read and converted), and with calibration a
    decoder layer's weights twice and the samples' hidden states four times over (in, out, the
    residual and a batch's temporaries), and for each local calibration worker (--workers) the
    floor and a layer's weights twice more (the hidden states are shared among them). Meant to be above the measured peak (bench/batch.py
    prints both); a source that cannot be opened gets the floor, and its job then fails with its
    own message."""
    from qconvert import targets
    from qconvert.read.checkpoint import open_checkpoint

    where = _local_copy(job.source, job.revision)
    if where is None:
        return BASE_BYTES
    try:
        ckpt = open_checkpoint(where)
    except Exception:
        return BASE_BYTES
    try:
        sizes = {name: int(np.prod(t.shape, dtype=np.int64)) for name, t in ckpt.tensors.items()}
        hidden = ckpt.config.data.get("hidden_size") or ckpt.config.data.get("n_embd") or 0
    finally:
        ckpt.close()
    estimate = BASE_BYTES + 2 * 4 * max(sizes.values(), default=0)
    chosen = targets.parse(job.to)
    # the mixtures' (--method gptq calibrates with an importance matrix file too)
    uncalibrated = (job.options.get("no-calib") is True or "imatrix" in job.options) and \
        job.options.get("method") != "gptq"
    calibrated = any(t.calibration == "always" or (t.calibration == "default" and not uncalibrated) for t in chosen)
    if calibrated:
        layer = sum(n for name, n in sizes.items() if ".layers.0." in name or ".h.0." in name)
        tokens = int(job.options.get("calib-samples", 32)) * int(job.options.get("calib-seq-len", 512))
        estimate += 2 * 4 * layer + 4 * 4 * tokens * int(hidden)
        workers = int(job.options.get("workers", 1))
        if workers > 1 and "ray" not in job.options:  # each worker process: the floor and a layer
            estimate += workers * (BASE_BYTES + 2 * 4 * layer)
    return int(estimate)


def _local_copy(source: str, revision: str | None) -> str | None:
    """The source's directory, or a hub id's snapshot in the local cache: never a download (the
    job downloads it when it runs, on whichever machine runs it)."""
    if Path(source).expanduser().is_dir():
        return source
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(source, revision=revision, local_files_only=True)
    except Exception:  # not in the cache, or not a hub id: the job will say which
        return None


def available_memory() -> int:
    """What this machine (or its container) can give jobs now: MemAvailable, or less where a
    cgroup's limit says so."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(avail, 0)


# ---- one job, one process ----------------------------------------------------------------------

def die_with_parent() -> None:  # pragma: no cover - runs in the child
    """The job's process ends when the process that started it does (a lost Ray worker, a
    killed batch) instead of writing on as an orphan."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def remove_partials(output: Path) -> None:
    """The temporary outputs of the job's runs that ended without removing them: beside its
    output (a file or directory of one target) and inside it (a directory of several)."""
    from qconvert.writers.atomic import remove_stale, remove_stale_in

    remove_stale(output)
    if output.is_dir():
        remove_stale_in(output)


def job_command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "qconvert", *argv]


def run_job_process(argv: list[str]) -> tuple[int, str, str, str, float]:
    """Run one `qconvert convert` to its end: (exit code, stdout, stderr, host, when it started).
    What a Ray task runs on its worker."""
    import socket

    started = time.time()
    outf, errf = _spool(), _spool()
    p = subprocess.Popen(job_command(argv), stdout=outf, stderr=errf, preexec_fn=die_with_parent,
                         start_new_session=True)
    try:
        p.wait()
    except BaseException:  # Ray's cancel: interrupted as Ctrl-C would, so the job removes its partial outputs
        _stop([p])
        raise
    return p.returncode, _read(outf), _read(errf), socket.gethostname(), started


def finish(outcome: Outcome, rc: int, stdout: str, stderr: str) -> bool:
    """Read a finished process into `outcome`; True when another attempt may succeed."""
    outcome.exit_code = rc
    if rc == 0:
        try:
            report = json.loads(stdout)
            outcome.outputs = [{"path": o["path"], "bytes": o["bytes"], "sha256": o["sha256"]}
                               for o in report["outputs"]]
            outcome.peak_rss_bytes = report.get("peak_rss_bytes")
            outcome.report = report
        except (ValueError, KeyError, TypeError):
            outcome.status, outcome.exit_code = "failed", 1
            outcome.error = "the job's report could not be read: " + " ".join(stdout.split())[:200]
            return False
        outcome.status, outcome.error = "done", None
        return False
    outcome.status = "failed"
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        outcome.error = f"the job's process was killed ({name})" + ("; out of memory?" if -rc == signal.SIGKILL else "")
        return True
    outcome.error = lines[-1].split("error:", 1)[-1].strip() if lines else f"exit code {rc}"
    return rc in TRANSIENT_CODES


# ---- the batch ---------------------------------------------------------------------------------

@dataclass
class BatchOptions:
    parallel: int = 0  # jobs at once; 0: as cores and memory allow
    threads: int = 0  # per job; 0: the cores shared among the jobs at once
    memory: int = 0  # bytes the jobs may use together; 0: what the machine has available now
    retries: int = 2  # more attempts for a job that failed for a transient reason
    force: bool = False
    ray: str | None = None  # None: this machine; "local", "auto" or a cluster's address


Events = Callable[[str, Outcome], None]  # ("start" | "retry" | "end", outcome)


def plan_batch(jobs: list[BatchJob], manifest: Manifest, force: bool) -> list[Outcome]:
    """Each job's outcome so far: skipped where the manifest holds it unchanged; a recorded job
    whose outputs changed is a failure unless --force (then it is made again)."""
    out = []
    for j in jobs:
        o = Outcome(j)
        recorded, problem = manifest.verify(j)
        if recorded and problem is None:
            o.status = "skipped"
            o.outputs = manifest.jobs[j.key]["outputs"]
        elif recorded and not force:
            o.status, o.exit_code = "failed", 4
            o.error = problem + "; --force makes it again"
        out.append(o)
    return out


def run_batch(outcomes: list[Outcome], manifest: Manifest, opts: BatchOptions, cores: int,
              events: Events | None = None) -> None:
    events = events or (lambda what, o: None)
    todo = [o for o in outcomes if o.status == "pending"]
    if not todo:
        return
    manifest.save()  # where it cannot be written, say so before any job runs
    for o in todo:
        o.estimate_bytes = estimate_peak_bytes(o.job)
    if opts.ray is not None:
        _run_ray(todo, manifest, opts, cores, events)
    else:
        _run_local(todo, manifest, opts, cores, events)


def _ended(o: Outcome, transient: bool, manifest: Manifest, opts: BatchOptions, events: Events) -> bool:
    """Book-keeping after an attempt; True when the job goes back in the queue."""
    o.ended = time.time()
    if o.status == "done":
        manifest.record(o.job, o)
    elif transient and o.attempts <= opts.retries:
        events("retry", o)
        o.status = "pending"
        return True
    else:
        remove_partials(o.job.output)  # a killed process could not remove its own
    events("end", o)
    return False


def _run_local(todo: list[Outcome], manifest: Manifest, opts: BatchOptions, cores: int, events: Events) -> None:
    budget = opts.memory or available_memory()
    at_once = opts.parallel or (max(1, cores // opts.threads) if opts.threads else cores)
    if not opts.parallel:  # no more side by side than memory holds, so the cores go to those that run
        at_once = min(at_once, max(1, budget // max(o.estimate_bytes for o in todo)))
    at_once = max(1, min(at_once, len(todo)))
    threads = opts.threads or max(1, cores // at_once)
    queue = list(todo)
    running: dict[subprocess.Popen, tuple[Outcome, float, Any, Any]] = {}
    try:
        while queue or running:
            # start what fits: in order, while slots and memory last; a job too big for the
            # budget runs when it would run alone
            while queue and len(running) < at_once:
                o = queue[0]
                used = sum(r[0].estimate_bytes for r in running.values())
                if running and used + o.estimate_bytes > budget:
                    break
                queue.pop(0)
                o.status, o.attempts, o.started = "running", o.attempts + 1, time.time()
                outf, errf = _spool(), _spool()
                # a session of its own: a terminal's Ctrl-C reaches the batch, which stops each job once
                p = subprocess.Popen(job_command(o.job.argv(threads, opts.force)), stdout=outf,
                                     stderr=errf, preexec_fn=die_with_parent, start_new_session=True)
                running[p] = (o, time.perf_counter(), outf, errf)
                events("start", o)
            time.sleep(0.05)
            for p in [p for p in running if p.poll() is not None]:
                o, t0, outf, errf = running.pop(p)
                o.seconds += time.perf_counter() - t0
                transient = finish(o, p.returncode, _read(outf), _read(errf))
                if _ended(o, transient, manifest, opts, events):
                    queue.insert(0, o)
    except BaseException:
        _stop(list(running))
        for o, *_ in running.values():
            o.status, o.error, o.exit_code = "failed", "interrupted", 130
            remove_partials(o.job.output)
        raise


def _spool():
    import tempfile

    return tempfile.TemporaryFile(mode="w+", encoding="utf-8")


def _read(f) -> str:
    f.seek(0)
    text = f.read()
    f.close()
    return text


def _stop(procs: list[subprocess.Popen]) -> None:
    """Stop the jobs still running (SIGTERM: each removes its partial outputs, as a single
    command does) and wait for them; one that has not ended in 30 s is killed."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _run_ray(todo: list[Outcome], manifest: Manifest, opts: BatchOptions, cores: int, events: Events) -> None:
    from qconvert.cluster import node_resources, ray_cluster

    with ray_cluster(opts.ray) as ray:
        _run_ray_tasks(ray, todo, opts, manifest, events, *node_resources(ray)[:2])


def _run_ray_tasks(ray, todo: list[Outcome], opts: BatchOptions, manifest: Manifest, events: Events,
                   most_cpus: int, largest: int) -> None:
    from ray import exceptions as rx

    pending: dict[Any, Outcome] = {}
    try:
        threads = opts.threads or 2
        if most_cpus:
            threads = min(threads, most_cpus)  # a task no node can hold would wait for ever
        task = ray.remote(run_job_process)

        def submit(o: Outcome) -> None:
            o.status, o.attempts, o.started = "running", o.attempts + 1, time.time()
            memory = min(o.estimate_bytes, int(largest)) if largest else o.estimate_bytes
            ref = task.options(num_cpus=threads, memory=memory, max_retries=0,
                               name=f"qconvert job {o.job.index}").remote(
                o.job.argv(threads, opts.force))
            pending[ref] = o
            o.seconds -= time.perf_counter()  # time from submission: a queued task's wait counts
            events("start", o)

        for o in todo:
            submit(o)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in done:
                o = pending.pop(ref)
                o.seconds += time.perf_counter()
                try:
                    rc, stdout, stderr, o.where, o.started = ray.get(ref)
                    transient = finish(o, rc, stdout, stderr)
                except (rx.WorkerCrashedError, rx.NodeDiedError, rx.ObjectLostError, rx.OwnerDiedError,
                        rx.TaskCancelledError, rx.RaySystemError, rx.OutOfMemoryError,
                        rx.LocalRayletDiedError) as e:
                    o.status, o.exit_code = "failed", None
                    o.error = f"the Ray worker was lost ({type(e).__name__})"
                    transient = True
                except rx.RayError as e:
                    o.status, o.exit_code = "failed", 1
                    o.error = f"Ray: {' '.join(str(e).split())[:300]}"
                    transient = False
                if _ended(o, transient, manifest, opts, events):
                    submit(o)
    except BaseException:
        for ref, o in pending.items():
            ray.cancel(ref, force=False)  # KeyboardInterrupt in each job's worker: it interrupts its job
            o.status, o.error, o.exit_code = "failed", "interrupted", 130
        if pending:
            ray.wait(list(pending), num_returns=len(pending), timeout=30)  # the jobs remove their partial outputs
        raise


def exit_code(outcomes: list[Outcome]) -> int:
    """0 when every job is done or skipped; 5 when some failed (each job's own code in the
    summary); 130 when interrupted."""
    failed = [o for o in outcomes if o.status not in ("done", "skipped", "would run")]
    if not failed:
        return 0
    if any(o.exit_code == 130 and o.error == "interrupted" for o in failed):
        return Interrupted.exit_code
    return 5
