"""The registries are the only places that know method and task names (issue: one place per method and task).

Walks the AST of every module of ``src/peftlab`` and fails on a comparison against a registered method name
outside ``peftlab/methods/``, against a task name outside ``peftlab/tasks/``, and on name tables (a dict keyed by,
or a flat tuple, list or set literal of, two or more registered names) outside those packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

import peftlab
from peftlab.methods import METHODS
from peftlab.tasks import TASKS

SRC = Path(peftlab.__file__).resolve().parent


def _strings(node: ast.AST, nested: bool = True) -> list[str]:
    """The string constants of a constant or of a literal container of constants (``nested``: containers in it)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for elt in node.elts for s in _strings(elt, nested) if nested or isinstance(elt, ast.Constant)]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in {"frozenset", "set", "tuple"}:
        return [s for arg in node.args for s in _strings(arg)]
    return []


def violations(names: set[str], owner: str) -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(owner + "/"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        for node in ast.walk(tree):
            hits: list[str] = []
            if isinstance(node, ast.Compare):
                for side in [node.left, *node.comparators]:
                    hits += [s for s in _strings(side) if s in names]
            elif isinstance(node, ast.Dict):
                keys = [s for k in node.keys if k is not None for s in _strings(k)]
                if len([k for k in keys if k in names]) >= 2:
                    hits += [k for k in keys if k in names]
            elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                members = [s for s in _strings(node, nested=False) if s in names]  # rows of data may name one each
                if len(members) >= 2:
                    hits += members
            elif isinstance(node, ast.MatchValue):
                hits += [s for s in _strings(node.value) if s in names]
            if hits:
                found.append(f"{rel}:{node.lineno}: {sorted(set(hits))}")
    return found


def test_no_method_name_comparisons_outside_methods():
    assert violations(set(METHODS), "methods") == []


def test_no_task_name_comparisons_outside_tasks():
    assert violations(set(TASKS), "tasks") == []


def test_the_walker_finds_a_planted_comparison(tmp_path, monkeypatch):
    """The check is live: a planted name test in a copied module is reported."""
    planted = tmp_path / "peftlab"
    planted.mkdir()
    (planted / "planted.py").write_text("def f(cfg):\n    return cfg.method == 'qlora' or cfg.task in ('clm',)\n")
    monkeypatch.setattr(__import__(__name__), "SRC", planted)
    assert violations({"qlora", "lora"}, "methods") == ["planted.py:2: ['qlora']"]
    assert violations({"clm"}, "tasks") == ["planted.py:2: ['clm']"]
