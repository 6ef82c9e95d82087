"""`peftlab report`: per-task tables in the seed's layout, plots and a self-contained HTML page, from a sweep's store.

``tables`` is the model (what the report says), ``markdown``, ``plots`` and ``html`` render it; each imports only
``tables``, and :func:`write_report` here is the one place that writes the files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from peftlab.record import (
    EXAMPLES_FILE,
    METRICS_FILE,
    SWEEP_WALL_FILE,
    atomic_write_text,
    write_json,
)
from peftlab.report.markdown import (
    markdown_table,
    readme_parts,
    render_markdown,
    render_readme_section,
    write_readme_section,
)
from peftlab.report.seed_layout import render_seed_layout
from peftlab.report.tables import build_tables, read_sweep

__all__ = ["ReportFiles", "build_tables", "markdown_table", "read_sweep", "write_report"]


@dataclass
class ReportFiles:
    """The files a report wrote."""

    folder: Path
    markdown: Path
    html: Path
    tables: list[Path]
    plots: list[Path]
    configs: list[Path] = field(default_factory=list)
    readme: Path | None = None
    seed_table: Path | None = None

    def summary_lines(self) -> list[tuple[str, str]]:
        """(what, path) pairs for the CLI."""
        return ([("report", str(self.markdown)), ("html", str(self.html))]
                + [("table", str(p)) for p in self.tables]
                + [("plot", str(p)) for p in self.plots if p.suffix == ".png"]
                + ([("run configs", f"{self.configs[0].parent} ({len(self.configs)})")] if self.configs else [])
                + ([("readme section", str(self.readme))] if self.readme else [])
                + ([("seed table", str(self.seed_table))] if self.seed_table else []))


def write_report(sweep_dir: str | Path, output_dir: str | Path | None = None,
                 readme: str | Path | None = None, mixed_machines: bool = False,
                 seed_table: bool = False) -> ReportFiles:
    """Write report.md, report.html, tables/<task>.md and plots/*.png|svg for a sweep folder; with ``readme``,
    also replace that file's study section (between its marker lines) with the tables and findings.
    ``mixed_machines`` keeps the speed columns of tables whose runs span machines (blank by default);
    ``seed_table`` also writes seed_table.md, the seed's layout with an interval in every cell."""
    from peftlab.report.html import render_html  # matplotlib and yaml only when a report is written
    from peftlab.report.plots import plot_table

    if readme is not None:
        readme_parts(Path(readme))  # a README without its marker lines fails before anything is written
    records = read_sweep(sweep_dir)
    out = Path(output_dir) if output_dir else records.folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(records.finished, mixed_machines)
    table_files, plots = [], {}
    for table in tables:
        path = out / "tables" / f"{table.slug}.md"
        atomic_write_text(path, f"### {table.title}\n\n{markdown_table(table)}\n\n"
                          + "\n".join(f"- {n}" for n in table.notes) + "\n")
        table_files.append(path)
        plots[table.slug] = plot_table(table, out / "plots")
    md = out / "report.md"
    atomic_write_text(md, render_markdown(records, tables, plots, out))
    html_path = out / "report.html"
    atomic_write_text(html_path, render_html(records, tables, plots))
    configs = write_run_configs(records, out / "configs")
    write_run_records(records, out / "records")
    if readme is not None:
        write_readme_section(Path(readme), render_readme_section(records, tables, plots, out, Path(readme)))
    seed_path = None
    if seed_table:
        seed_path = out / "seed_table.md"
        atomic_write_text(seed_path, render_seed_layout(tables))
    return ReportFiles(out, md, html_path, table_files,
                       [p for kinds in plots.values() for pair in kinds.values() for p in pair], configs,
                       Path(readme) if readme is not None else None, seed_path)


def write_run_configs(records, folder: Path) -> list[Path]:
    """Each finished run's resolved config (as its results.json recorded it) as ``folder/<run id>.yaml``: what
    ``peftlab train --config`` reruns."""
    import yaml

    paths = []
    for run in records.finished:
        path = folder / f"{run.id}.yaml"
        atomic_write_text(path, f"# run {run.id} of sweep {records.name}: its resolved config, as results.json "
                                f"recorded it\n# rerun: peftlab train --config {path.name}\n"
                          + yaml.safe_dump(run.config, sort_keys=False))
        paths.append(path)
    return paths


#: The small files of a run that the report keeps besides its results (the weights stay in the sweep folder).
RECORD_FILES = (METRICS_FILE, EXAMPLES_FILE)


def write_run_records(records, folder: Path) -> None:
    """Keep each finished run's record files (results, loss curve, per-example values) and an index of the runs'
    status and wall time (the wall time also beside each run's results), so that a committed report holds the
    results even if the sweep folder is lost: copied back into ``DIR/runs/<id>/``, a rerun of the sweep adopts them
    as done, with their measured wall times."""
    index = []
    for run in records.finished:
        run.record.write(folder / run.id)  # as the store holds it
        for name in RECORD_FILES:
            src = run.folder / name
            if src.is_file():
                atomic_write_text(folder / run.id / name, src.read_text(encoding="utf-8"))
        if run.wall_s is not None:
            write_json(folder / run.id / SWEEP_WALL_FILE, {"wall_s": run.wall_s})
        index.append({"id": run.id, "wall_s": run.wall_s, "definition": run.definition})
    write_json(folder / "index.json", {"sweep": records.name, "runs": index})

