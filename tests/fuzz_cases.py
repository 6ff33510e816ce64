"""Hostile and broken inputs for the whole command line, generated from a seed.

Each case copies a tiny model (and, for GGUF and imatrix cases, files made from it), breaks one
thing, and runs one command. `python -m tests.fuzz_cases BASE OUT.jsonl` runs every case in
this process (the CLI in-process, as a user's shell would run it, with a per-case alarm) and
writes one JSON line per case: its exit code, stderr, and the files it left. tests/test_fuzz.py
runs it in a child process under a memory limit and judges the lines.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import struct
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SEED = int(os.environ.get("QCONVERT_FUZZ_SEED", "20261202"))  # other seeds: a longer hunt
TEXT_LINE = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
             "must be in want of a wife. ")
CALIB = ["--calib-samples", "2", "--calib-seq-len", "32"]
NASTY = [0, -1, 10 ** 9, 2 ** 31, 2 ** 63, 1.5, -2.5, float("nan"), "x", "", None, True, [], {}, [1, 2], {"a": 1}]


@dataclass
class Case:
    name: str
    break_it: Callable[[Path], None]  # mutates the case's copy of the model directory (and files beside it)
    args: Callable[[Path], list[str]]  # the command, given the case directory
    produces: str = "gguf"  # what an exit 0 leaves in out/: "gguf", "checkpoint" or "nothing"
    files: list[str] = field(default_factory=list)


# ---- helpers that break files -------------------------------------------------------------------

def st_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header: object, data: bytes, raw_header: bytes | None = None) -> None:
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def edit_json(path: Path, fn: Callable[[object], object]) -> None:
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


def deep(n: int = 200_000) -> str:
    return "[" * n + "]" * n


def gguf_patch_u32(path: Path, key: str, value: int) -> None:
    """Overwrite the uint32/int32 value of `key` in a GGUF file's header."""
    raw = bytearray(path.read_bytes())
    k = key.encode()
    at = raw.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)
    kind = struct.unpack_from("<I", raw, at)[0]
    assert kind in (4, 5), (key, kind)
    struct.pack_into("<I" if kind == 4 else "<i", raw, at + 4, value)
    path.write_bytes(bytes(raw))


def gguf_header_end(path: Path) -> int:
    from gguf import GGUFReader

    r = GGUFReader(path)
    return int(min(t.data_offset for t in r.tensors))


