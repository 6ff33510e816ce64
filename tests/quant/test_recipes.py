"""q4_k_m and iq4_nl against llama.cpp's own quantizer: llama_model_quantize (the code behind
llama-quantize, through llama-cpp-python) applied to our F32 conversion must produce the very
file `--to q4_k_m --no-calib` writes in one step, byte for byte."""
from __future__ import annotations

import ctypes
import filecmp
import re

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import GGUFReader

from qconvert.errors import UsageError
from qconvert.quant import blocks
from qconvert.quant.recipes import RECIPES, Overrides, use_more_bits
from tests.helpers import convert_to, one_line_error, run_cli

FTYPES = {r.name: int(r.file_type) for r in RECIPES.values() if r.quantizes_like_llama_quantize}
PLAIN = [r for r in FTYPES if not RECIPES[r].needs_imatrix]  # llama-quantize writes these without one
NEEDS_IMATRIX = [r for r in FTYPES if RECIPES[r].needs_imatrix]


def numpy_spared(cases: list, keep: frozenset[str] = frozenset()) -> list:
    """Under QCONVERT_PUREPYTHON=1 the numpy lattice searches take tens of seconds per tiny model:
    there each lattice family's numpy path runs in one whole-file test (`keep`: iq3_s in
    test_one_step_equals_convert_then_llama_quantize, iq2_xxs and iq1_s in
    test_mixtures_that_need_an_imatrix_on_other_shapes; tests/quant/test_blocks.py and
    test_lattice.py hold every type's numpy reference to ggml byte for byte), the other cases are
    the C pass's. Cases: recipe names or tuples ending with one."""
    slow = pytest.mark.skipif(blocks.PURE_PYTHON, reason="lattice searches in numpy: see numpy_spared")
    out = []
    for case in cases:
        recipe = case[-1] if isinstance(case, tuple) else case
        if recipe.startswith(("iq1", "iq2", "iq3")) and recipe not in keep:
            case = pytest.param(*(case if isinstance(case, tuple) else (case,)), marks=slow)
        out.append(case)
    return out


def llama_quantize_status(src, dst, ftype: int, **params) -> int:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = 2
    for k, v in params.items():
        setattr(p, k, v)
    return llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))


def llama_quantize(src, dst, ftype: int, **params) -> None:
    assert llama_quantize_status(src, dst, ftype, **params) == 0


# where llama-quantize stops instead of writing a file: these families' rows of 64 fit no Q1_0
# block of 128, and tensor_type_fallback has no stand-in for Q1_0
STOPS = {("q1_0", f) for f in ("llama-tied", "qwen2", "gpt2", "gemma3")}


@pytest.mark.parametrize("recipe", numpy_spared(PLAIN, keep=frozenset({"iq3_s"})))
@pytest.mark.parametrize("family", ["llama-wide", "llama-tied", "qwen2", "gpt2", "gemma3"])
def test_one_step_equals_convert_then_llama_quantize(family, recipe, tiny, tmp_path):
    src = tiny(family)
    f32 = convert_to(src, "f32", tmp_path / "f32.gguf", threads=2).outputs[0]["path"]
    ref = tmp_path / "ref.gguf"
    if (recipe, family) in STOPS:  # so does qconvert, before writing anything, naming the tensor
        assert llama_quantize_status(f32, ref, FTYPES[recipe]) != 0
        with pytest.raises(UsageError, match=rf"--to {recipe}: \S+ rows of 64 fit no Q1_0 block of 128"):
            convert_to(src, recipe, tmp_path / "ours.gguf", threads=2)
        assert not (tmp_path / "ours.gguf").exists()
        return
    llama_quantize(f32, ref, FTYPES[recipe])
    ours = convert_to(src, recipe, tmp_path / "ours.gguf", threads=2).outputs[0]["path"]
    assert filecmp.cmp(ours, ref, shallow=False), "not byte-identical to llama-quantize's file"


@pytest.mark.skipif(blocks.PURE_PYTHON, reason="80 layers in numpy take half a minute; the rule is the recipe's, "
                    "which the C pass checks, and these types' numpy kernels are checked in the other tests")
