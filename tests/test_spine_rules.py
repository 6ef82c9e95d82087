"""The spine's rules, checked on the AST of src/peftlab (issue 25):

- no function of the run (``train.py``, ``loop.py``) is longer than 50 lines or takes more than 6 parameters;
- only ``record.py`` names ``results.json`` as a file (its ``RunRecord`` is the one reader and writer);
- only ``precision.py`` compares precision names: everyone else asks a ``Precision`` (``is_bf16_true``, ...).

Each checker is also run on a small bad example, so a checker that finds nothing fails here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "peftlab"
RUN_MODULES = ("train.py", "loop.py")
MAX_LINES, MAX_PARAMS = 50, 6
PRECISION_NAMES = frozenset({"fp32", "bf16-mixed", "bf16-true"})
RESULTS_NAME = "results.json"


def modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def long_functions(tree: ast.Module) -> list[str]:
    """Functions (methods included) over MAX_LINES lines or MAX_PARAMS parameters (self and cls not counted)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        lines = node.end_lineno - node.lineno + 1
        args = node.args
        params = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs) if a.arg not in ("self", "cls")]
        params += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
        if lines > MAX_LINES:
            found.append(f"{node.name} (line {node.lineno}): {lines} lines")
        if len(params) > MAX_PARAMS:
            found.append(f"{node.name} (line {node.lineno}): {len(params)} parameters")
    return found


def results_file_names(tree: ast.Module) -> list[str]:
    """Places that name results.json as a file: the string as a path part, or record.py's RESULTS_FILE."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                node.value == RESULTS_NAME or node.value.endswith("/" + RESULTS_NAME)):
            found.append(f"line {node.lineno}: {node.value!r}")
        elif isinstance(node, ast.Name) and node.id == "RESULTS_FILE":
            found.append(f"line {node.lineno}: RESULTS_FILE")
        elif isinstance(node, ast.Attribute) and node.attr == "RESULTS_FILE":
            found.append(f"line {node.lineno}: .RESULTS_FILE")
        elif isinstance(node, ast.ImportFrom) and any(alias.name == "RESULTS_FILE" for alias in node.names):
            found.append(f"line {node.lineno}: imports RESULTS_FILE")
    return found


def _precision_constants(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and node.value in PRECISION_NAMES:
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [name for item in node.elts for name in _precision_constants(item)]
    return []


def precision_comparisons(tree: ast.Module) -> list[str]:
    """Comparisons (==, !=, in, not in) with a precision name as a string."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            names = [n for side in (node.left, *node.comparators) for n in _precision_constants(side)]
            if names:
                found.append(f"line {node.lineno}: compares with {', '.join(map(repr, names))}")
    return found


def test_the_run_has_short_functions_with_few_parameters():
    for name in RUN_MODULES:
        assert (SRC / name).is_file(), name
        assert long_functions(parse(SRC / name)) == [], f"{name}: split these functions"


def test_only_record_py_names_results_json():
    offenders = {str(p.relative_to(SRC)): found for p in modules() if p.name != "record.py"
                 for found in [results_file_names(parse(p))] if found}
    assert offenders == {}, "read and write results.json through peftlab.record.RunRecord"


def test_only_precision_py_compares_precision_names():
    offenders = {str(p.relative_to(SRC)): found for p in modules() if p.name != "precision.py"
                 for found in [precision_comparisons(parse(p))] if found}
    assert offenders == {}, "ask a Precision (is_bf16, is_bf16_true, autocasts, ...) instead"


@pytest.mark.parametrize(("checker", "bad", "expected"), [
    (long_functions, "def f(a, b, c, d, e, f, g):\n    pass\n", ["f (line 1): 7 parameters"]),
    (long_functions, "def f():\n" + "    x = 1\n" * 50, ["f (line 1): 51 lines"]),
    (long_functions, "class A:\n    def m(self, a, b, c, d, e, f):\n        pass\n", []),
    (results_file_names, "p = run / 'results.json'\n", ["line 1: 'results.json'"]),
    (results_file_names, "from peftlab.record import RESULTS_FILE\n", ["line 1: imports RESULTS_FILE"]),
    (results_file_names, "'''Reads results.json.'''\n", []),  # prose that mentions the file is fine
    (precision_comparisons, "if p.name == 'bf16-true': pass\n", ["line 1: compares with 'bf16-true'"]),
    (precision_comparisons, "ok = name in ('fp32', 'bf16-mixed')\n", ["line 1: compares with 'fp32', 'bf16-mixed'"]),
    (precision_comparisons, "precision = 'fp32'\n", []),  # a default is not a comparison
])
def test_the_checkers_find_what_they_look_for(checker, bad, expected):
    assert checker(ast.parse(bad)) == expected
