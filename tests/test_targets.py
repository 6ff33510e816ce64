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
