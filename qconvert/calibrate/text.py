"""Calibration text -> token batches.

The default text ships with the package (data/emma.txt, public domain; see data/SOURCE.md).
`--calib FILE` takes plain text, or JSON Lines with a "text" field. The text is tokenized with
the checkpoint's own tokenizer and cut into consecutive samples of seq_len tokens; as
llama-imatrix does, each sample starts with BOS when the model adds one. `seed` picks which
samples when the text holds more than asked for; the same inputs give the same samples.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from qconvert.errors import InputError, UsageError
from qconvert.read.tokenizer import load_bpe, load_spm

DEFAULT_NAME = "qconvert:emma.txt"


@dataclass
class Calibration:
    tokens: np.ndarray  # int64 [n_samples, seq_len]
    dataset: str  # what the text was: a path or the default's name


def read_text(path: Path | None) -> tuple[str, str]:
    if path is None:
        return resources.files("qconvert.calibrate").joinpath("data/emma.txt").read_text(encoding="utf-8"), DEFAULT_NAME
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read calibration text: {e}") from None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        parts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: line {n} is not JSON: {e}") from None
            except RecursionError:
                raise InputError(f"{path}: line {n} is JSON nested too deeply to read") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise InputError(f"{path}: line {n} must be an object with a \"text\" string")
            parts.append(obj["text"])
        raw = "\n\n".join(parts)
    if not raw.strip():
        raise InputError(f"{path}: calibration text is empty")
    return raw, str(path)


def tokenize(model_dir: Path, text: str) -> list[int]:
    if (model_dir / "tokenizer.json").is_file():
        return load_bpe(model_dir / "tokenizer.json").encode(text, add_special_tokens=False).ids
    return load_spm(model_dir / "tokenizer.model").encode(text)


def samples(model_dir: Path, path: Path | None, n_samples: int, seq_len: int, seed: int,
            bos_id: int | None, max_len: int | None = None) -> Calibration:
    """`max_len`: the most positions the model can take (learned position embeddings)."""
    if n_samples < 1 or seq_len < 16:
        raise UsageError(f"--calib-samples must be >= 1 and --calib-seq-len >= 16, got {n_samples} and {seq_len}")
    if max_len is not None and seq_len > max_len:
        raise UsageError(f"--calib-seq-len {seq_len} is longer than the model's {max_len} positions; "
                         f"use --calib-seq-len {max_len} or less")
    text, name = read_text(path)
    ids = np.asarray(tokenize(model_dir, text), dtype=np.int64)
    n_avail = len(ids) // seq_len
    if n_avail < 1:
        raise InputError(f"{name}: {len(ids)} tokens, fewer than one sample of {seq_len}")
    chunks = ids[: n_avail * seq_len].reshape(n_avail, seq_len)
    if n_avail > n_samples:
        pick = np.sort(np.random.default_rng(seed).choice(n_avail, n_samples, replace=False))
        chunks = chunks[pick]
    chunks = chunks.copy()
    if bos_id is not None:
        chunks[:, 0] = bos_id
    return Calibration(chunks, name)
