"""Typed, required access to config.json: `cfg.need(int, "hidden_size")` fails naming key and file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from qconvert.errors import InputError

T = TypeVar("T")

_MISSING = object()


MAX_JSON_BYTES = 64 << 20  # configs, indexes and tokenizer files are far smaller


def parse_json(text: str | bytes, path: Path) -> Any:
    """JSON from a file's text; malformed, or nested deeper than Python can parse: InputError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text: {e}") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to read") from None


def read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise InputError(f"{path}: {path.stat().st_size} bytes is too large for a JSON file of a model")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read: {e}") from None
    return parse_json(text, path)


class Config:
    """A model's config.json, with a nested `text_config` lifted to the top (as llama.cpp does)."""

    def __init__(self, data: dict[str, Any], path: Path):
        if not isinstance(data, dict):
            raise InputError(f"{path}: must hold a JSON object, got {type(data).__name__}")
        if isinstance(data.get("text_config"), dict):
            data = {**data, **data["text_config"]}
        self.data = data
        self.path = path

    @classmethod
    def load(cls, path: Path) -> Config:
        return cls(read_json(path), path)

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def _typed(self, typ: type[T], key: str, value: Any) -> T:
        ok = isinstance(value, typ) and not (typ in (int, float) and isinstance(value, bool))
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)  # type: ignore[return-value]
        if not ok:
            raise InputError(f"{self.path}: key {key!r} must be {typ.__name__}, got {value!r}")
        return value

    def need(self, typ: type[T], *keys: str) -> T:
        """The first of `keys` present, checked to be `typ`; missing everywhere is an error."""
        for key in keys:
            if key in self.data and self.data[key] is not None:
                return self._typed(typ, key, self.data[key])
        names = " or ".join(repr(k) for k in keys)
        raise InputError(f"{self.path}: missing required key {names}")

    def get(self, typ: type[T], *keys: str, default: Any = None, positive: bool = False,
            nonnegative: bool = False) -> Any:
        """The first of `keys` present, checked to be `typ` (and > 0 or >= 0 when asked), else
        `default`."""
        for key in keys:
            if key in self.data and self.data[key] is not None:
                v = self._typed(typ, key, self.data[key])
                if (positive and not v > 0) or (nonnegative and not v >= 0) or (typ is float and v != v):
                    raise InputError(f"{self.path}: key {key!r} must be {'positive' if positive else 'at least 0'}, "
                                     f"got {v!r}")
                return v
        return default

    def positive(self, typ: type[T], *keys: str) -> T:
        """`need`, and the value must be above zero (a size, a count)."""
        v = self.need(typ, *keys)
        if not v > 0:  # type: ignore[operator]
            key = next(k for k in keys if self.data.get(k) is not None)
            raise InputError(f"{self.path}: key {key!r} must be positive, got {v!r}")
        return v

    def architecture(self) -> str:
        archs = self.data.get("architectures")
        if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
            raise InputError(f"{self.path}: key 'architectures' must be a non-empty list of names, got {archs!r}")
        return archs[0]
