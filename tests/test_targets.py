"""The target table is the one list of `--to` names: help texts and the README are read from it."""
from __future__ import annotations

from pathlib import Path

from qconvert import targets
from qconvert.quant.recipes import RECIPES
from tests.helpers import run_cli

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_recipe_and_checkpoint_method_is_a_row():
    assert set(RECIPES) <= set(targets.TARGETS)
    assert {"gptq", "awq"} <= set(targets.names("checkpoint"))
    assert targets.names() == targets.names("gguf") + targets.names("checkpoint")


def test_readme_holds_the_table():
    assert targets.markdown_table() in README.read_text(encoding="utf-8"), \
        "README's target table differs from qconvert.targets; paste `python -m qconvert.targets`"


def test_help_names_every_target(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    for name in targets.names():
        assert name in flat, name
    code, out, _ = run_cli(["convert", "--help"], capsys)
    flat = " ".join(out.replace("│", " ").split())
    for name in targets.names():
        assert name in flat, name


def test_named_sets_expand_in_place(tiny, tmp_path, capsys):
    """`--to k-quants,gptq`: the set's members in order, then the rest, without repeats; the sets
    hold only real targets and are named in the help and in the unknown-target error."""
    from qconvert.errors import UsageError

    assert [t.name for t in targets.parse("q8_0,legacy-quants,gptq")] == ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1",
                                                                            "gptq"]
    assert {"q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k"} <= set(targets.SETS["k-quants"])
    assert "q2_k_s" not in targets.SETS["k-quants"] and not {"f32", "tq1_0", "q1_0"} & set(targets.SETS["all-gguf"])
    assert set(targets.SETS["i-quants"]) == {n for n in targets.names("gguf") if n.startswith("iq")}
    for members in targets.SETS.values():
        assert members and set(members) <= set(targets.names("gguf"))
    try:
        targets.parse("q9_k")
        raise AssertionError("no error")
    except UsageError as e:
        assert "k-quants" in str(e) and "all-gguf" in str(e)
    import json

    code, out, err = run_cli([tiny("llama-wide"), "--to", "k-quants", "--dry-run", "--json", "-o", tmp_path], capsys)
    assert code == 0, err
    assert [o["target"] for o in json.loads(out)["outputs"]] == list(targets.SETS["k-quants"])
    code, out, _ = run_cli(["convert", "--help"], capsys)
    assert "all-gguf" in " ".join(out.replace("│", " ").split())
