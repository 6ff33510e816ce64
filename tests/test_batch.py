"""`qconvert batch`: a jobs file of several models and targets gives the single commands' bytes,
locally and on a local Ray cluster; finished jobs are recorded and skipped, verified, on a second
run; a killed job is tried again and leaves nothing partial; failures are reported while the
other jobs go on; a bad jobs file is a usage error before anything runs."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.helpers import one_line_error, run_cli

pytestmark = pytest.mark.kernel_free  # each job is a whole single command, tested elsewhere in both passes

CALIB = {"calib-samples": 4, "calib-seq-len": 64}


def jobs_file(path: Path, jobs: list[dict]) -> Path:
    path.write_text("# made by the test\n" + "\n".join(json.dumps(j) for j in jobs) + "\n", encoding="utf-8")
    return path


def batch(capsys, *args) -> tuple[int, dict, str]:
    code, out, err = run_cli(["batch", *map(str, args), "--json"], capsys)
    return code, json.loads(out) if out.strip() else {}, err


def single(capsys, src, to, output, options: dict) -> None:
    args = [str(src), "--to", to, "-o", str(output), "-q"]
    for k, v in options.items():
        args += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err


def tree(p: Path) -> dict[str, bytes]:
    """Every file under `p` (or `p` itself) by relative name: what two runs must agree on."""
    if p.is_file():
        return {p.name: p.read_bytes()}
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


def partials(root: Path) -> list[str]:
    return [str(f) for f in root.rglob("*") if re.search(r"\.\d+\.(partial|old)$", f.name)]


@pytest.fixture
def three(tiny, tmp_path):
    """Three jobs of three families, five targets among them (GGUF calibrated and not, GPTQ, NF4)."""
    return [
        {"source": str(tiny("llama")), "to": "q8_0,q4_k_m", "output": str(tmp_path / "out" / "llama"),
         "options": CALIB},
        {"source": str(tiny("qwen2")), "to": ["gptq"], "output": str(tmp_path / "out" / "qwen2-gptq"),
         "options": {**CALIB, "group-size": 32}},
        {"source": str(tiny("gemma3")), "to": "nf4", "output": str(tmp_path / "out" / "gemma3-nf4"), "revision": None},
    ]


def test_batch_is_the_single_commands_and_resumes(three, tmp_path, capsys):
    jobs = jobs_file(tmp_path / "jobs.jsonl", three)
    code, r, err = batch(capsys, jobs, "--parallel", "2")
    assert code == 0, err
    assert [j["status"] for j in r["jobs"]] == ["done"] * 3 and r["done"] == 3 and r["exit_code"] == 0
    for j, spec in zip(r["jobs"], three):
        alone = tmp_path / "alone" / Path(spec["output"]).name
        to = spec["to"] if isinstance(spec["to"], str) else ",".join(spec["to"])
        single(capsys, spec["source"], to, alone, spec.get("options") or {})
        assert tree(Path(spec["output"])) == tree(alone), spec
        # (peaks here start from pytest's own RSS, which a forked child's ru_maxrss inherits:
        # bench/batch.py compares estimates with peaks from a small batch process)
        assert j["attempts"] == 1 and j["estimate_bytes"] > 0 and j["peak_rss_bytes"] > 0
    assert len(r["jobs"][0]["outputs"]) == 2  # two files of one job
    manifest = jobs.with_name("jobs.jsonl.manifest.json")
    assert Path(r["manifest"]) == manifest and len(json.loads(manifest.read_text())["jobs"]) == 3

    # a second run starts nothing: every job is skipped, its outputs verified
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    code, r2, err = batch(capsys, jobs)
    assert code == 0, err
    assert [j["status"] for j in r2["jobs"]] == ["skipped"] * 3 and all(j["attempts"] == 0 for j in r2["jobs"])
    assert [j["outputs"] for j in r2["jobs"]] == [j["outputs"] for j in r["jobs"]]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == mtimes

    # a changed output is found, reported and left alone; --force makes it again
    gguf = Path(r["jobs"][0]["outputs"][1]["path"])
    good = gguf.read_bytes()
    gguf.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    code, r3, err = batch(capsys, jobs)
    assert code == 5, err
    assert [j["status"] for j in r3["jobs"]] == ["failed", "skipped", "skipped"]
    assert "changed since the batch recorded it" in r3["jobs"][0]["error"] and str(gguf) in r3["jobs"][0]["error"]
    code, r4, err = batch(capsys, jobs, "--force")
    assert code == 0, err
    assert [j["status"] for j in r4["jobs"]] == ["done", "skipped", "skipped"] and gguf.read_bytes() == good

    # an edited job is a new one: it runs again (here over its own outputs, with --force)
    three[2]["options"] = {"group-size": 32}
    jobs_file(jobs, three)
    code, r5, err = batch(capsys, jobs, "--force")
    assert code == 0, err
    assert [j["status"] for j in r5["jobs"]] == ["skipped", "skipped", "done"]


def test_a_failed_job_is_reported_and_the_others_go_on(three, tmp_path, capsys):
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    specs = [three[0], {"source": str(bad), "to": "q8_0", "output": str(tmp_path / "out" / "bad.gguf")},
             {"source": str(tmp_path / "nowhere"), "to": "f16", "output": str(tmp_path / "out" / "none.gguf")}]
    jobs = jobs_file(tmp_path / "jobs.jsonl", specs)
    code, r, err = batch(capsys, jobs)
    assert code == 5, err
    assert [(j["status"], j["exit_code"], j["attempts"]) for j in r["jobs"]] == \
        [("done", 0, 1), ("failed", 3, 1), ("failed", 3, 1)]  # input problems are not retried
    assert "config.json" in r["jobs"][1]["error"] and "no such directory" in r["jobs"][2]["error"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["llama"]
    assert r["done"] == 1 and r["failed"] == 2
    code, out, err = run_cli(["batch", jobs], capsys)  # the terminal's table: each failure on its row
    assert code == 5 and "skipped" in out and out.count("failed") >= 2 and "config.json" in out


def test_memory_decides_what_runs_side_by_side(three, tmp_path, capsys):
    jobs = jobs_file(tmp_path / "jobs.jsonl", three[:2])

    def spans(r):
        return [(datetime.fromisoformat(j["started"]), datetime.fromisoformat(j["ended"])) for j in r["jobs"]]

    code, out, err = run_cli(["batch", jobs, "--dry-run"], capsys)  # nothing runs, and that is no failure
    assert code == 0 and "2 would run" in out and "~" in out and not (tmp_path / "out").exists(), out + err
    code, r, err = batch(capsys, jobs, "--parallel", "2", "--memory", "1B")  # each job alone is over it
    assert code == 0, err
    (s1, e1), (s2, e2) = spans(r)
    assert e1 <= s2  # one after the other
    code, out, err = run_cli(["batch", jobs, "--dry-run"], capsys)
    assert code == 0 and "2 skipped in" in out, out
    for p in (tmp_path / "out").iterdir():
        subprocess.run(["rm", "-rf", str(p)], check=True)
    jobs.with_name("jobs.jsonl.manifest.json").unlink()
    code, r, err = batch(capsys, jobs, "--parallel", "2", "--memory", "64GB")
    assert code == 0, err
    (s1, e1), (s2, e2) = spans(r)
    assert s2 < e1  # side by side


def _kill_first_partial_writer(root: Path, proc: subprocess.Popen, parent: bool = False,
                               timeout: float = 120) -> int:
    """SIGKILL the job process that is writing under `root` (its temporary output carries its
    pid), or with `parent` the process that started it (a Ray worker)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for f in root.rglob("*"):
            m = re.search(r"\.(\d+)\.partial$", f.name)
            if m:
                pid = int(m.group(1))
                if parent:
                    pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                os.kill(pid, signal.SIGKILL)
                return pid
        time.sleep(0.02)
    raise AssertionError("no job process was seen writing")