def imatrix_file(path: Path, sums: dict[str, list], counts: dict[str, list], meta: bool = True) -> None:
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "imatrix")
    if meta:
        w.add_string("general.type", "imatrix")
        w.add_array("imatrix.datasets", ["fuzz"])
        w.add_uint32("imatrix.chunk_count", 1)
        w.add_uint32("imatrix.chunk_size", 32)
    for name in sums:
        w.add_tensor(f"{name}.in_sum2", np.asarray(sums[name], dtype=np.float32).reshape(1, -1))
    for name in counts:
        w.add_tensor(f"{name}.counts", np.asarray(counts[name], dtype=np.float32).reshape(1, -1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- the cases ------------------------------------------------------------------------------------

def convert(*extra: str) -> Callable[[Path], list[str]]:
    return lambda d: [str(d / "model"), "--to", "q8_0", "-o", str(d / "out"), *extra]


FAMILIES = ("llama", "gemma3", "gpt2", "gpt_neox", "qwen3")  # the models the cases start from


def cases(inputs: Path, seed: int = SEED) -> list[Case]:
    """Every case, from the models and files in `inputs` (see make_inputs)."""
    rng = random.Random(seed)
    out: list[Case] = []
    base, gguf_file, imatrix = inputs / "llama", inputs / "llama.gguf", inputs / "llama.imatrix.gguf"
    header, _ = st_header(base / "model.safetensors")
    names = sorted(n for n in header if n != "__metadata__")

    def family_copy(family: str) -> Callable[[Path], None]:
        def use(d: Path) -> None:
            shutil.rmtree(d / "model")
            shutil.copytree(inputs / family, d / "model")
        return use

    # every config key of every family, dropped in turn: a file that llama.cpp loads, or exit 3
    for family in FAMILIES:
        for key in sorted(json.loads((inputs / family / "config.json").read_text())):
            def brk(d: Path, family=family, key=key) -> None:
                family_copy(family)(d)
                edit_json(d / "model" / "config.json", lambda c: {k: v for k, v in c.items() if k != key})
            out.append(Case(f"config-drop-{family}-{key}", brk, convert()))

    # safetensors headers
    def st_case(i: int) -> Case:
        kind = rng.choice(["dtype", "shape", "offsets", "drop", "rename", "meta", "swap", "truncate", "flip",
                           "length", "garbage", "deep", "empty", "list", "entry"])
        name = rng.choice(names)

        def brk(d: Path, kind=kind, name=name, r=random.Random(rng.random())) -> None:
            f = d / "model" / "model.safetensors"
            h, data = st_header(f)
            if kind == "dtype":
                h[name]["dtype"] = r.choice(["F8", "I64", "", 5, None, "F16", "BF16", "BOOL", "U8"])
            elif kind == "shape":
                shape = list(h[name]["shape"])
                h[name]["shape"] = r.choice([[], [0], [-1], [2 ** 40], [1.5], "x", None, shape[::-1],
                                             [shape[0] + 1, *shape[1:]], shape + [1], [0] * len(shape)])
            elif kind == "offsets":
                b, e = h[name]["data_offsets"]
                h[name]["data_offsets"] = r.choice([[e, b], [b, e + 1], [b, 2 ** 62], [-8, e - 8], [b], "x", None,
                                                    [b + 1, e + 1], [b, b]])
            elif kind == "drop":
                del h[name]
            elif kind == "rename":
                h[r.choice(["model.layers.7.mlp.up_proj.weight", "model.extra.weight", "lm_head.bias",
                            name.replace("layers.1", "layers.2"), name + ".x"])] = h.pop(name)
            elif kind == "meta":
                h["__metadata__"] = r.choice([[], "x", {"a": {"b": 1}}, None, 5])
            elif kind == "swap":
                other = r.choice(names)
                h[name], h[other] = h[other], h[name]
            elif kind == "truncate":
                f.write_bytes(f.read_bytes()[: r.randrange(0, f.stat().st_size)])
                return
            elif kind == "flip":  # data bytes: NaN/Inf or just other weights
                raw = bytearray(f.read_bytes())
                for _ in range(r.randrange(1, 50)):
                    raw[r.randrange(len(raw) - len(data), len(raw))] = r.randrange(256)
                f.write_bytes(bytes(raw))
                return
            elif kind == "length":
                raw = f.read_bytes()
                f.write_bytes(struct.pack("<Q", r.choice([0, 1, 7, 2 ** 63, len(raw), 10 ** 9])) + raw[8:])
                return
            elif kind == "garbage":
                write_st(f, None, data, bytes(r.randrange(256) for _ in range(r.randrange(1, 400))))
                return
            elif kind == "deep":
                write_st(f, None, data, deep().encode())
                return
            elif kind == "empty":
                write_st(f, {}, b"")
                return
            elif kind == "list":
                write_st(f, None, data, b"[1, 2, 3]")
                return
            elif kind == "entry":
                h[name] = r.choice([[], "x", None, 5, {"dtype": "F32"}])
            write_st(f, h, data)
        return Case(f"safetensors-{i}-{kind}-{name}", brk, convert())
    out += [st_case(i) for i in range(70)]

    # config.json
    def cfg_case(i: int) -> Case:
        kind = rng.choice(["value", "value", "value", "value", "rope", "arch", "file", "deep", "list"])
        family = rng.choice(FAMILIES)
        key = rng.choice(sorted(json.loads((inputs / family / "config.json").read_text())))
        value = rng.choice(NASTY)
        target = rng.choice(["q8_0", "q8_0", "q4_k_m", "gptq", "eval"])

        def brk(d: Path, kind=kind, key=key, value=value, family=family, r=random.Random(rng.random())) -> None:
            family_copy(family)(d)
            f = d / "model" / "config.json"
            if kind == "value":
                edit_json(f, lambda c: {**c, key: value})
            elif kind == "drop":
                edit_json(f, lambda c: {k: v for k, v in c.items() if k != key})
            elif kind == "rope":
                rope = r.choice([{"rope_type": "yarn"}, {"rope_type": "linear"}, {"type": "llama3"},
                                 {"rope_type": "linear", "factor": "x"}, {"rope_type": "nope", "factor": 2.0},
                                 {"rope_type": "llama3", "factor": 0}, {"factor": 2}, [], "linear", 5,
                                 {"rope_type": "yarn", "factor": 4.0}])
                edit_json(f, lambda c: {**c, r.choice(["rope_scaling", "rope_parameters"]): rope})
            elif kind == "arch":
                edit_json(f, lambda c: {**c, "architectures": r.choice([[], ["FooForCausalLM"], "x", [5], None])})
            elif kind == "file":
                f.write_bytes(r.choice([b"", b"{", b"\xff\xfe\x00", b"null", b"\"x\""]))
            elif kind == "deep":
                f.write_text(deep())
            elif kind == "list":
                f.write_text("[1, 2]")

        def args(d: Path, target=target) -> list[str]:
            if target == "eval":
                return ["eval", str(d / "model"), "--text", str(d / "text.txt"), "--ctx", "16", "--chunks", "1"]
            extra = ["--group-size", "32"] if target == "gptq" else []
            return [str(d / "model"), "--to", target, "-o", str(d / "out" / ("g" if target == "gptq" else "")),
                    *CALIB, *extra]
        produces = {"eval": "nothing", "gptq": "checkpoint"}.get(target, "gguf")
        return Case(f"config-{i}-{family}-{kind}-{key}-{target}", brk, args, produces)
    out += [cfg_case(i) for i in range(150)]

    # model.safetensors.index.json
    def index_case(i: int) -> Case:
        kind = rng.choice(["dotdot", "absolute", "outside", "empty", "number", "missing-file", "list", "null",
                           "missing-tensor", "extra-tensor", "deep", "not-json"])

        def brk(d: Path, kind=kind) -> None:
            m = d / "model"
            h, _ = st_header(m / "model.safetensors")
            wm = {n: "model.safetensors" for n in h if n != "__metadata__"}
            some = sorted(wm)[0]
            if kind == "dotdot":
                shutil.copy(m / "model.safetensors", d / "x.safetensors")
                wm = {n: "../x.safetensors" for n in wm}
            elif kind == "absolute":
                wm[some] = "/etc/passwd"
            elif kind == "outside":
                shutil.copy(m / "model.safetensors", d / "x.safetensors")
                wm = {n: str(d / "x.safetensors") for n in wm}
            elif kind == "empty":
                wm[some] = ""
            elif kind == "number":
                wm[some] = 5
            elif kind == "missing-file":
                wm[some] = "model-00002-of-00002.safetensors"
            elif kind == "missing-tensor":
                wm["model.layers.0.mlp.extra.weight"] = "model.safetensors"
            elif kind == "extra-tensor":
                del wm[some]
            index = {"metadata": {}, "weight_map": wm}
            if kind == "list":
                index = {"weight_map": list(wm)}
            elif kind == "null":
                index = {"weight_map": None}
            text = json.dumps(index)
            if kind == "deep":
                text = deep()
            elif kind == "not-json":
                text = "{weight_map"
            (m / "model.safetensors.index.json").write_text(text)
        return Case(f"index-{i}-{kind}", brk, convert())
    out += [index_case(i) for i in range(30)]

    # tokenizer files
    def tok_case(i: int) -> Case:
        kind = rng.choice(["tokenizer-json", "tokenizer-json", "config", "config", "special", "remove", "added",
                           "vocab-ids", "spm", "spm"])
        choice = rng.random()

        def brk(d: Path, kind=kind, choice=choice) -> None:
            m = d / "model"
            r = random.Random(choice)
            if kind == "spm":  # Gemma 3's SentencePiece model, broken
                family_copy("gemma3")(d)
                f = m / "tokenizer.model"
                raw = f.read_bytes()
                f.write_bytes(r.choice([b"", raw[: len(raw) // 3], bytes(r.randrange(256) for _ in range(500)),
                                        raw[:100] + bytes(200) + raw[300:]]))
                return
            if kind == "tokenizer-json":
                f = m / "tokenizer.json"
                f.write_bytes(r.choice([b"", b"[]", b"{}", deep().encode(), f.read_bytes()[: len(f.read_bytes()) // 2],
                                        b"\xff\xfe", b'{"model": 5}', b'{"model": {"type": "BPE", "vocab": []}}']))
            elif kind == "config":
                f = m / "tokenizer_config.json"
                f.write_text(r.choice([
                    "[1, 2]", '"x"', deep(), json.dumps({"chat_template": bytes(range(256)).decode("latin-1")}),
                    json.dumps({"chat_template": 5}), json.dumps({"chat_template": [{"name": 5}]}),
                    json.dumps({"add_bos_token": "x", "bos_token": 5}), json.dumps({"add_prefix_space": "x"}),
                    json.dumps({"added_tokens_decoder": {"x": 5}}), json.dumps({"added_tokens_decoder": []}),
                    json.dumps({"bos_token": {"content": 5}}), json.dumps({"eos_token": []})]))
                if r.random() < 0.3:
                    f.write_bytes(bytes(r.randrange(256) for _ in range(100)))
            elif kind == "special":
                (m / "special_tokens_map.json").write_text(r.choice(["[]", deep(), '{"bos_token": 5}', "{",
                                                                      '{"eos_token": {"content": []}}']))
            elif kind == "remove":
                (m / "tokenizer.json").unlink()
            elif kind == "added":
                (m / "added_tokens.json").write_text(r.choice(['{"x": 1000000}', "[]", '{"y": "z"}', deep()]))
            elif kind == "vocab-ids":
                edit_json(m / "tokenizer.json", lambda t: {**t, "model": {**t["model"], "vocab": {
                    **t["model"]["vocab"], "zzz": r.choice([10 ** 6, -1, 2 ** 40])}}})
        target = rng.choice(["q8_0", "q4_k_m"])
        return Case(f"tokenizer-{i}-{kind}-{target}", brk,
                    lambda d, t=target: [str(d / "model"), "--to", t, "-o", str(d / "out"), *CALIB])
    out += [tok_case(i) for i in range(60)]

    # GGUF headers, read by inspect and eval
    end = gguf_header_end(gguf_file)

    def gguf_case(i: int) -> Case:
        kind = rng.choice(["flip", "flip", "truncate", "counts", "block_count", "head_count", "embedding",
                           "nested", "dims", "type", "offset", "utf8"])
        command = rng.choice(["inspect", "eval"])

        def brk(d: Path, kind=kind, r=random.Random(rng.random())) -> None:
            f = d / "m.gguf"
            shutil.copy(gguf_file, f)
            raw = bytearray(f.read_bytes())
            if kind == "flip":
                for _ in range(r.randrange(1, 8)):
                    raw[r.randrange(4, end)] = r.randrange(256)
            elif kind == "truncate":
                raw = raw[: r.randrange(0, len(raw))]
            elif kind == "counts":
                struct.pack_into("<Q", raw, r.choice([8, 16]), r.choice([2 ** 60, 10 ** 6, 0]))
            elif kind in ("block_count", "head_count", "embedding"):
                key = {"block_count": "llama.block_count", "head_count": "llama.attention.head_count",
                       "embedding": "llama.embedding_length"}[kind]
                f.write_bytes(bytes(raw))
                gguf_patch_u32(f, key, r.choice([0, 2 ** 31, 3, 2 ** 32 - 1]))
                return
            elif kind == "nested":  # the first array key's element type -> "array", with a huge count
                k = b"tokenizer.ggml.tokens"
                at = raw.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)
                struct.pack_into("<IIQ", raw, at, 9, 9, 2 ** 40)
            elif kind == "dims":
                k = b"token_embd.weight"
                at = raw.index(struct.pack("<Q", len(k)) + k, 24) + 8 + len(k)
                struct.pack_into("<I", raw, at, r.choice([0, 9, 2 ** 31]))
            elif kind == "type":
                k = b"output_norm.weight"
                at = raw.index(struct.pack("<Q", len(k)) + k, 24) + 8 + len(k)
                n_dims = struct.unpack_from("<I", raw, at)[0]
                struct.pack_into("<I", raw, at + 4 + 8 * n_dims, r.choice([99, 4, 5, 2 ** 31]))
            elif kind == "offset":
                k = b"output.weight"
                at = raw.index(struct.pack("<Q", len(k)) + k, 24) + 8 + len(k)
                n_dims = struct.unpack_from("<I", raw, at)[0]
                struct.pack_into("<Q", raw, at + 8 + 8 * n_dims, r.choice([2 ** 62, 1, 10 ** 9]))
            elif kind == "utf8":
                k = b"general.architecture"
                at = raw.index(struct.pack("<Q", len(k)) + k) + 8 + len(k) + 4 + 8
                raw[at] = 0xFF
            f.write_bytes(bytes(raw))

        def args(d: Path, command=command) -> list[str]:
            if command == "inspect":
                return ["inspect", str(d / "m.gguf"), "--json"]
            return ["eval", str(d / "m.gguf"), "--text", str(d / "text.txt"), "--tokenizer", str(d / "model"),
                    "--ctx", "16", "--chunks", "1"]
        return Case(f"gguf-{i}-{kind}-{command}", brk, args, "nothing")
    out += [gguf_case(i) for i in range(60)]

    # importance matrices
    def im_case(i: int) -> Case:
        kind = rng.choice(["uneven", "zero-counts", "negative", "nan", "no-meta", "garbage", "truncate", "legacy",
                           "mismatch", "sums-only", "wrong-columns", "flip"])

        def brk(d: Path, kind=kind, r=random.Random(rng.random())) -> None:
            f = d / "m.imatrix"
            name = "blk.0.attn_q.weight"
            if kind == "uneven":
                imatrix_file(f, {name: [1.0] * 64}, {name: [1.0, 2.0, 3.0]})
            elif kind == "zero-counts":
                imatrix_file(f, {name: [1.0] * 64}, {name: []}) if r.random() < 0.5 else \
                    imatrix_file(f, {name: [1.0] * 64}, {name: [0.0]})
            elif kind == "negative":
                imatrix_file(f, {name: [1.0] * 64}, {name: [-5.0]})
            elif kind == "nan":
                imatrix_file(f, {name: [float("nan")] * 64}, {name: [1.0]})
            elif kind == "no-meta":
                imatrix_file(f, {name: [1.0] * 64}, {name: [1.0]}, meta=False)
            elif kind == "garbage":
                f.write_bytes(bytes(r.randrange(256) for _ in range(r.randrange(0, 300))))
            elif kind == "truncate":
                raw = imatrix.read_bytes()
                f.write_bytes(raw[: r.randrange(0, len(raw))])
            elif kind == "legacy":
                f.write_bytes(struct.pack("<i", r.choice([1, 5, 10 ** 6])) + struct.pack("<i", r.choice([4, -3, 10 ** 8]))
                              + b"blk." + bytes(r.randrange(256) for _ in range(r.randrange(0, 60))))
            elif kind == "mismatch":
                imatrix_file(f, {name: [1.0] * 64}, {"blk.1.attn_q.weight": [1.0]})
            elif kind == "sums-only":
                imatrix_file(f, {name: [1.0] * 64}, {})
            elif kind == "wrong-columns":
                imatrix_file(f, {name: [1.0] * 63}, {name: [1.0]})
            elif kind == "flip":
                raw = bytearray(imatrix.read_bytes())
                for _ in range(r.randrange(1, 6)):
                    raw[r.randrange(4, len(raw))] = r.randrange(256)
                f.write_bytes(bytes(raw))
        return Case(f"imatrix-{i}-{kind}", brk, lambda d: [str(d / "model"), "--to", "q4_k_m", "--imatrix",
                                                           str(d / "m.imatrix"), "-o", str(d / "out")])
    out += [im_case(i) for i in range(30)]

    # calibration text
    def calib_case(i: int) -> Case:
        kind = rng.choice(["empty", "space", "binary", "latin1", "jsonl-list", "jsonl-no-text", "jsonl-deep", "short",
                           "dir", "missing", "jsonl-mixed"])
        target = rng.choice(["q4_k_m", "gptq", "imatrix"])

        def brk(d: Path, kind=kind, r=random.Random(rng.random())) -> None:
            f = d / ("c.jsonl" if kind.startswith("jsonl") else "c.txt")
            if kind == "empty":
                f.write_text("")
            elif kind == "space":
                f.write_text(" \n\t " * 50)
            elif kind == "binary":
                f.write_bytes(bytes(r.randrange(256) for _ in range(2000)))
            elif kind == "latin1":
                f.write_bytes(("caf\xe9 " * 400).encode("latin-1"))
            elif kind == "jsonl-list":
                f.write_text("[1, 2]\n" * 10)
            elif kind == "jsonl-no-text":
                f.write_text('{"content": "x"}\n' * 10)
            elif kind == "jsonl-deep":
                f.write_text(deep() + "\n")
            elif kind == "jsonl-mixed":
                f.write_text(json.dumps({"text": TEXT_LINE * 20}) + "\n{oops\n")
            elif kind == "short":
                f.write_text("Hello.")
            elif kind == "dir":
                f.mkdir()

        def args(d: Path, kind=kind, target=target) -> list[str]:
            f = d / ("c.jsonl" if kind.startswith("jsonl") else "c.txt")
            if target == "imatrix":
                return ["imatrix", str(d / "model"), "-o", str(d / "out" / "m.imatrix.gguf"), "--calib", str(f), *CALIB]
            extra = ["--group-size", "32"] if target == "gptq" else []
            return [str(d / "model"), "--to", target, "-o", str(d / "out" / ("g" if target == "gptq" else "")),
                    "--calib", str(f), *CALIB, *extra]
        return Case(f"calib-{i}-{kind}-{target}", brk, args, "checkpoint" if target == "gptq" else "gguf")
    out += [calib_case(i) for i in range(25)]

    # options
    option_sets = [["--seed", "-1"], ["--calib-samples", "-3"], ["--calib-seq-len", "0"], ["--threads", "-1"],
                   ["--to", "gptq", "--group-size", "7"], ["--to", "gptq", "--bits", "9"], ["--to", "gptq", "--damp", "2"],
                   ["--to", "gptq", "--max-shard-size", "-5GB"], ["--to", "gptq", "--max-shard-size", "xyz"],
                   ["--to", "q4_k_m", "--tensor-type", "(=q8_0"], ["--to", "q4_k_m", "--tensor-type", "x=nope"],
                   ["--to", "q4_k_m", "--output-tensor-type", "nope"], ["--to", ""], ["--to", ",,"],
                   ["--to", "q4_k_m", "--no-calib", "--imatrix", "x.gguf"], ["--seed", "99999999999999999999999"],
                   ["--to", "q8_0", "--calib-seq-len", "100000000"], ["--to", "q4_k_m", "--calib-samples",
                                                                       "100000000", "--calib-seq-len", "16"],
                   ["--to", "gptq", "--group-size", "32", "--calib-seq-len", "100000000", "--calib-samples", "1"],
                   ["--to", "q8_0", "--revision", "x"], ["--to", "q8_0", "--tensor-type", "a=q8_0"]]
    for i, opts in enumerate(option_sets):
        args = [*opts] if "--to" in opts else ["--to", "q8_0", *opts]
        produces = "checkpoint" if "gptq" in opts else "gguf"
        out.append(Case(f"options-{i}-{'_'.join(opts)}", lambda d: None,
                        lambda d, a=args: [str(d / "model"), *a, "-o", str(d / "out" / "x")], produces))
    eval_opts = [["--ctx", "7"], ["--ctx", "-2"], ["--chunks", "0"], ["--ctx", "100000000"], ["--chunks", "-1"]]
    for i, opts in enumerate(eval_opts):
        out.append(Case(f"eval-options-{i}", lambda d: None,
                        lambda d, o=opts: ["eval", str(d / "m.gguf"), "--text", str(d / "text.txt"), "--tokenizer",
                                           str(d / "model"), *o], "nothing"))
    return out


def make_inputs(inputs: Path) -> None:
    """The models the cases break (one per family in FAMILIES), llama's Q8_0 GGUF and an
    importance matrix of it."""
    from qconvert.cli import main
    from tests.models import build

    for family in FAMILIES:
        build(family, inputs / family)
    for argv in ([str(inputs / "llama"), "--to", "q8_0", "-o", str(inputs / "llama.gguf"), "-q"],
                 ["imatrix", str(inputs / "llama"), "-o", str(inputs / "llama.imatrix.gguf"), *CALIB, "-q"]):
        try:
            main(argv)
        except SystemExit as e:
            if e.code not in (0, None):
                raise RuntimeError(f"making the fuzz inputs: {argv} exited {e.code}") from None


def prepare(case_dir: Path, inputs: Path) -> None:
    shutil.copytree(inputs / "llama", case_dir / "model")
    shutil.copy(inputs / "llama.gguf", case_dir / "m.gguf")
    (case_dir / "text.txt").write_text(TEXT_LINE * 40)
    (case_dir / "work").mkdir()


class _Timeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise _Timeout("case ran past its time")


def run_all(inputs: Path, root: Path, results: Path) -> None:
    from qconvert.cli import main

    make_inputs(inputs)
    signal.signal(signal.SIGALRM, _alarm)
    with open(results, "w") as log:
        for case in cases(inputs):
            d = root / case.name
            prepare(d, inputs)
            case.break_it(d)
            argv = case.args(d)
            err, out = io.StringIO(), io.StringIO()
            os.chdir(d / "work")
            signal.alarm(60)
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                    main(argv)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - anything escaping main() is a failure to report
                code = -1
                err.write(traceback.format_exc())
            finally:
                signal.alarm(0)
            left = sorted(str(p.relative_to(d)) for p in (d / "out").rglob("*")) if (d / "out").exists() else []
            left += sorted(str(p.relative_to(d)) for p in (d / "work").rglob("*"))
            partial = sorted(str(p.relative_to(d)) for p in d.rglob("*.partial"))
            log.write(json.dumps({"name": case.name, "argv": argv, "code": code, "stderr": err.getvalue(),
                                  "left": left, "partial": partial, "produces": case.produces,
                                  "out": str(d / "out"), "out_exists": (d / "out").exists()}) + "\n")
            log.flush()


if __name__ == "__main__":
    run_all(*(Path(a) for a in sys.argv[1:4]))