@pytest.mark.parametrize("recipe", ["q4_k_s", "q3_k_s"])
def test_eighty_layers_with_grouped_keys_are_a_70b(recipe, tiny, tmp_path):
    """llama.cpp's LLM_TYPE_70B (80 Llama layers, n_head != n_head_kv) bumps Q3_K and Q4_K attn_v to Q5_K."""
    src = tiny("llama-80")
    f32 = convert_to(src, "f32", tmp_path / "f32.gguf", threads=2).outputs[0]["path"]
    ref = tmp_path / "ref.gguf"
    llama_quantize(f32, ref, FTYPES[recipe])
    ours = convert_to(src, recipe, tmp_path / "ours.gguf", threads=2).outputs[0]["path"]
    assert filecmp.cmp(ours, ref, shallow=False)
    types = {t.name: t.tensor_type for t in GGUFReader(ours).tensors}
    assert all(types[f"blk.{i}.attn_v.weight"] in (GT.Q5_K, GT.Q6_K) for i in range(80))


# what each refusal says of the first tensor it names, where a test pins it
FIRST_REFUSED = {"q2_k_s": "blk.0.attn_k.weight as Q2_K only from an importance matrix",
                 "iq3_xs": "as IQ3_XXS only from an importance matrix"}


@pytest.mark.parametrize("recipe", NEEDS_IMATRIX)
def test_no_calib_is_refused_where_llama_quantize_refuses(recipe, tiny, tmp_path, capsys):
    """llama-quantize refuses these mixtures without an importance matrix (ggml itself would
    quantize IQ3_XXS and Q2_K): so does --to X --no-calib, a usage error that says why, with
    nothing written."""
    import llama_cpp

    src = tiny("llama-wide")
    f32 = convert_to(src, "f32", tmp_path / "f32.gguf", threads=2).outputs[0]["path"]
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = FTYPES[recipe]
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp_path / "ref.gguf").encode(), ctypes.byref(p)) != 0
    code, _, err = run_cli([src, "--to", recipe, "--no-calib", "-o", tmp_path / "x.gguf"], capsys)
    assert code == 2
    one_line_error(err, f"--to {recipe}", FIRST_REFUSED.get(recipe, "only from an importance matrix"), "--no-calib")
    assert not (tmp_path / "x.gguf").exists()


def test_mixtures_that_need_an_importance_matrix_calibrate_by_default(tiny, tmp_path, capsys):
    code, out, err = run_cli([tiny("llama-wide"), "--to", "q2_k_s", "--calib-samples", "4", "--calib-seq-len", "32",
                              "-o", tmp_path / "x.gguf", "--json"], capsys)
    assert code == 0, err
    types = {t.name: t.tensor_type for t in GGUFReader(tmp_path / "x.gguf").tensors}
    assert types["blk.3.ffn_up.weight"] == GT.Q2_K and types["blk.0.ffn_down.weight"] == GT.Q4_K


def test_the_mixture_varies_by_layer(tiny, tmp_path):
    """On the 8-layer model the mixture is really mixed: Q6_K where use_more_bits says so."""
    rep = convert_to(tiny("llama-wide"), "q4_k_m", tmp_path / "x.gguf", threads=2)
    types = {t.name: t.tensor_type for t in GGUFReader(rep.outputs[0]["path"]).tensors}
    downs = [types[f"blk.{i}.ffn_down.weight"] for i in range(8)]
    assert downs == [GT.Q6_K if use_more_bits(i, 8) else GT.Q4_K for i in range(8)]
    assert types["blk.3.ffn_up.weight"] == GT.Q4_K and types["output.weight"] == GT.Q6_K
    assert types["blk.0.attn_norm.weight"] == GT.F32


@pytest.mark.parametrize("recipe", numpy_spared(PLAIN))
def test_overrides_match_llama_quantize(recipe, tiny, tmp_path):
    src = tiny("llama-wide")
    f32 = convert_to(src, "f32", tmp_path / "f32.gguf", threads=2).outputs[0]["path"]
    ref = tmp_path / "ref.gguf"
    llama_quantize(f32, ref, FTYPES[recipe], output_tensor_type=int(GT.Q8_0), token_embedding_type=int(GT.Q5_K))
    o = Overrides(output=blocks.Q8_0, token_embedding=blocks.Q5_K)
    ours = convert_to(src, recipe, tmp_path / "ours.gguf", threads=2, overrides=o).outputs[0]["path"]
    assert filecmp.cmp(ours, ref, shallow=False)
    pure = tmp_path / "pure.gguf"
    llama_quantize(f32, pure, FTYPES[recipe], pure=True)
    ours = convert_to(src, recipe, tmp_path / "ours-pure.gguf", threads=2,
                   overrides=Overrides(pure=True)).outputs[0]["path"]
    assert filecmp.cmp(ours, pure, shallow=False)


