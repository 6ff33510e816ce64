"""A Hugging Face checkpoint on disk (or in the hub cache): config, tokenizer files and tensors.

Nothing is loaded here: tensors are indexed from safetensors headers (or a torch `.bin` opened
with weights_only=True and mmap) and read one at a time by the pipeline.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from qconvert.errors import InputError
from qconvert.read.config import Config, read_json
from qconvert.read.safetensors import SafetensorsFile, TensorRef

# files a conversion needs besides the weights; fetched from the hub with them
SIDE_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json",
              "merges.txt", "chat_template.jinja", "chat_template.json", "README.md"]


class Tensor(Protocol):
    name: str
    dtype: str  # safetensors spelling: F32, F16, BF16, ...
    shape: tuple[int, ...]

    def array(self) -> np.ndarray: ...
    def release(self) -> None: ...


@dataclass
class TorchTensorRef:
    """A tensor from a pytorch_model.bin, loaded with weights_only=True and mmap=True."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    _t: object

    def array(self) -> np.ndarray:
        import torch
        t = self._t
        if t.dtype == torch.bfloat16:  # type: ignore[attr-defined]
            return t.contiguous().view(torch.int16).numpy().view(np.uint16)  # type: ignore[attr-defined]
        return t.contiguous().numpy()  # type: ignore[attr-defined]

    def release(self) -> None:
        pass


_TORCH_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
                 "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


@dataclass
class Checkpoint:
    path: Path  # the directory the files are in (a snapshot directory for hub ids)
    source: str  # what the user named: a directory or a hub id
    revision: str | None
    config: Config
    tensors: dict[str, Tensor]
    weight_files: list[Path]
    _open: list[SafetensorsFile] = field(default_factory=list, repr=False)

    def file(self, name: str) -> Path | None:
        p = self.path / name
        return p if p.is_file() else None

    def close(self) -> None:
        for f in self._open:
            f.close()


def resolve(source: str, revision: str | None = None) -> Path:
    """A local directory as is; anything else is a hub id resolved through huggingface_hub,
    which honours HF_HOME and HF_HUB_OFFLINE (then only the local cache is used)."""
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise InputError(f"{source}: not a directory (give a model directory or a hub id)")
    looks_like_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if not looks_like_id:
        raise InputError(f"{source}: no such directory")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError
    except ImportError as e:  # pragma: no cover - a hard dependency
        raise InputError(f"{source}: huggingface_hub is needed for hub ids ({e})") from None
    patterns = SIDE_FILES + ["*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                             "pytorch_model.bin.index.json"]
    try:
        return Path(snapshot_download(source, revision=revision, allow_patterns=patterns))
    except HFValidationError as e:
        raise InputError(f"{source}: not a directory, nor a valid hub id ({e})") from None
    except Exception as e:  # the hub client raises many types; all mean "could not get it"
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise InputError(f"{source}: cannot get this hub model{hint}: {type(e).__name__}: {e}".splitlines()[0]) from None


def inside(name: str) -> bool:
    """A shard name from an index stays inside the model directory: relative, no '..'."""
    p = Path(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name and "\0" not in name


def _part_names(d: Path, prefix: str, suffix: str) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith(prefix) and n.endswith(suffix))


def open_checkpoint(source: str, revision: str | None = None) -> Checkpoint:
    d = resolve(source, revision)
    config_path = d / "config.json"
    if not config_path.is_file():
        raise InputError(f"{config_path}: file not found (is {source} a Hugging Face model directory?)")
    config = Config.load(config_path)

    st_index = d / "model.safetensors.index.json"
    parts = _part_names(d, "model", ".safetensors")
    kind = "safetensors"
    index = st_index
    if not parts and not st_index.is_file():
        kind, index = "bin", d / "pytorch_model.bin.index.json"
        parts = _part_names(d, "pytorch_model", ".bin")
    weight_map: dict[str, str] = {}
    if index.is_file():
        data = read_json(index)
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict):
            raise InputError(f"{index}: has no 'weight_map' object")
        for name, part in wm.items():
            if not isinstance(part, str) or not inside(part):
                raise InputError(f"{index}: tensor {name!r} is mapped to {part!r}, which is not a file name inside "
                                 "the model directory")
        weight_map = wm
        parts = sorted(set(weight_map.values()))
        missing = [p for p in parts if not (d / p).is_file()]
        if missing:
            raise InputError(f"{d / missing[0]}: file not found (listed in {index.name}; "
                             f"{len(missing)} of {len(parts)} shards missing)")
    if not parts:
        raise InputError(f"{d}: no model weights (model*.safetensors or pytorch_model*.bin)")

    tensors: dict[str, Tensor] = {}
    opened: list[SafetensorsFile] = []
    for part in parts:
        path = d / part
        if kind == "safetensors":
            f = SafetensorsFile(path)
            opened.append(f)
            found: dict[str, Tensor] = dict(sorted(f.tensors.items()))
        else:
            found = _open_bin(path)
        for name, t in found.items():
            if name in tensors:
                raise InputError(f"{path}: tensor {name!r} is also in another shard")
            tensors[name] = t
    if not tensors:
        raise InputError(f"{d}: the weight files hold no tensors ({', '.join(parts)})")
    if weight_map:
        listed, present = set(weight_map), set(tensors)
        if listed - present:
            name = sorted(listed - present)[0]
            raise InputError(f"{d / weight_map[name]}: tensor {name!r} listed in {index.name} is missing "
                             f"({len(listed - present)} missing; incomplete shard?)")
        if present - listed:
            name = sorted(present - listed)[0]
            raise InputError(f"{index}: does not list tensor {name!r} found in the shards")
    return Checkpoint(d, source, revision, config, tensors, [d / p for p in parts], opened)


def _open_bin(path: Path) -> dict[str, Tensor]:
    import pickle

    import torch
    try:
        sd = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise InputError(f"{path}: cannot load with weights_only=True: {str(e).splitlines()[0]}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise InputError(f"{path}: must hold a state dict, got {type(sd).__name__}")
    out: dict[str, Tensor] = {}
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue
        dt = _TORCH_DTYPES.get(str(t.dtype).removeprefix("torch."))
        if dt is None:
            raise InputError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
        out[name] = TorchTensorRef(name, dt, tuple(t.shape), t)
    return out


__all__ = ["Checkpoint", "Tensor", "TensorRef", "open_checkpoint", "resolve"]
