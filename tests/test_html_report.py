"""report.html: one self-contained page whose tables equal the CSV files, checked in headless Chromium.

The browser tests skip without a `chromium` on PATH, except under CI (CI=true), where they fail:
.ci/run installs Debian's chromium so the page is always rendered there.
"""
from __future__ import annotations

import base64
import csv
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from bench.execution.store import Store
from bench.reporting.check_ids import CHECK_IDS, INCOMPLETE_RUN, CheckWarning
from bench.reporting.html import report_html
from bench.reporting.report import HTML_REPORT, write_report
from synthetic_runs import fill_store, synthetic_run

ROOT = Path(__file__).resolve().parents[1]
DATA_URI = re.compile(r'data:image/png;base64,([A-Za-z0-9+/=]+)')
INTERVAL = re.compile(r"^(-?[\d.]+) \[(-?[\d.]+), (-?[\d.]+)\]$")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict]:
    """The synthetic run's report folder and what write_report returned."""
    results = tmp_path_factory.mktemp("results")
    store = Store(results / "store.sqlite")
    run_id = fill_store(store)
    written = write_report(store, run_id, results / run_id)
    store.close()
    return results / run_id, written


class _Tables(HTMLParser):
    """Every <table> of a page: (id of the enclosing table section, table class, rows of cell texts)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[tuple[str, str, list[list[str]]]] = []
        self.section = ""
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "section":
            anchor = attributes.get("id") or ""
            self.section = anchor[len("table-"):] if anchor.startswith("table-") else ""
        elif tag == "table":
            self.tables.append((self.section, attributes.get("class") or "", []))
        elif tag == "tr":
            self.tables[-1][2].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][2][-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def _tables(html: str) -> dict[tuple[str, str], list[list[str]]]:
    parser = _Tables()
    parser.feed(html)
    return {(section, css): rows for section, css, rows in parser.tables}


def _markdown_rows(path: Path) -> list[list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("|") and not line.startswith("|---")]
    return [[value.strip() for value in line.strip("|").split(" | ")] for line in lines]


@pytest.fixture(scope="module")
def chromium() -> str:
    """Chromium's path; skips without one, fails under CI (requested before `report`, so nothing is built first)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("CI is set but chromium is not on PATH: .ci/run installs it (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")


def _browse(chromium: str, page: Path, profile: Path, *options: str) -> subprocess.CompletedProcess:
    """Headless Chromium on `page` with a fresh profile (parallel tests share none) and the console on stderr."""
    command = [chromium, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={profile}",
               "--enable-logging=stderr", "--v=0", *options, page.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == [], console  # the page has no script: any console message is an error
    return done


@pytest.mark.slow
def test_the_page_is_self_contained(report):
    folder, written = report
    page = written["paths"]["html"]
    assert page == folder / HTML_REPORT
    html = page.read_text()
    embedded = DATA_URI.findall(html)
    assert [base64.b64decode(data) for data in embedded] == [
        files["png"].read_bytes() for _, files in sorted(written["paths"]["figures"].items())]
    rest = DATA_URI.sub("", html).lower()
    assert "<script" not in rest and "<link" not in rest and "@import" not in rest and "url(" not in rest
    assert "http:" not in rest and "https:" not in rest and "//" not in rest  # nor protocol-relative URLs
    assert re.findall(r'\bsrc="(?!data:)', html) == []


@pytest.mark.slow
def test_every_warning_links_its_docs_section(report):
    folder, written = report
    html = written["paths"]["html"].read_text()
    checks = written["text"].count("\nWARNING: ")
    assert checks > 0 and f"{checks} warning(s)" in html
    links = re.findall(r'class="check-id" href="([^"#]*)#([a-z-]+)"', html)
    assert links and {check for _, check in links} <= set(CHECK_IDS)
    assert all((folder / doc).resolve() == ROOT / "docs" / "checks.md" for doc, _ in links)


@pytest.mark.slow
def test_an_incomplete_run_leads_the_checks(tmp_path):
    store = Store(tmp_path / "store.sqlite")
    run = synthetic_run()
    fill_store(store, "partial", finished=5)
    html = write_report(store, "partial", tmp_path / "partial")["paths"]["html"].read_text()
    first = re.search(r'class="check-id" href="[^"]*#([a-z-]+)"', html)
    assert first is not None and first.group(1) == INCOMPLETE_RUN
    assert f"INCOMPLETE RUN: {len(run) - 5} of {len(run)} cell(s)" in html


def test_all_text_is_escaped():
    hostile = "<script>alert(1)</script>&"
    wide = pd.DataFrame({hostile: [hostile]})
    html = report_html({"run_id": hostile, "profile": hostile, "settings": {hostile: hostile},
                        "environment": {"x": [hostile]}}, [(hostile, wide, wide, hostile)],
                       [CheckWarning(hostile, hostile)], {}, hostile)
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;&amp;" in html


@pytest.mark.slow
def test_chromium_renders_the_tables_of_the_csv_files(chromium, report, tmp_path):
    folder, written = report
    dom = _browse(chromium, written["paths"]["html"], tmp_path / "profile", "--dump-dom").stdout
    tables = _tables(dom)
    stems = [stem for stem, paths in written["paths"].items() if isinstance(paths, dict) and "csv" in paths]
    assert stems and {section for section, _ in tables if section} == set(stems)
    for stem in stems:
        with open(folder / f"{stem}.csv", newline="") as handle:
            assert tables[(stem, "long")] == list(csv.reader(handle)), stem
        assert tables[(stem, "wide")] == _markdown_rows(folder / f"{stem}.md"), stem
    # The accuracy table's percentages and intervals are the CSV's fractions, to the shown decimal.
    header, *rows = tables[("accuracy_under_attack", "wide")]
    shown = {(row[0], row[1], column): value for row in rows for column, value in zip(header, row, strict=True)}
    with open(folder / "accuracy_under_attack.csv", newline="") as handle:
        expected = list(csv.DictReader(handle))
    assert len(expected) > 10
    for entry in expected:
        column = "clean" if entry["attack"] == "clean" else f"{entry['attack']} {entry['norm']}={float(entry['eps']):g}"
        match = INTERVAL.match(shown[(entry["dataset"], entry["defense"], column)])
        assert match is not None, (entry, column)
        for text, key in zip(match.groups(), ("accuracy", "ci_low", "ci_high"), strict=True):
            assert math.isclose(float(text), 100 * float(entry[key]), abs_tol=0.05 + 1e-9), (entry, key, text)


@pytest.mark.slow
def test_chromium_screenshot_is_a_page_not_a_blank(chromium, report, tmp_path):
    _, written = report
    shot = tmp_path / "report.png"
    _browse(chromium, written["paths"]["html"], tmp_path / "profile", f"--screenshot={shot}", "--window-size=1366,900",
            "--hide-scrollbars")
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (900, 1366)
    grey = pixels.mean(axis=2)
    # Text and tables: a few percent of the pixels far from the white page, and more than one shade.
    assert float(np.std(grey)) > 0.05 and float((grey < 0.5).mean()) > 0.01
