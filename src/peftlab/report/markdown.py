"""The report as markdown: GitHub tables (best headline value in bold) and report.md."""

from __future__ import annotations

from pathlib import Path

from peftlab.report.tables import SweepRecords, TaskTable


def markdown_table(table: TaskTable) -> str:
    """The table as GitHub markdown; the best headline value in bold."""
    headers = table.headers()
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    best = table.best_group()
    metric_at = 3 + [c.key for c in table.columns].index(table.metric)
    for group in table.groups:
        cells = table.cells(group)
        if group is best and len(table.groups) > 1:
            cells[metric_at] = f"**{cells[metric_at]}**"
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def render_markdown(records: SweepRecords, tables: list[TaskTable], plots: dict[str, dict[str, tuple[Path, Path]]],
                    out: Path) -> str:
    """report.md: a section per task with its table, notes and plots (linked PNGs)."""
    lines = [f"# Sweep report: {records.name}", ""]
    if records.description:
        lines += [records.description, ""]
    lines += [f"{records.counts.get('done', 0)} runs done, {records.counts.get('failed', 0)} failed, "
              f"{records.counts.get('queued', 0) + records.counts.get('running', 0)} not finished. Every number is "
              "measured by peftlab and read from the sweep store.", ""]
    for table in tables:
        lines += [f"## {table.title}", "", markdown_table(table), ""]
        lines += [f"- {n}" for n in table.notes] + [""]
        for kind, (png, _svg) in plots[table.slug].items():
            lines.append(f"![{table.title}: {kind}]({png.relative_to(out).as_posix()})")
        lines.append("")
    if records.failed:
        lines += ["## Failed runs", "", "| Run | Error |", "|---|---|"]
        lines += [f"| {rid} | {err.replace('|', '/')} |" for rid, err in records.failed] + [""]
    return "\n".join(lines)
