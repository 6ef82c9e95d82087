"""The report as one self-contained HTML file: inline CSS, plots as base64 data URIs, no scripts, no links out."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import yaml

from peftlab.report.tables import SweepRecords, TaskTable

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #1d232a; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #d6dbe0; padding-bottom: 0.3rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccd3da; padding: 0.3rem 0.6rem; text-align: right; white-space: nowrap; }
th { background: #eef2f6; } td:nth-child(-n+3), th:nth-child(-n+3), th.left { text-align: left; }
tr.best td { background: #eaf7ea; }
ul.notes { font-size: 0.85rem; color: #48525c; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 1rem; }
figure { margin: 0; } figure img { width: 100%; height: auto; border: 1px solid #e3e7eb; }
figcaption { font-size: 0.8rem; color: #48525c; }
details { margin: 0.3rem 0; } summary { cursor: pointer; font-family: monospace; }
pre { background: #f6f8fa; padding: 0.6rem; font-size: 0.8rem; overflow-x: auto; }
td.error { text-align: left; white-space: normal; font-family: monospace; font-size: 0.8rem; }
"""
CAPTIONS = {"speed": "Speed vs metric: time per epoch against the headline metric, one point per config (error bars: "
                     "the metric's 95% bootstrap CI).",
            "memory": "Memory vs metric: training memory against the headline metric (error bars: 95% CI).",
            "params": "Trainable parameters (log scale) vs metric.",
            "loss": "Training loss per run: every seed of a config, in the config's colour."}


def data_uri(path: Path) -> str:
    """A PNG file as a data: URI."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def html_table(table: TaskTable) -> str:
    """The task table as HTML, the best headline row highlighted."""
    best = table.best_group()
    head = "".join(f"<th>{_e(h)}</th>" for h in table.headers())
    rows = []
    for group in table.groups:
        cls = ' class="best"' if group is best and len(table.groups) > 1 else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{_e(c)}</td>" for c in table.cells(group)) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def render_html(records: SweepRecords, tables: list[TaskTable], plots: dict[str, dict[str, tuple[Path, Path]]]) -> str:
    """The whole report page."""
    counts = records.counts
    parts = [f"<h1>Sweep report: {_e(records.name)}</h1>"]
    if records.description:
        parts.append(f"<p>{_e(records.description)}</p>")
    parts.append(f"<p>{counts.get('done', 0)} runs done, {counts.get('failed', 0)} failed, "
                 f"{counts.get('queued', 0) + counts.get('running', 0)} not finished. Every number is measured by "
                 "peftlab and read from the sweep store.</p>")
    parts.append("<ul>" + "".join(f'<li><a href="#{_e(t.slug)}">{_e(t.title)}</a></li>' for t in tables)
                 + '<li><a href="#configs">Run configs</a></li></ul>')
    for table in tables:
        parts.append(f'<h2 id="{_e(table.slug)}">{_e(table.title)}</h2>')
        parts.append(html_table(table))
        parts.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in table.notes) + "</ul>")
        figures = [f'<figure><img src="{data_uri(png)}" alt="{_e(table.title)}: {_e(kind)}">'
                   f"<figcaption>{_e(CAPTIONS.get(kind, kind))}</figcaption></figure>"
                   for kind, (png, _svg) in plots[table.slug].items()]
        parts.append('<div class="plots">' + "".join(figures) + "</div>")
    if records.failed:
        parts.append('<h2 id="failed">Failed runs</h2><table><thead><tr><th>Run</th><th class="left">Error</th>'
                     '</tr></thead><tbody>' + "".join(f'<tr><td>{_e(rid)}</td><td class="error">{_e(err)}</td></tr>'
                               for rid, err in records.failed) + "</tbody></table>")
    parts.append('<h2 id="configs">Run configs</h2>')
    for run in records.finished:
        config = yaml.safe_dump(run.config, sort_keys=False)
        parts.append(f"<details><summary>{_e(run.id)}</summary><pre>{_e(config)}</pre></details>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>peftlab report: {_e(records.name)}</title><style>{CSS}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")
