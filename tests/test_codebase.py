"""The codebase's shape, checked by reading its source (nothing is imported or run).

- No function in ``braintrace/``, ``braintrace_flax/`` or ``braintrace_eqx/`` is over
  60 lines of code (docstrings, comments and blank lines are not counted; a nested
  function's lines count towards the function that contains it, and on its own).
- Imports point downward: the core never imports Flax or Equinox, ``ops`` never imports
  the compiler or the algorithms, the compiler never imports the algorithms, and the
  bottom (``primitive``, ``registry``) imports none of them.
"""

from __future__ import annotations

import ast
import io
import pathlib
import tokenize

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("braintrace", "braintrace_flax", "braintrace_eqx")
MAX_CODE_LINES = 60


def _sources(package: str) -> list[pathlib.Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def code_lines(source: str) -> set[int]:
    """Line numbers holding code: not blank, not only a comment, not in a docstring."""
    lines: set[int] = set()
    skip = {
        tokenize.COMMENT,
        tokenize.NL,
        tokenize.NEWLINE,
        tokenize.INDENT,
        tokenize.DEDENT,
        tokenize.ENCODING,
        tokenize.ENDMARKER,
    }
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if not isinstance(body, list) or not body:
            continue
        first = body[0]
        if (
            isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module))
            and isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            lines.difference_update(range(first.lineno, first.end_lineno + 1))
    return lines


def long_functions(source: str, limit: int = MAX_CODE_LINES) -> list[tuple[str, int, int]]:
    """``(qualified name, first line, code lines)`` of every function over ``limit``."""
    code = code_lines(source)
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                count = len(code.intersection(range(child.lineno, child.end_lineno + 1)))
                if count > limit:
                    found.append((name, child.lineno, count))
                name += "."
            elif isinstance(child, ast.ClassDef):
                name = f"{prefix}{child.name}."
            visit(child, name)

    visit(ast.parse(source), "")
    return found


def test_the_line_counter_counts_code_only():
    """The counter itself: docstrings, comments and blanks are free; code is not."""

    def function(statements: int) -> str:
        body = "\n".join(f"    x{j} = {j}  # why" for j in range(statements))
        return f'def f():\n    """Doc.\n\n    More doc.\n    """\n    # a comment\n\n{body}\n'

    # The def line counts: 59 statements make 60 lines of code, 60 make 61.
    assert long_functions(function(MAX_CODE_LINES - 1)) == []
    assert long_functions(function(MAX_CODE_LINES)) == [("f", 1, MAX_CODE_LINES + 1)]
    nested = (
        "class A:\n    def g(self):\n        def h():\n            return (\n"
        "                1)\n        return h\n"
    )
    assert long_functions(nested, 2) == [("A.g", 2, 5), ("A.g.h", 3, 3)]


def test_no_function_over_60_lines_of_code():
    offenders, files = [], 0
    for package in PACKAGES:
        for path in _sources(package):
            files += 1
            for name, line, count in long_functions(path.read_text()):
                offenders.append(f"{path.relative_to(ROOT)}:{line} {name} ({count} lines)")
    assert files > 20, f"only {files} source files found under {ROOT}"
    assert not offenders, (
        f"functions over {MAX_CODE_LINES} lines of code (split them):\n" + "\n".join(offenders)
    )


# -- imports point downward ---------------------------------------------------------------


def imported_modules(path: pathlib.Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


# (modules the rule applies to, forbidden import prefixes)
RULES = [
    ("braintrace", ("flax", "equinox", "braintrace_flax", "braintrace_eqx")),
    ("braintrace.primitive", ("braintrace.ops", "braintrace.compiler", "braintrace.algorithms")),
    ("braintrace.registry", ("braintrace.ops", "braintrace.compiler", "braintrace.algorithms")),
    ("braintrace.ops", ("braintrace.compiler", "braintrace.algorithms")),
    ("braintrace.compiler", ("braintrace.algorithms",)),
    ("braintrace_flax", ("equinox", "braintrace_eqx")),
    ("braintrace_eqx", ("flax", "braintrace_flax")),
]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def import_violations(rules=RULES) -> list[str]:
    found = []
    for package in PACKAGES:
        for path in _sources(package):
            module, imports = _module_name(path), imported_modules(path)
            for scope, forbidden in rules:
                if not _within(module, scope):
                    continue
                bad = sorted(n for n in imports if any(_within(n, f) for f in forbidden))
                found.extend(f"{module} imports {n}" for n in bad)
    return found


def test_imports_point_downward():
    assert not import_violations(), "\n".join(import_violations())


def test_import_check_can_fail():
    """Negative control: a rule every package breaks is reported."""
    assert import_violations([("braintrace.ops", ("jax",))])
    assert "braintrace.algorithms" in imported_modules(ROOT / "braintrace" / "__init__.py")
