"""Importance matrices as llama.cpp writes them: the GGUF imatrix format (llama-imatrix today)
and the legacy .dat format, normalised exactly as llama-quantize's load_imatrix does:
GGUF: in_sum2 / lround(count) per matrix (count 0 -> 1); legacy: value / ncall (ncall 0 -> as is).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qconvert.errors import InputError
from qconvert.read.gguf_header import check_gguf_header


@dataclass
class Imatrix:
    path: Path
    entries: dict[str, np.ndarray]  # GGUF tensor name -> per-column weights (float32)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def for_tensor(self, name: str, ncols: int, n_mat: int = 1) -> np.ndarray | None:
        """The weights for one tensor, [columns], or [experts, columns] for the `n_mat` experts
        of a stacked *_exps tensor; None when the matrix has none for it (as llama-quantize). A
        size that does not match is an error, except for token_embd (llama-quantize skips it)."""
        w = self.entries.get(name)
        if w is None:
            return None
        if w.size != ncols * n_mat:
            if name in ("token_embd.weight", "per_layer_token_embd.weight"):
                return None
            raise InputError(f"{self.path}: importance matrix for {name} has {w.size} values, the tensor has "
                             f"{ncols} columns{f' in each of {n_mat} experts' if n_mat > 1 else ''} "
                             "(a matrix made for another model?)")
        return w.reshape(n_mat, ncols) if n_mat > 1 else w


def load_imatrix(path: Path) -> Imatrix:
    try:
        head = path.read_bytes()[:4]
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    im = _load_gguf(path) if head == b"GGUF" else _load_legacy(path)
    for name, w in im.entries.items():
        if not np.isfinite(w).all():
            raise InputError(f"{path}: importance matrix for {name} holds non-finite values")
        if (w < 0).any():  # means of squares
            raise InputError(f"{path}: importance matrix for {name} holds negative values")
    if not im.entries:
        raise InputError(f"{path}: importance matrix has no entries")
    return im


def _load_gguf(path: Path) -> Imatrix:
    from gguf import GGMLQuantizationType, GGUFReader

    check_gguf_header(path)
    try:
        r = GGUFReader(path)
    except Exception as e:  # the reader raises several types on bad files
        raise InputError(f"{path}: not a readable GGUF imatrix: {e}") from None
    f = r.fields
    if not all(k in f for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")):
        raise InputError(f"{path}: missing imatrix metadata (imatrix.datasets, .chunk_count, .chunk_size)")
    sums, counts = {}, {}
    for t in r.tensors:
        if t.tensor_type != GGMLQuantizationType.F32:
            raise InputError(f"{path}: {t.name} must be F32, got {t.tensor_type.name}")
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    entries = {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise InputError(f"{path}: mismatched sums and counts for {name}")
        raw = counts[name].astype(np.float64)
        s, c = sums[name], np.sign(raw) * np.floor(np.abs(raw) + 0.5)  # std::lround: half away from zero
        if c.size == 0 or s.size % c.size or not np.isfinite(raw).all() or (raw < 0).any():
            raise InputError(f"{path}: {name} has {s.size} sums and {c.size} counts; the counts must be finite, "
                             "non-negative, and divide the sums into equal parts (one count per expert)")
        per = s.size // c.size
        out = np.empty_like(s)
        for j, count in enumerate(c.astype(np.float32)):
            part = s[j * per:(j + 1) * per]
            out[j * per:(j + 1) * per] = part / count if count > 0 else np.float32(1)
        entries[name] = out
    datasets = [str(x) for x in f["imatrix.datasets"].contents()]
    return Imatrix(path, entries, datasets, int(f["imatrix.chunk_count"].contents()),
                   int(f["imatrix.chunk_size"].contents()))


def _load_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    bad = InputError(f"{path}: not an importance matrix (neither GGUF nor llama.cpp's legacy .dat)")
    try:
        (n,) = struct.unpack_from("<i", data, 0)
        if n < 1:
            raise bad
        at = 4
        entries = {}
        for _ in range(n):
            (length,) = struct.unpack_from("<i", data, at)
            name = data[at + 4: at + 4 + length].split(b"\0")[0].decode("utf-8")
            at += 4 + length
            ncall, nval = struct.unpack_from("<ii", data, at)
            at += 8
            if nval < 1 or at + 4 * nval > len(data):
                raise bad
            vals = np.frombuffer(data, dtype="<f4", count=nval, offset=at).astype(np.float32)
            at += 4 * nval
            entries[name] = vals / np.float32(ncall) if ncall > 0 else vals.copy()
    except (struct.error, UnicodeDecodeError):
        raise bad from None
    chunk_count, datasets = 0, []
    if at + 4 <= len(data):
        (chunk_count,) = struct.unpack_from("<i", data, at)
        if at + 8 <= len(data):
            (length,) = struct.unpack_from("<i", data, at + 4)
            if length > 0:
                datasets = [data[at + 8: at + 8 + length].split(b"\0")[0].decode("utf-8", "replace")]
    return Imatrix(path, entries, datasets, chunk_count, 0, legacy=True)