def test_tensor_type_override(tiny, tmp_path, capsys):
    src = tiny("llama-wide")
    out = tmp_path / "x.gguf"
    code, _, err = run_cli([src, "--to", "q4_k_m", "--no-calib", "-o", out, "--tensor-type", r"ffn_up=q8_0",
                            "--tensor-type", r"blk\.0\.attn_q=Q6_K"], capsys)
    assert code == 0, err
    types = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    assert all(types[f"blk.{i}.ffn_up.weight"] == GT.Q8_0 for i in range(8))
    assert types["blk.0.attn_q.weight"] == GT.Q6_K and types["blk.1.attn_q.weight"] == GT.Q4_K
    code, _, err = run_cli([src, "--to", "q4_k_m", "--no-calib", "-o", out, "-f", "--tensor-type", "ffn_up"], capsys)
    assert code == 2
    one_line_error(err, "REGEX=TYPE")
    code, _, err = run_cli([src, "--to", "q4_k_m", "--no-calib", "-o", out, "-f", "--output-tensor-type", "q9"], capsys)
    assert code == 2
    one_line_error(err, "--output-tensor-type", "q9")


def test_rows_that_fit_no_block_fall_back_like_llama_quantize(tiny, tmp_path):
    """gpt_neox here has rows of 80: Q4_K -> Q5_0 does not fit either, so F16, as llama-quantize."""
    rep = convert_to(tiny("gpt_neox"), "q4_k_m", tmp_path / "x.gguf", threads=2)
    types = {t.name: t.tensor_type for t in GGUFReader(rep.outputs[0]["path"]).tensors}
    assert types["blk.0.ffn_up.weight"] == GT.F16  # rows of 80
    assert types["blk.0.ffn_down.weight"] in (GT.Q5_0, GT.Q8_0)  # rows of 160: 32-blocks fit


def test_dry_run_shows_the_mixture(tiny, capsys, tmp_path):
    code, out, err = run_cli([tiny("llama-wide"), "--to", "q4_k_m,iq4_nl", "--no-calib", "--dry-run", "--json",
                              "-o", tmp_path], capsys)
    assert code == 0, err
    import json
    plan = json.loads(out)
    down0 = next(t for t in plan["tensors"] if t["name"] == "blk.0.ffn_down.weight")
    assert down0["types"] == ["Q6_K", "Q5_K"]  # q4_k_m: use_more_bits(0); iq4_nl: first eighth, no imatrix
    assert all(re.match(r"^\d+\.\d+$", str(o["bits_per_weight"])) for o in plan["outputs"])
    assert np.isclose(plan["outputs"][0]["bits_per_weight"], plan["outputs"][0]["tensor_bytes"] * 8 / plan["n_params"],
                      atol=1e-3)


# ---- --imatrix ----------------------------------------------------------------------------------

def fake_imatrix(tensors: dict[str, int], seed: int = 5) -> dict[str, tuple[np.ndarray, float]]:
    """name -> (sum of squares per column, count), as llama-imatrix accumulates them."""
    rng = np.random.default_rng(seed)
    return {name: ((rng.lognormal(0, 1.2, n) * 300).astype(np.float32), 300.0) for name, n in tensors.items()}


