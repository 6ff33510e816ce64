"""Record the sha256 of every output qconvert writes for the tiny models of every family
(tests/golden_outputs.py holds the commands), so that a change to the house, not the maths, can
be shown to keep every byte: tests/test_golden.py runs the same commands and compares.

usage: python formats/outputs/make_golden.py   (writes formats/outputs/golden.json)
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.golden_outputs import GOLDEN, environment, outputs  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = {"made_by": "formats/outputs/make_golden.py", "environment": environment(),
                "families": outputs(Path(tmp))}
    GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
