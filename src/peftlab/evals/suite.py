"""Which benchmarks a run scores, checked before any model loads: shipped names, lm-eval task names, task files.

The shipped task YAMLs (``tasks/*.yaml``) read the offline copies under ``<data dir>/benchmarks``; their
``${BENCHMARKS_DIR}`` is filled in once per data dir into a folder of the cache, which lm-eval's ``TaskManager``
then indexes (``include_path``). A name that is not shipped must be one lm-eval knows (its own tasks need the hub or
its cache), and a path to a ``.yaml`` file adds that file's folder to the index.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from peftlab.errors import UserError

TEMPLATES = Path(__file__).parent / "tasks"
PLACEHOLDER = "${BENCHMARKS_DIR}"
#: The benchmarks peftlab ships, in table order.
SHIPPED = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq")
#: What each shipped benchmark measures and its chance accuracy (the tables' notes and the README).
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "piqa": 0.5, "hellaswag": 0.25, "winogrande": 0.5, "boolq": 0.5}
MEASURES = {
    "arc_easy": "grade-school science questions (4 choices)",
    "arc_challenge": "the harder grade-school science questions (4 choices)",
    "piqa": "physical common sense (2 solutions)",
    "hellaswag": "common-sense sentence completion (4 endings)",
    "winogrande": "pronoun resolution (2 options)",
    "boolq": "yes/no reading comprehension",
}


@dataclass(frozen=True)
class BenchmarkSuite:
    """The resolved benchmarks of a run: lm-eval task names and the folders their YAMLs are indexed from."""

    names: tuple[str, ...]
    include_paths: tuple[str, ...]
    needs_builtin: bool = False  # a name from lm-eval's own task folder: index it too (slower; may need the hub)
    limit: int | None = None
    files: dict[str, str] = field(default_factory=dict)  # local task files given by path: name -> file

    def task_manager(self):
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=list(self.include_paths), include_defaults=self.needs_builtin)


def benchmarks_dir(data_dir: Path | None) -> Path | None:
    return data_dir / "benchmarks" if data_dir is not None else None


def resolve(names: list[str], data_dir: Path | None, limit: int | None = None) -> BenchmarkSuite | None:
    """Check every benchmark name (one line naming the fix when one is wrong) and render the shipped YAMLs."""
    if not names:
        return None
    if limit is not None and limit < 1:
        raise UserError(f"benchmark_limit: {limit} items scores nothing; give a positive number or leave it out")
    include: list[str] = []
    resolved: list[str] = []
    files: dict[str, str] = {}
    builtin = []
    for name in names:
        if name.endswith((".yaml", ".yml")) or "/" in name:
            task, folder = task_file(name)
            resolved.append(task)
            files[task] = name
            include.append(folder)
        elif name in SHIPPED:
            resolved.append(name)
        else:
            builtin.append(name)
            resolved.append(name)
    shipped = [n for n in resolved if n in SHIPPED and n not in files]
    if shipped:
        include.insert(0, str(render_shipped(shipped, data_dir)))
    if builtin:
        check_builtin(builtin)
    if len(set(resolved)) != len(resolved):
        raise UserError(f"benchmarks: {', '.join(resolved)} names a benchmark twice; give each once")
    return BenchmarkSuite(tuple(resolved), tuple(dict.fromkeys(include)), bool(builtin), limit, files)


def task_file(path: str) -> tuple[str, str]:
    """A local lm-eval task YAML: its task name and folder; one line when it is missing or does not parse."""
    from lm_eval.tasks._yaml_loader import load_yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"benchmark file {path!r} does not exist; give an lm-eval task YAML or a benchmark name "
                        f"({', '.join(SHIPPED)})")
    try:
        config = load_yaml(file, resolve_func=False)
    except Exception as exc:  # yaml errors, include cycles, a top level that is not a mapping
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"benchmark file {path!r} does not parse as an lm-eval task ({first}); fix the YAML") \
            from None
    task = config.get("task")
    if not isinstance(task, str) or not task:
        raise UserError(f"benchmark file {path!r} has no 'task:' name; lm-eval task YAMLs name their task")
    return task, str(file.resolve().parent)


def required_files(name: str, bench_dir: Path) -> list[Path]:
    """The data files a shipped benchmark reads (from its template)."""
    text = (TEMPLATES / f"{name}.yaml").read_text(encoding="utf-8")
    return [bench_dir / rel for rel in re.findall(re.escape(PLACEHOLDER) + r"/(\S+)", text)]


def render_shipped(names: list[str], data_dir: Path | None) -> Path:
    """The shipped YAMLs with the data dir filled in, in a cache folder keyed by the data dir and the templates."""
    from peftlab.models import cache_dir, publish_atomically

    bench = benchmarks_dir(data_dir)
    if bench is None:
        raise UserError("benchmarks: no data dir; set PEFTLAB_DATA_DIR (or --data-dir) to the shared datasets "
                        "folder, the one that holds benchmarks/")
    for name in names:
        missing = [p for p in required_files(name, bench) if not p.is_file()]
        if missing:
            raise UserError(f"benchmark {name}: {missing[0]} does not exist; set PEFTLAB_DATA_DIR (or --data-dir) "
                            "to the shared datasets folder, the one that holds benchmarks/")
    templates = sorted(TEMPLATES.glob("*.yaml"))
    key = hashlib.sha256(str(bench.resolve()).encode())
    for t in templates:
        key.update(t.read_bytes())

    def build(tmp: Path) -> None:
        for t in templates:
            text = t.read_text(encoding="utf-8").replace(PLACEHOLDER, str(bench.resolve()))
            (tmp / t.name).write_text(text, encoding="utf-8")

    return publish_atomically(build, cache_dir() / "evals" / f"tasks-{key.hexdigest()[:16]}")


def check_builtin(names: list[str]) -> None:
    """Names that are neither shipped nor files must be lm-eval tasks; suggest the nearest names otherwise."""
    from lm_eval.tasks import TaskManager

    known = TaskManager(include_defaults=True).all_tasks
    for name in names:
        if name not in known:
            near = difflib.get_close_matches(name, list(dict.fromkeys([*SHIPPED, *known])), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(near)}?" if near else f"shipped: {', '.join(SHIPPED)}"
            raise UserError(f"benchmarks: unknown benchmark {name!r}; {hint} (or give a task YAML file)")
