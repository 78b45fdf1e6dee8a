"""The README's Python blocks run as written (a user copies them first)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has no Python example"
    # A fresh interpreter: the README runs in float32 defaults, unlike this suite.
    result = subprocess.run(
        [sys.executable, "-c", "\n\n".join(blocks)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "braintrace compile report" in result.stdout
