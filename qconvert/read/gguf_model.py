"""A GGUF file as a model qconvert's forward can run: config from its metadata, tensors
dequantized on demand and put back in the checkpoint's layout, under their HF names.

Only the families qconvert writes are read; the family module knows both directions (its
`tensor()` transforms, `from_gguf()` undoes them; `config_from_gguf()` reads the hyperparameters
as llama.cpp does).
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from qconvert.arch.base import EXPERT_TENSOR, merged_expert
from qconvert.families import FAMILIES
from qconvert.errors import InputError
from qconvert.quant import blocks
from qconvert.read.config import Config
from qconvert.read.gguf_header import check_gguf_header


def read_gguf(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    check_gguf_header(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on bad files
        raise InputError(f"{path}: not a readable GGUF file: {e}") from None


@dataclass
class GGUFTensor:
    """One tensor of the file under an HF name, read as float32 in the checkpoint's layout."""

    name: str  # HF name
    gguf_name: str
    shape: tuple[int, ...]  # numpy order, in the checkpoint's layout (as array() returns it)
    _t: gguf.ReaderTensor
    _family: object
    _map: mmap.mmap | None = None  # the reader's mapping, to drop pages from
    dtype: str = "F32"
    expert: int | None = None  # one expert's slice of a stacked *_exps tensor

    def array(self) -> np.ndarray:
        t = self._t
        kind = t.tensor_type.name
        data = t.data if self.expert is None else t.data[self.expert]
        data = np.ascontiguousarray(data)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # as the file stores it
        if self.expert is not None:
            shape = shape[1:]
        if kind in blocks.REGISTRY:
            a = blocks.REGISTRY[kind].dequantize(data.view(np.uint8), shape)
        else:  # a type qconvert does not write: gguf's numpy dequantizers
            a = gguf.quants.dequantize(data, t.tensor_type).reshape(shape)
        a = np.ascontiguousarray(a, dtype=np.float32)
        return self._family.from_gguf(self.name, a) if self.name != self.gguf_name else a

    def release(self) -> None:
        """Drop the tensor's pages from our resident memory (the page cache keeps them)."""
        if self._map is None:
            return
        begin, page = int(self._t.data_offset), mmap.PAGESIZE
        end = min(begin + int(self._t.n_bytes), len(self._map))
        start = begin - begin % page
        end = min(end + (-end) % page, len(self._map))
        try:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (AttributeError, OSError, ValueError):
            pass  # not every platform can drop pages; memory is then just higher


@dataclass
class JoinedTensor:
    """A checkpoint tensor that the converter split into several GGUF tensors (DeepSeek's
    kv_b_proj into attn_k_b and attn_v_b), joined back by the family's function."""

    name: str
    shape: tuple[int, ...]
    parts: list[GGUFTensor]
    join: object  # (arrays of the parts) -> the checkpoint's array
    dtype: str = "F32"

    def array(self) -> np.ndarray:
        return np.ascontiguousarray(self.join(*(t.array() for t in self.parts)), dtype=np.float32)

    def release(self) -> None:
        for t in self.parts:
            t.release()


class GGUFWeights:
    """HF name -> GGUFTensor, found through the family's name map; GGUF-only tensors (such as
    rope_freqs.weight) answer to their own name."""

    def __init__(self, reader: gguf.GGUFReader, family):
        self.family = family
        self.by_gguf = {t.name: t for t in reader.tensors}
        self.map = getattr(reader.data, "_mmap", None)  # numpy's memmap keeps its mmap here

    def _gguf_name(self, hf_name: str) -> tuple[str, int | None] | None:
        """The GGUF tensor holding `hf_name`, and the expert's index where it is one expert's
        matrix in a stacked *_exps tensor."""
        if hf_name in self.by_gguf:
            return hf_name, None
        expert = None
        if (m := EXPERT_TENSOR.match(hf_name)) and self.family.n_experts:
            hf_name, expert = f"{merged_expert(m)}.{m['kind']}", int(m["expert"])
        try:
            g = self.family.map_name(hf_name)
        except InputError:
            return None
        if g not in self.by_gguf:
            return None
        if expert is not None and not expert < int(self.by_gguf[g].shape[-1]):
            return None
        return g, expert

    def __contains__(self, hf_name: str) -> bool:
        if (joined := self.family.joined_from_gguf(hf_name)) is not None:
            return all(n in self for n in joined[0])
        return self._gguf_name(hf_name) is not None

    def __getitem__(self, hf_name: str) -> GGUFTensor | JoinedTensor:
        if (joined := self.family.joined_from_gguf(hf_name)) is not None:
            names, join, shape = joined
            return JoinedTensor(hf_name, shape, [self[n] for n in names], join)
        found = self._gguf_name(hf_name)
        if found is None:
            raise KeyError(hf_name)
        g, expert = found
        t = self.by_gguf[g]
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if expert is not None:
            shape = shape[1:]
        if self.family.transposed(hf_name):  # from_gguf gives the checkpoint's layout back
            shape = shape[::-1]
        return GGUFTensor(hf_name, g, shape, t, self.family, self.map, expert=expert)


@dataclass
class _Source:
    """What a Family needs of a checkpoint, for a GGUF file."""

    path: Path
    config: Config
    tensors: dict


@dataclass
class GGUFModel:
    path: Path
    family: object
    weights: GGUFWeights
    kv: dict
    n_vocab: int

    def forward(self):
        return self.family.forward(self.weights)

    @property
    def bos_id(self) -> int | None:
        """BOS when the model adds one (llama.cpp's perplexity starts each chunk with it)."""
        if self.kv.get("tokenizer.ggml.add_bos_token") and self.kv.get("tokenizer.ggml.bos_token_id") is not None:
            return int(self.kv["tokenizer.ggml.bos_token_id"])
        return None


def open_gguf(path: Path) -> GGUFModel:
    reader = read_gguf(path)
    kv = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    arch = kv.get("general.architecture")
    by_arch: dict[str, list] = {}
    for f in dict.fromkeys(FAMILIES.values()):
        by_arch.setdefault(gguf.MODEL_ARCH_NAMES[f.gguf_arch], []).append(f)
    cls = next((f for f in by_arch.get(arch, []) if f.reads_gguf(kv)), None)
    if cls is None:
        raise InputError(f"{path}: architecture {arch!r} cannot be evaluated; qconvert's forward knows "
                         f"{', '.join(sorted(by_arch))}")
    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise InputError(f"{path}: no token_embd.weight tensor")
    blocks_ = {int(n.split(".")[1]) for n in names if n.startswith("blk.") and n.split(".")[1].isdigit()}
    count = kv.get(f"{arch}.block_count")
    if not isinstance(count, int) or count != len(blocks_) or (blocks_ and max(blocks_) != count - 1):
        raise InputError(f"{path}: {arch}.block_count is {count!r}, the tensors hold {len(blocks_)} blocks")
    cfg = cls.config_from_gguf(kv)
    cfg["vocab_size"] = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1])
    family = cls(_Source(path, Config(cfg, path), {}))
    weights = GGUFWeights(reader, family)
    family.check_tensors(lambda name: weights[name].shape if name in weights else None, path)
    return GGUFModel(path, family, weights, kv, cfg["vocab_size"])
