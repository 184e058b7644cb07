"""A run's report as one self-contained HTML page: checks, tables with intervals, figures, settings, environment.

Nothing on the page is fetched: figures are base64 PNG data URIs, the style sheet is inline and
there is no script, so the file reads the same offline, attached to a mail or years later.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import re
import time
from collections.abc import Iterable
from html import escape
from pathlib import Path
from typing import Any

import pandas as pd

from bench.reporting.check_ids import CheckWarning
from bench.reporting.tables import csv_text

__all__ = ["report_html"]

View = tuple[str, pd.DataFrame, pd.DataFrame, str]  # (file stem, long frame, wide frame, caption)

# A number, or a percentage with its interval ('97.5 [94.3, 99.2]'): right-aligned so digits line up.
NUMERIC = re.compile(r"^[-x]?[\d.]+(e[-+]?\d+)?%?( \[[-\d.]+, [-\d.]+\])?$|^-$|^\d+-\d+$")

STYLE = """
body { margin: 0; background: #f6f7f9; color: #1d2330; font: 15px/1.5 system-ui, -apple-system, "Segoe UI",
       Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 1.5rem 2rem 3rem; background: #fff; }
h1 { font-size: 1.6rem; margin: 0 0 .25rem; }
h2 { font-size: 1.3rem; margin: 2rem 0 .75rem; padding-bottom: .25rem; border-bottom: 2px solid #d8dce3; }
h3 { font-size: 1.05rem; margin: 1.5rem 0 .5rem; }
.meta { color: #4a5263; margin: 0; }
nav { margin: 1rem 0; padding: .5rem .75rem; background: #f0f2f5; border-radius: 6px; }
nav a { margin-right: 1rem; white-space: nowrap; }
a { color: #1f5fbf; }
code { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: .9em; }
.checks { list-style: none; padding: 0; }
.checks > li { margin: .5rem 0; padding: .5rem .75rem; border-left: 4px solid #d98a00; background: #fff6e6; }
.checks ul { margin: .25rem 0 0; padding-left: 1.25rem; }
.checks ul li { margin: .2rem 0; }
.checks > li.passed { border-color: #2e8540; background: #ebf6ee; }
.check-id { display: inline-block; margin-right: .5rem; padding: 0 .4rem; border-radius: 4px; background: #d98a00;
            color: #fff; font: 600 .8rem/1.6 ui-monospace, Menlo, Consolas, monospace; text-decoration: none; }
.scroll { overflow: auto; width: fit-content; max-width: 100%; max-height: 75vh; border: 1px solid #d8dce3;
          border-radius: 4px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e6e9ee; text-align: left; white-space: nowrap; }
thead th { position: sticky; top: 0; background: #e9edf3; z-index: 1; }
tbody tr:nth-child(even) { background: #f8f9fb; }
td.num { text-align: right; }
details { margin: .5rem 0 1rem; }
summary { cursor: pointer; color: #4a5263; }
figure { margin: 1rem 0 2rem; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #e6e9ee; }
figcaption { color: #4a5263; font-size: .9rem; margin-top: .25rem; }
table.pairs td:first-child { font-weight: 600; vertical-align: top; }
table.pairs td { white-space: normal; word-break: break-word; text-align: left; }
footer { margin-top: 2.5rem; color: #4a5263; font-size: .85rem; }
"""


def _cell(tag: str, value: object) -> str:
    text = str(value)
    numeric = tag == "td" and NUMERIC.match(text) is not None
    return f"<{tag}{' class=num' if numeric else ''}>{escape(text)}</{tag}>"


def _table(header: Iterable[object], rows: Iterable[Iterable[object]], css: str = "") -> str:
    """One <table> (header row, body rows) in a scrolling box whose header row stays in view."""
    head = "".join(_cell("th", h) for h in header)
    body = "".join("<tr>" + "".join(_cell("td", v) for v in row) + "</tr>\n" for row in rows)
    table_class = f' class="{css}"' if css else ""
    return (f'<div class="scroll"><table{table_class}><thead><tr>{head}</tr></thead>\n'
            f"<tbody>\n{body}</tbody></table></div>")


def _table_section(view: View) -> str:
    """A table's display (wide, as in its .md file) and, folded, every row of its CSV file as written."""
    stem, long, wide, caption = view
    rows = list(csv.reader(io.StringIO(csv_text(long))))
    header, rows = (rows[0], rows[1:]) if rows else ([], [])
    return (f'<section id="table-{escape(stem)}"><h3>{escape(caption)}</h3>\n'
            + _table(wide.columns, wide.itertuples(index=False), "wide")
            + f"\n<details><summary>Every column of <code>{escape(stem)}.csv</code> ({len(rows)} rows)</summary>\n"
            + _table(header, rows, "long") + "</details></section>\n")


def _checks_section(warnings: list[CheckWarning], checks_doc: str) -> str:
    """The sanity checks' warnings grouped by kind, each kind's ID linking to its section of docs/checks.md."""
    if not warnings:
        return '<ul class="checks"><li class="passed">All sanity checks passed.</li></ul>\n'
    kinds: dict[str, list[str]] = {}
    for warning in warnings:
        kinds.setdefault(warning.check, []).append(warning.strip())
    items = "".join(f'<li id="check-{escape(check)}"><a class="check-id" href="{escape(checks_doc)}#{escape(check)}" '
                    f'title="when this is raised and what to do">{escape(check)}</a>{len(texts)} warning(s)<ul>'
                    + "".join(f"<li>{escape(text)}</li>" for text in texts) + "</ul></li>\n"
                    for check, texts in kinds.items())
    return (f"<p>{len(warnings)} warning(s) of {len(kinds)} kind(s); each kind's ID links to when it is raised "
            f"and what to do (<code>docs/checks.md</code>).</p>\n<ul class=\"checks\">\n{items}</ul>\n")


def _value(value: Any) -> str:
    """A setting or environment entry as one line of text (lists and tables as compact JSON)."""
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=True)
    return "(none)" if value is None else str(value)


def _pairs(entries: dict[str, Any]) -> str:
    return _table(["name", "value"], [(key, _value(value)) for key, value in sorted(entries.items())], "pairs")


def _figures_section(figures: dict[str, Path]) -> str:
    """Every figure's PNG, embedded as a data URI."""
    if not figures:
        return "<p>No figure: the run has no data any figure draws.</p>\n"
    parts = []
    for stem, png in sorted(figures.items()):
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        parts.append(f'<figure id="figure-{escape(stem)}"><img alt="{escape(stem)}" src="data:image/png;base64,{data}">'
                     f"<figcaption><code>figures/{escape(png.name)}</code> (PDF beside it)</figcaption></figure>\n")
    return "".join(parts)


def report_html(info: dict[str, Any], views: list[View], warnings: list[CheckWarning], figures: dict[str, Path],
                checks_doc: str) -> str:
    """The whole page for a run: `info` is the store's run info (run_id, profile, created, settings,
    environment), `views` its tables, `warnings` the sanity checks' (an incomplete run's first),
    `figures` stem -> PNG path, `checks_doc` the link to docs/checks.md."""
    run_id = str(info.get("run_id", ""))
    created = info.get("created")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(created)) if isinstance(created, int | float) else "?"
    contents = ([("checks", "Sanity checks")] + [(f"table-{stem}", stem.replace("_", " ")) for stem, *_ in views]
                + [("figures", "Figures"), ("settings", "Settings and environment")])
    nav = "".join(f'<a href="#{escape(anchor)}">{escape(title)}</a>' for anchor, title in contents)
    body = (f"<header><h1>Run <code>{escape(run_id)}</code></h1>\n"
            f'<p class="meta">profile <code>{escape(str(info.get("profile", "")))}</code> &middot; started {when}'
            f" &middot; pixeldp-bench report</p></header>\n<nav>{nav}</nav>\n"
            f'<section id="checks"><h2>Sanity checks</h2>\n{_checks_section(warnings, checks_doc)}</section>\n'
            '<section id="tables"><h2>Tables</h2>\n<p>Accuracies in % with their 95% Clopper-Pearson interval; '
            "each table's folded part lists every row of its CSV file.</p>\n"
            + "".join(_table_section(view) for view in views) + "</section>\n"
            f'<section id="figures"><h2>Figures</h2>\n{_figures_section(figures)}</section>\n'
            f'<section id="settings"><h2>Settings and environment</h2>\n<h3>Settings</h3>\n'
            f'{_pairs(info.get("settings") or {})}\n<h3>Environment</h3>\n{_pairs(info.get("environment") or {})}\n'
            "</section>\n<footer>Written from the results store by <code>pixeldp-bench report</code>; the tables' "
            "CSV, Markdown and LaTeX files, the figures' PNG and PDF files, <code>run.json</code>, "
            "<code>config.json</code> and <code>checks.txt</code> lie beside this page.</footer>\n")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>pixeldp-bench report: {escape(run_id)}</title>\n<style>{STYLE}</style></head>\n"
            f"<body><main>\n{body}</main></body></html>\n")
