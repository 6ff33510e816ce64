"""What users install: the wheel and sdist built from this tree, installed into a fresh venv
outside the source tree (the CPU torch first, as the README says), running every target with its
defaults on a tiny model. It checks that the installed package works, not the maths again.

Run by `make test` (`pytest -m installed tests/installed`); not part of the plain suite.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from gguf import GGUFReader

import qconvert
from qconvert import targets
from tests.models import build

pytestmark = pytest.mark.installed

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "qconvert"


def package_files() -> list[str]:
    """Every file of the package tree that ships: sources and the data the code opens."""
    out = []
    for p in sorted(PACKAGE.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".so"):
            out.append(p.relative_to(ROOT).as_posix())
    return out


def clean_copy(dest: Path) -> Path:
    """The tree as a fresh clone has it: files git tracks or would track (no venv, no build
    outputs, no egg-info, whose SOURCES.txt setuptools would otherwise reuse)."""
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                       capture_output=True)
    assert r.returncode == 0, r.stderr
    for name in filter(None, r.stdout.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def build_dist(tree: Path, out: Path, *what: str) -> None:
    r = subprocess.run([sys.executable, "-m", "build", *what, "--outdir", str(out), str(tree)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "project.license" not in r.stderr, r.stderr[-4000:]  # setuptools' warning on the table form


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """From a clean copy of the tree: the wheel `pip install .` builds (straight from the tree),
    and the sdist with the wheel built from it (as pip builds one from an sdist)."""
    tree = clean_copy(tmp_path_factory.mktemp("tree"))
    direct, via_sdist = tmp_path_factory.mktemp("direct"), tmp_path_factory.mktemp("via-sdist")
    build_dist(tree, direct, "--wheel")
    build_dist(tree, via_sdist)
    found = {"wheel": list(direct.glob("*.whl")), "sdist": list(via_sdist.glob("*.tar.gz")),
             "sdist_wheel": list(via_sdist.glob("*.whl"))}
    assert all(len(v) == 1 for v in found.values()), found
    return {k: v[0] for k, v in found.items()}


@pytest.mark.parametrize("which", ["wheel", "sdist_wheel"])
def test_wheel_carries_every_package_file(dist, which):
    names = set(zipfile.ZipFile(dist[which]).namelist())
    missing = [f for f in package_files() if f not in names]
    assert not missing, f"the wheel lacks {missing}"
    assert any(n.startswith("qconvert/_kernels") and n.endswith(".so") for n in names), "no C kernels in the wheel"
    assert "qconvert/calibrate/data/emma.txt" in names  # the default calibration text
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(dist[which]).read(meta).decode()
    assert f"Version: {qconvert.__version__}" in text and "License-Expression: MIT" in text


def test_sdist_builds_on_its_own(dist):
    with tarfile.open(dist["sdist"]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    needed = ["setup.py", "pyproject.toml", "README.md", "LICENSE", *package_files(),
              *(p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "kernels").iterdir()))]
    missing = [f for f in needed if f not in names]
    assert not missing, f"the sdist lacks {missing}"


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> Path:
    """A fresh venv outside the source tree with the CPU torch, then the wheel and its dependencies."""
    d = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(d)], check=True)
    pip = [str(d / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for args in (["torch==2.13.0"], [str(dist["wheel"])]):
        r = subprocess.run(pip + args, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return d


def run(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QCONVERT_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("work")


def test_imports_the_installed_package_not_the_tree(venv, work):
    r = run(venv, work, "python", "-c", "import qconvert, qconvert._kernels; print(qconvert.__file__)")
    assert r.returncode == 0, r.stderr
    assert "site-packages" in r.stdout and str(ROOT) not in r.stdout, r.stdout


def test_help_and_version(venv, work):
    r = run(venv, work, "qconvert", "--help")
    assert r.returncode == 0, r.stderr
    for name in targets.names():
        assert name in r.stdout, (name, r.stdout)
    assert "GPTQModel" in r.stdout
    r = run(venv, work, "qconvert", "convert", "--help")
    assert r.returncode == 0, r.stderr
    flat = " ".join(r.stdout.split())
    for name in targets.names():
        assert name in flat, name
    r = run(venv, work, "qconvert", "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"qconvert {qconvert.__version__} (kernels: ") and "C" in r.stdout, r.stdout
    r = run(venv, work, "python", "-m", "qconvert", "--help")
    assert r.returncode == 0 and "Usage" in r.stdout, r.stderr


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    # widths of 256 and 512: every target's default group size (128) fits
    return build("llama-wide", tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def converted(venv, work, model) -> dict[str, tuple[dict, dict]]:
    """Every target at its defaults, through `qconvert batch` from the wheel: the GGUF targets in
    one job (one read, one calibration for all the mixtures, as one command does), each
    checkpoint target in a job of its own, two side by side. target -> (its job's report, its
    output's entry)."""
    ggufs = targets.names("gguf")
    jobs = [{"source": str(model), "to": ",".join(ggufs), "output": str(work / "gguf")}]
    jobs += [{"source": str(model), "to": t, "output": str(work / t)} for t in targets.names("checkpoint")]
    (work / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    r = run(venv, work, "qconvert", "batch", "jobs.jsonl", "--parallel", "2", "--json")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = {}
    for job in json.loads(r.stdout)["jobs"]:
        assert job["status"] == "done", job
        for o in job["report"]["outputs"]:
            out[o["target"]] = (job["report"], o)
    return out


@pytest.mark.parametrize("target", targets.names())
def test_every_target_with_its_defaults(venv, work, converted, target):
    report, output = converted[target]
    row = targets.TARGETS[target]
    path = Path(output["path"])
    assert output["kind"] == row.kind
    calibrated = [t for p in (report["calibration"] or {}).get("passes", []) for t in p["targets"]]
    if row.calibration:  # calibrated from the text that ships in the wheel
        assert report["calibration"]["dataset"] == "qconvert:emma.txt" and target in calibrated, report["calibration"]
    else:
        assert target not in calibrated
    if row.kind == "gguf":
        assert len(GGUFReader(path).tensors) == output["tensors"]
        if target not in ("f32", "q8_0", "q4_k_m"):  # inspect reads any GGUF alike: three are enough
            return
    else:
        assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    r = run(venv, work, "qconvert", "inspect", str(path), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n_params"] > 0


def test_imatrix_with_its_defaults(venv, work, model):
    r = run(venv, work, "qconvert", "imatrix", str(model), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["dataset"] == "qconvert:emma.txt" and Path(report["path"]).parent == work
    assert len(GGUFReader(report["path"]).tensors) == 2 * report["entries"]