def killed_job_is_retried(tiny, tmp_path, capsys, *extra, parent: bool = False) -> None:
    spec = {"source": str(tiny("qwen2")), "to": "gptq,q8_0", "output": str(tmp_path / "out" / "qwen2"),
            "options": {"calib-samples": 16, "calib-seq-len": 128, "group-size": 32}}
    jobs = jobs_file(tmp_path / "jobs.jsonl", [spec])
    (tmp_path / "out").mkdir()
    p = subprocess.Popen([sys.executable, "-m", "qconvert", "batch", str(jobs), "--json", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _kill_first_partial_writer(tmp_path / "out", p, parent)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    job = json.loads(stdout)["jobs"][0]
    assert job["status"] == "done" and job["attempts"] == 2, job
    assert partials(tmp_path / "out") == []
    single(capsys, spec["source"], spec["to"], tmp_path / "alone", spec["options"])
    assert tree(tmp_path / "out" / "qwen2") == tree(tmp_path / "alone")


def test_a_killed_job_is_tried_again_and_leaves_nothing_partial(tiny, tmp_path, capsys):
    killed_job_is_retried(tiny, tmp_path, capsys)


def test_a_killed_job_that_is_not_retried_leaves_nothing_partial(tiny, tmp_path):
    spec = {"source": str(tiny("qwen2")), "to": "gptq", "output": str(tmp_path / "out" / "qwen2-gptq"),
            "options": {"calib-samples": 16, "calib-seq-len": 128, "group-size": 32}}
    jobs = jobs_file(tmp_path / "jobs.jsonl", [spec])
    (tmp_path / "out").mkdir()
    p = subprocess.Popen([sys.executable, "-m", "qconvert", "batch", str(jobs), "--json", "--retries", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _kill_first_partial_writer(tmp_path / "out", p)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 5, stderr[-3000:]
    job = json.loads(stdout)["jobs"][0]
    assert job["status"] == "failed" and "killed (SIGKILL)" in job["error"], job
    assert list((tmp_path / "out").iterdir()) == []
    assert json.loads(jobs.with_name("jobs.jsonl.manifest.json").read_text())["jobs"] == {}  # nothing recorded


def test_ctrl_c_stops_the_batch_and_leaves_no_partial_output(tiny, tmp_path):
    specs = [{"source": str(tiny("llama")), "to": "q8_0", "output": str(tmp_path / "out" / "first.gguf")},
             {"source": str(tiny("qwen2")), "to": "gptq", "output": str(tmp_path / "out" / "slow"),
              "options": {"calib-samples": 32, "calib-seq-len": 128, "group-size": 32}}]
    jobs = jobs_file(tmp_path / "jobs.jsonl", specs)
    (tmp_path / "out").mkdir()
    p = subprocess.Popen([sys.executable, "-m", "qconvert", "batch", str(jobs), "--parallel", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(f.name.startswith(".slow.") for f in (tmp_path / "out").iterdir()):  # the second job writing
        assert time.monotonic() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    one_line_error(stderr, "interrupted", "manifest")
    assert [f.name for f in (tmp_path / "out").iterdir()] == ["first.gguf"]  # the finished job stays, recorded
    recorded = json.loads(jobs.with_name("jobs.jsonl.manifest.json").read_text())["jobs"]
    assert [j["output"] for j in recorded.values()] == [specs[0]["output"]]


@pytest.mark.parametrize("content,needles", [
    ('{"source": "m", "to": "q8_0"}', ["jobs.jsonl:2", "'output' is missing"]),
    ('{"source": "m", "to": "q8_0", "output": "o", "outptu": 1}', ["jobs.jsonl:2", "unknown key 'outptu'"]),
    ('{"source": "m", "to": "q9_0", "output": "o"}', ["jobs.jsonl:2", "unknown target 'q9_0'"]),
    ('{"source": "m", "to": "q8_0", "output": "o", "options": {"calib-sample": 4}}',
     ["jobs.jsonl:2", "unknown option 'calib-sample'", "calib-samples"]),
    ('{"source": "m", "to": "q8_0", "output": "o", "options": {"bits": 8}}', ["jobs.jsonl:2", "--bits applies to"]),
    ('{"source": "m", "to": "gptq", "output": "o", "options": {"act-order": "yes"}}',
     ["jobs.jsonl:2", "'act-order' is true or false"]),
    ('{"source": "m", "to": "q8_0", "output": "o", "options": {"threads": 4}}', ["jobs.jsonl:2", "batch's to set"]),
    ('{"source": "m", "to": "q8_0", "output": "o", "options": {"format": "hf-fp8"}}',
     ["jobs.jsonl:2", "--format applies to"]),
    ('{"source": "m", "to": "gptq", "output": "o", "options": {"--calib-samples": "many"}}',
     ["jobs.jsonl:2", "'calib-samples' is a positive whole number"]),
    ('{"source": "m", "to": "q8_0", "output": "o"}\n{"source": "n", "to": "f16", "output": "o"}',
     ["jobs.jsonl:3", "each job needs its own"]),
    ('{"source": "m", "to": "q8_0", "output": "o"', ["jobs.jsonl:2", "not a JSON object"]),
    ('', ["no jobs"]),
])
def test_a_bad_jobs_file_is_a_usage_error_before_anything_runs(tmp_path, capsys, content, needles):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("# comment\n" + content + "\n")
    code, out, err = run_cli(["batch", jobs], capsys)
    assert code == 2 and out == ""
    one_line_error(err, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.jsonl"]


def test_yaml_jobs_and_switch_options(tiny, tmp_path, capsys):
    """The same jobs in YAML; switches as true/false, either spelling (clip: false = no-clip: true)."""
    src = tiny("qwen2")
    (tmp_path / "jobs.yaml").write_text(f"""
jobs:
  - source: {src}
    to: [awq]
    output: {tmp_path / 'awq-a'}
    options: {{calib-samples: 4, calib-seq-len: 64, group-size: 32, clip: false}}
  - source: {src}
    to: awq
    output: {tmp_path / 'awq-b'}
    options: {{calib-samples: 4, calib-seq-len: 64, group-size: 32, no-clip: true}}
""")
    code, r, err = batch(capsys, tmp_path / "jobs.yaml")
    assert code == 0, err
    single(capsys, src, "awq", tmp_path / "alone", {**CALIB, "group-size": 32, "no-clip": True})
    assert tree(tmp_path / "awq-a") == tree(tmp_path / "awq-b") == tree(tmp_path / "alone")
    assert (tmp_path / "jobs.yaml.manifest.json").exists()




def test_on_a_local_ray_cluster(three, tiny, tmp_path, capsys):
    pytest.importorskip("ray")
    jobs = jobs_file(tmp_path / "jobs.jsonl", three[:2])
    code, r, err = batch(capsys, jobs, "--ray", "local")
    assert code == 0, err
    assert [j["status"] for j in r["jobs"]] == ["done", "done"] and all(j["ran_on"] for j in r["jobs"])
    for spec in three[:2]:
        alone = tmp_path / "alone" / Path(spec["output"]).name
        to = spec["to"] if isinstance(spec["to"], str) else ",".join(spec["to"])
        single(capsys, spec["source"], to, alone, spec["options"])
        assert tree(Path(spec["output"])) == tree(alone)
    for whom in ("job", "worker"):  # the job's process, or the Ray worker that runs it
        (tmp_path / whom).mkdir()
        killed_job_is_retried(tiny, tmp_path / whom, capsys, "--ray", "local", parent=whom == "worker")


def test_the_memory_estimate_counts_calibration_workers(tiny, tmp_path):
    """Each local calibration worker is another process: the floor and a layer's weights more;
    on Ray the workers are placed by Ray and the job's own process estimate stays."""
    from qconvert.batch import BASE_BYTES, BatchJob, estimate_peak_bytes

    def job(**options) -> BatchJob:
        return BatchJob(1, "jobs.jsonl:1", str(tiny("llama")), "gptq", tmp_path / "o", None, options, [])
    alone, two, ray = job(), job(workers=2), job(workers=2, ray="local")
    assert estimate_peak_bytes(two) > estimate_peak_bytes(alone) + 2 * BASE_BYTES
    assert estimate_peak_bytes(ray) == estimate_peak_bytes(alone)


def test_the_memory_estimate_counts_gptq_rounding_with_an_imatrix_file(tiny, tmp_path):
    """`--imatrix FILE` spares the GGUF mixtures their calibration, unless `--method gptq`
    rounds them through the calibration inputs' Hessians anyway."""
    from qconvert.batch import BatchJob, estimate_peak_bytes

    def job(**options) -> BatchJob:
        return BatchJob(1, "jobs.jsonl:1", str(tiny("llama")), "q4_k_m", tmp_path / "o", None, options, [])
    given, fed, calibrated = job(imatrix="m.gguf"), job(imatrix="m.gguf", method="gptq"), job()
    assert estimate_peak_bytes(given) < estimate_peak_bytes(fed) == estimate_peak_bytes(calibrated)
