"""What every example shares: help text on every flag, a ``--quick`` plot of its own,
``--no-plot`` and a quiet mode (``examples/_common.py``).
"""

from __future__ import annotations

import argparse
import ast
import pathlib

import pytest
from helpers import EXAMPLES, load_example


def flags_without_help(source: str) -> list[str]:
    """The flags of every ``add_argument(...)`` call in ``source`` that has no ``help=``."""
    missing = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_argument"
            and not any(k.arg == "help" for k in node.keywords)
        ):
            names = [a.value for a in node.args if isinstance(a, ast.Constant)]
            missing.append(names[0] if names else f"line {node.lineno}")
    return missing


def test_every_flag_of_every_example_has_help_text():
    scripts = sorted(EXAMPLES.glob("*.py"))
    assert len(scripts) >= 8
    missing = {p.name: flags_without_help(p.read_text()) for p in scripts}
    assert not any(missing.values()), {k: v for k, v in missing.items() if v}
    # Negative control: the check sees a flag without help.
    assert flags_without_help(
        "p.add_argument('--n', type=int, help='x')\np.add_argument('--m')"
    ) == ["--m"]


def test_quick_plots_get_a_name_of_their_own_and_no_plot_writes_none(tmp_path):
    common = load_example("_common")
    args = argparse.Namespace(out=tmp_path, quick=False, no_plot=False)
    assert common.plot_path(args, "run") == tmp_path / "run.png"
    assert common.plot_path(argparse.Namespace(**{**vars(args), "quick": True}), "run") == (
        tmp_path / "run_quick.png"
    )
    off = argparse.Namespace(**{**vars(args), "no_plot": True})
    assert common.plot_path(off, "run") is None
    history = {"loss": [1.0, 0.5], "eval_at": [2], "test_acc": [0.5]}
    assert common.plot_training({"a": history}, None, "t", chance=0.5) is None
    assert list(tmp_path.iterdir()) == []


def test_the_quiet_progress_bar_draws_nothing(capsys):
    common = load_example("_common")
    with common.progress(3, quiet=True) as bar:
        bar.update()
        bar.set_postfix(loss=1.0)
    assert capsys.readouterr().err == ""
    with common.progress(3) as bar:
        bar.update()
    assert capsys.readouterr().err  # the control: a bar that draws


@pytest.mark.parametrize(
    "example", ["eqx_lif_snn", "flax_gru_digits", "nnx_gru_digits", "flax_lora_adapt", "long_range"]
)
def test_plotting_examples_take_the_shared_flags(example):
    args = load_example(example).parse_args(["--quick", "--no-plot", "--quiet"])
    assert args.quick and args.no_plot and args.quiet
    assert isinstance(args.out, pathlib.Path)
