"""Every Python block of the README runs on its own, as a user copies it.

Each ```python block is executed in a fresh namespace (its own imports, nothing from
the blocks above it) by one fresh interpreter that runs with the user's defaults
(float32: this suite's x64 setting does not leak in). A block that is deliberately not
runnable is preceded by the line ``<!-- readme-test: skip (the reason) -->``, and the
reason shows up in the test report.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

import background
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
_SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((.+?)\)\s*-->\s*$")

# Runs each block in its own namespace and reports, per block, its stdout or error.
_DRIVER = """
import contextlib, io, json, sys, traceback
results = []
for block in json.load(sys.stdin):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(block["source"], f"README.md:{block['line']}", "exec"),
                 {"__name__": "__main__"})
        results.append({"ok": True, "stdout": out.getvalue()})
    except BaseException:
        results.append({"ok": False, "stdout": out.getvalue(), "error": traceback.format_exc()})
print(json.dumps(results))
"""


def readme_blocks(text: str) -> list[dict]:
    """``{"line", "source", "skip"}`` for every ```python block (``skip``: reason or None)."""
    blocks = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = _SKIP.search(before)
        blocks.append(
            {"line": line, "source": match.group(1), "skip": skip.group(1) if skip else None}
        )
    return blocks


BLOCKS = readme_blocks(README.read_text())


RUNNABLE = [b for b in BLOCKS if b["skip"] is None]
# Every runnable block, in one fresh interpreter started at collection (background.py).
background.register(
    "readme_blocks",
    background.Job(
        "results",
        [sys.executable, "-c", _DRIVER],
        stdin=json.dumps(RUNNABLE),
        cwd=str(README.parent),
    ),
)


@pytest.fixture(scope="session")
def results(job_stdout) -> dict:
    """``{README line: result}`` of every runnable block."""
    outcome = background.last_json(job_stdout("readme_blocks"))
    return {block["line"]: result for block, result in zip(RUNNABLE, outcome)}


def test_the_readme_has_python_blocks_and_the_parser_sees_skips():
    assert len(BLOCKS) >= 3, "the README lost its Python examples"
    text = (
        "x\n```python\nprint(1)\n```\n<!-- readme-test: skip (needs a GPU) -->\n"
        "```python\nboom\n```\n"
    )
    assert [(b["line"], b["skip"]) for b in readme_blocks(text)] == [(2, None), (6, "needs a GPU")]


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{b['line']}" for b in BLOCKS])
def test_readme_block_runs_on_its_own(block, results):
    if block["skip"] is not None:
        pytest.skip(f"README.md:{block['line']} is marked not runnable: {block['skip']}")
    result = results[block["line"]]
    assert result["ok"], f"README.md:{block['line']} failed:\n{result['error'][-3000:]}"


def test_quickstart_prints_the_compile_report(results):
    printed = "".join(r["stdout"] for r in results.values())
    assert "braintrace compile report" in printed
