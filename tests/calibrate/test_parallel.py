"""Data-parallel calibration (--workers N, --ray): the samples over worker processes or Ray
actors give the bytes of the calibration in one process, for any number of workers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from qconvert.calibrate.parallel import Tree, shares, total
from tests.helpers import files_in, one_line_error, run_cli

CALIB = ["--calib-samples", "12", "--calib-seq-len", "48"]  # 3 calibration units of 4 samples
FREE = pytest.mark.kernel_free  # no GGUF blocks: the numpy pass has nothing to add


def tree_of(p: Path) -> dict[str, bytes]:
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()} if p.is_dir() \
        else {p.name: p.read_bytes()}


@FREE
def test_the_tree_sum_is_the_same_however_the_units_are_shared():
    """Per-unit values of very different magnitudes (where float addition's order shows): every
    split of 11 units into contiguous shares sums to the same bits, which a sequential sum of
    the shares' sums does not."""
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(64, generator=g) * 10.0 ** float(torch.randint(-6, 7, (1,), generator=g)) for _ in range(11)]

    def shared(cuts: list[int]) -> torch.Tensor:
        out = []
        for a, b in zip([0, *cuts], [*cuts, len(values)]):
            t = Tree()
            for u in range(a, b):
                t.add(u, values[u].clone())
            out.append(t.blocks())
        return total(out)
    whole = shared([])
    naive_differs = False
    for cuts in ([5], [1], [10], [3, 7], [2, 4, 6, 8], list(range(1, 11))):
        assert torch.equal(shared(cuts), whole), cuts
        sums = [sum(values[a:b], torch.zeros(64)) for a, b in zip([0, *cuts], [*cuts, 11])]
        naive_differs |= not torch.equal(sum(sums, torch.zeros(64)), sum(values, torch.zeros(64)))
    assert naive_differs  # the values do exercise the order
    assert torch.allclose(whole.double(), torch.stack(values).double().sum(0), rtol=1e-5, atol=1e-6)
    t = Tree()
    t.add(0, torch.ones(2))
    t.add(0, torch.ones(2))  # a unit in two parts (batches) adds up
    t.add(1, torch.ones(2))
    assert t.blocks()[0][:2] == (0, 2) and torch.equal(total([t.blocks()]), torch.full((2,), 3.0))
    with pytest.raises(ValueError):
        total([t.blocks(), t.blocks()])
    assert shares(12, 2) == [(0, 1), (1, 3)] and shares(12, 8) == [(0, 1), (1, 2), (2, 3)] and shares(3, 4) == [(0, 1)]


@pytest.mark.parametrize("family,to,extra", [
    ("llama", "q4_k_m", []),
    ("qwen3moe", "q4_k_m", []),  # experts' per-expert sums and counts
    # and the absorbed attention's per-head sums (attn_k_b, attn_v_b)
    pytest.param("deepseek_v3-wide", "q4_k_m", [], marks=FREE),
    # sinks, windows, biased routers and experts
    pytest.param("gpt_oss-wide", "q4_k_m", [], marks=FREE),
    pytest.param("qwen2", "gptq", ["--group-size", "32"], marks=FREE),
    pytest.param("phi3", "gptq", ["--group-size", "32", "--no-act-order"], marks=FREE),  # fused qkv and gate_up
    pytest.param("llama", "w8a8", [], marks=FREE),  # the smoothing's column ranges too
    # a unit across the search's two parts
    pytest.param("qwen3", "awq", ["--group-size", "32", "--calib-samples", "20"], marks=FREE),
    pytest.param("phi3", "awq", ["--group-size", "32"], marks=FREE),  # the fused qkv's v rows take the o group's scales
])
def test_workers_give_the_bytes_of_one_process(tiny, tmp_path, capsys, family, to, extra):
    src = tiny(family)
    outs = {}
    for workers in (None, 1, 2, 3):
        out = tmp_path / f"w{workers}"
        code, stdout, err = run_cli([src, "--to", to, "-o", out, *CALIB, *extra, "--json",
                                     *(["--workers", workers] if workers else [])], capsys)
        assert code == 0, err
        report = json.loads(stdout)
        passes = report["calibration"]["passes"]
        if workers and workers > 1:
            assert passes[0]["workers"]["workers"] == workers and passes[0]["workers"]["where"] == "local processes"
        else:
            assert "workers" not in passes[0]
        outs[workers] = tree_of(Path(report["outputs"][0]["path"]))
    assert outs[1] == outs[None] and outs[2] == outs[None] and outs[3] == outs[None]