def write_gguf_imatrix(path, data) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch="llama")  # arch is required by the writer, unused by readers
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["austen.txt"])
    w.add_uint32("imatrix.chunk_count", 3)
    w.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, count) in data.items():
        w.add_tensor(f"{name}.in_sum2", sums.reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.array([[count]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_dat_imatrix(path, data, ncall: int = 3) -> None:
    """Legacy format: values stored as (sum/count)*ncall."""
    import struct

    out = [struct.pack("<i", len(data))]
    for name, (sums, count) in data.items():
        b = name.encode()
        vals = (sums / np.float32(count) * np.float32(ncall)).astype("<f4")
        out += [struct.pack("<i", len(b)), b, struct.pack("<ii", ncall, vals.size), vals.tobytes()]
    out += [struct.pack("<i", 7), struct.pack("<i", 6), b"emma.t"]
    path.write_bytes(b"".join(out))


def llama_quantize_with_imatrix(src, dst, ftype, weights: dict[str, np.ndarray]) -> None:
    import llama_cpp

    Entry = llama_cpp.llama_model_imatrix_data
    keep = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
    arr = (Entry * (len(keep) + 1))()
    for i, (k, v) in enumerate(keep.items()):
        arr[i].name = k.encode()
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = v.size
    llama_quantize(src, dst, ftype, imatrix=ctypes.cast(arr, type(llama_cpp.llama_model_quantize_default_params().imatrix)))


@pytest.mark.parametrize("fmt,recipe", numpy_spared([(f, r) for r in FTYPES for f in ("gguf", "dat")
                                                     if f == "gguf" or r in ("q4_k_m", "iq4_nl")]))
def test_imatrix_file_gives_llama_quantize_bytes(recipe, fmt, tiny, tmp_path):
    same_as_llama_quantize_with_imatrix(tiny("llama-wide"), recipe, fmt, tmp_path)



@pytest.mark.parametrize("family,recipe", numpy_spared([(f, r) for r in NEEDS_IMATRIX for f in ("llama-blocks", "qwen2")],
                                                  keep=frozenset({"iq2_xxs", "iq1_s"})) + [
    pytest.param("llama-80", r, marks=pytest.mark.skipif(blocks.PURE_PYTHON, reason="80 layers of lattice searches "
                                                         "in numpy take minutes; the C run covers the rule"))
    for r in ("iq3_xxs", "iq2_s")])
def test_mixtures_that_need_an_imatrix_on_other_shapes(family, recipe, tiny, tmp_path):
    """The mixtures llama-quantize writes only from an importance matrix on other shapes and rules:
    2 layers with rows of 384 (the fallbacks beside the lattice types), Qwen2 with rows of 64
    (every tensor a fallback), 80 layers (the 70B rules; two mixtures, for time)."""
    same_as_llama_quantize_with_imatrix(tiny(family), recipe, "gguf", tmp_path)


def same_as_llama_quantize_with_imatrix(src, recipe, fmt, tmp_path) -> None:
    f32 = convert_to(src, "f32", tmp_path / "f32.gguf", threads=2).outputs[0]["path"]
    reader = GGUFReader(f32)
    quantizable = {t.name: int(t.shape[0]) for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    data = fake_imatrix(quantizable)
    path = tmp_path / f"m.{fmt}"
    (write_gguf_imatrix if fmt == "gguf" else write_dat_imatrix)(path, data)
    # llama-quantize's normalisation: sum / count (GGUF) or value / ncall (legacy)
    if fmt == "gguf":
        weights = {k: s / np.float32(c) for k, (s, c) in data.items()}
    else:
        weights = {k: (s / np.float32(c) * np.float32(3)).astype(np.float32) / np.float32(3) for k, (s, c) in data.items()}
    ref = tmp_path / "ref.gguf"
    llama_quantize_with_imatrix(f32, ref, FTYPES[recipe], weights)
    out = convert_to(src, recipe, tmp_path / "ours.gguf", threads=2, imatrix=path).outputs[0]["path"]
    ours_r, ref_r = GGUFReader(out), GGUFReader(ref)
    a = {t.name: t for t in ours_r.tensors}
    for t in ref_r.tensors:
        assert a[t.name].tensor_type == t.tensor_type, t.name
        assert np.array_equal(np.asarray(a[t.name].data).view(np.uint8), np.asarray(t.data).view(np.uint8)), t.name
    f = ours_r.fields
    assert f["quantize.imatrix.file"].contents() == str(path)
    assert f["quantize.imatrix.entries_count"].contents() == len(data)
    assert f["quantize.imatrix.dataset"].contents() == ("austen.txt" if fmt == "gguf" else "emma.t")
    assert f["quantize.imatrix.chunks_count"].contents() == (3 if fmt == "gguf" else 7)
    if recipe == "iq4_nl":  # with an imatrix llama-quantize drops the first-eighth ffn_down bump
        assert a["blk.0.ffn_down.weight"].tensor_type == GT.IQ4_NL


def test_imatrix_problems_are_input_errors(tiny, tmp_path, capsys):
    src = tiny("llama-wide")
    bad = tmp_path / "bad.dat"
    bad.write_bytes(b"\x00\x00\x00\x00garbage")
    code, _, err = run_cli([src, "--to", "q4_k_m", "--imatrix", bad, "-o", tmp_path / "x.gguf"], capsys)
    assert code == 3
    one_line_error(err, "bad.dat", "importance matrix")
    wrong = tmp_path / "wrong.gguf"
    write_gguf_imatrix(wrong, {"blk.0.ffn_down.weight": (np.ones(7, np.float32), 1.0)})
    code, _, err = run_cli([src, "--to", "q4_k_m", "--imatrix", wrong, "-o", tmp_path / "x.gguf"], capsys)
    assert code == 3
    one_line_error(err, "wrong.gguf", "blk.0.ffn_down.weight", "7 values")
    code, _, err = run_cli([src, "--to", "q4_k_m", "--imatrix", wrong, "--no-calib", "-o", tmp_path / "x.gguf"], capsys)
    assert code == 2
