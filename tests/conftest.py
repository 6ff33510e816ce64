from __future__ import annotations

import os
import signal
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # as qconvert sets it, before torch loads MKL (qconvert/__init__.py)

import pytest

from tests.models import build

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# a suite started in the background by a shell without job control (`make test &`) inherits
# SIGINT ignored, and so would every process it starts: the Ctrl-C tests need it back
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _restore_environment():
    """GPTQModel (through tokenicer) sets HF_HOME, HF_HUB_CACHE and more when imported; keep that
    from leaking into later tests (the hub tests build their own cache)."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(family, dtype="float32") -> directory of a tiny random checkpoint, built once a session."""
    root = tmp_path_factory.mktemp("models")
    cache: dict[tuple[str, str], Path] = {}

    def get(family: str, dtype: str = "float32") -> Path:
        key = (family, dtype)
        if key not in cache:
            cache[key] = build(family, root / f"{family}-{dtype}", dtype=dtype)
        return cache[key]
    return get