@FREE
def test_imatrix_command_over_workers(tiny, tmp_path, capsys):
    src = tiny("gemma3")
    files = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}.imatrix.gguf"
        code, stdout, err = run_cli(["imatrix", src, "-o", out, *CALIB, "--json", "--workers", workers], capsys)
        assert code == 0, err
        files.append(out.read_bytes())
    assert files[0] == files[1] and json.loads(stdout)["workers"]["workers"] == 2


@FREE
def test_methods_and_models_that_do_not_spread_are_usage_errors(tiny, tmp_path, capsys):
    for method in ("gptq", "awq"):
        code, _, err = run_cli([tiny("mixtral"), "--to", method, "-o", tmp_path / "m", *CALIB, "--group-size", "32",
                                "--workers", "2"], capsys)
        assert code == 2
        one_line_error(err, "mixture of experts", "--workers")
    code, _, err = run_cli([tiny("llama"), "--to", "fp8", "-o", tmp_path / "f", "--workers", "2"], capsys)
    assert code == 2
    one_line_error(err, "--workers", "fp8")
    assert files_in(tmp_path) == []


def _workers_of(pid: int) -> list[int]:
    """The calibration worker processes (multiprocessing's spawned children) of process pid."""
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "multiprocessing.spawn" in line]


def _stop_mid_calibration(tmp_path: Path, model: Path, whom: str) -> tuple[subprocess.Popen, str, list[int]]:
    """Run a GPTQ over 2 workers and, once the partial checkpoint is there, SIGKILL a worker
    (`whom` "worker") or SIGINT the command ("driver"); (the process, its stderr, its workers)."""
    proc = subprocess.Popen([sys.executable, "-m", "qconvert", str(model), "--to", "gptq", "-o", str(tmp_path / "out"),
                             "--group-size", "32", "--calib-samples", "64", "--calib-seq-len", "256",
                             "--workers", "2", "-j", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[int] = []

    def stop():
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            workers = _workers_of(proc.pid)
            if len(workers) == 2 and files_in(tmp_path):  # the partial checkpoint is there
                seen.extend(workers)
                if whom == "worker":
                    os.kill(workers[-1], signal.SIGKILL)
                else:
                    proc.send_signal(signal.SIGINT)
                return
            time.sleep(0.01)
    t = threading.Thread(target=stop)
    t.start()
    _, err = proc.communicate(timeout=300)
    t.join()
    return proc, err, seen


@FREE
def test_a_lost_worker_fails_the_job_and_leaves_nothing(tiny, tmp_path):
    """A worker process killed while the checkpoint is being written: exit 6 (another run may
    succeed), one line naming the model, no output left behind."""
    proc, err, seen = _stop_mid_calibration(tmp_path, tiny("qwen2"), "worker")
    assert seen, f"no worker to kill: {err}"
    assert proc.returncode == 6, err
    one_line_error(err, "calibration worker", "qwen2")
    assert files_in(tmp_path) == []


@FREE
def test_ctrl_c_stops_the_workers_and_leaves_nothing(tiny, tmp_path):
    proc, err, seen = _stop_mid_calibration(tmp_path, tiny("qwen2"), "driver")
    assert seen, f"no worker seen: {err}"
    assert proc.returncode == 130, err
    one_line_error(err, "interrupted")
    assert files_in(tmp_path) == []
    time.sleep(0.5)
    assert not [p for p in seen if Path(f"/proc/{p}").exists() and "zombie" not in
                Path(f"/proc/{p}/status").read_text(errors="replace").lower()]


@FREE
def test_on_a_local_ray_cluster(tiny, tmp_path, capsys):
    pytest.importorskip("ray")
    src = tiny("llama")
    outs = []
    for extra in ([], ["--ray", "local", "--workers", "2"]):
        out = tmp_path / ("ray" if extra else "here")
        code, stdout, err = run_cli([src, "--to", "gptq,q4_k_m", "-o", out, *CALIB, "--group-size", "32", "--json",
                                     *extra], capsys)
        assert code == 0, err
        outs.append(tree_of(out))
    assert outs[0] == outs[1]
    passes = json.loads(stdout)["calibration"]["passes"]
    assert [p["workers"]["where"] for p in passes] == ["Ray actors", "Ray actors"]
