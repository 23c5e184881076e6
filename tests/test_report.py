"""``autorecbench report``: one self-contained HTML file that parses, holds every comparison table, every figure,
each run's metadata and the failed/diverged/interrupted runs apart; rendered in headless Chromium where the
machine has it (no console errors, a screenshot that is not blank)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The flags the machine notes give for headless Chromium on a closed network, as root.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--log-level=0"]


class Page(HTMLParser):
    """What the tests look at: tags, image sources, external references, table rows, ids."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}
        self.images: list[dict[str, str]] = []
        self.references: list[str] = []
        self.ids: set[str] = set()
        self.rows: list[list[str]] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if "id" in values:
            self.ids.add(values["id"])
        if tag == "img":
            self.images.append(values)
        for key in ("src", "href"):
            if key in values and not values[key].startswith(("data:", "#")):
                self.references.append(values[key])
        if tag == "tr":
            self._row = []
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def report(views_results: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    done = run_cli("report", str(views_results), "--out", str(out), "--baseline", "fixed", check=True)
    assert f"report: {out}" in done.stdout
    return out


def test_report_holds_every_table_figure_run_and_failure(report: Path, views_results: Path) -> None:
    from autorecbench.results.collect import load_results
    from autorecbench.results.plot import draw

    text = report.read_text()
    page = Page()
    page.feed(text)
    page.close()
    # Self-contained: no scripts, no stylesheet, font or image from elsewhere.
    assert page.tags.get("script", 0) == 0 and page.tags.get("link", 0) == 0 and page.references == []
    assert "@font-face" not in text and "url(" not in text
    # Every figure `plot` draws, inline as an SVG data URI.
    results = load_results([str(views_results)])
    names = {p.name for p in draw(results)}
    assert {i for i in page.ids if i.startswith("fig-")} == {f"fig-{n}" for n in names}
    assert len(page.images) == len(names)
    for image in page.images:
        assert image["src"].startswith("data:image/svg+xml;base64,")
        assert base64.b64decode(image["src"].split(",", 1)[1]).lstrip().startswith(b"<?xml")
    # The comparison tables: one row per method group, both protocols, Δ against the baseline.
    methods = {(row[0], row[3] if row[0] == "synthetic-criteo" else row[2]) for row in page.rows
               if row and row[0] in ("ml-100k", "synthetic-criteo") and len(row) > 5}
    assert methods == {("ml-100k", "fixed"), ("ml-100k", "esapn"), ("synthetic-criteo", "fixed"),
                       ("synthetic-criteo", "autofis"), ("synthetic-criteo", "autodim"),
                       ("synthetic-criteo", "autoloss")}
    header = next(row for row in page.rows if row and row[0] == "dataset" and "accuracy" in row)
    assert "Δ accuracy" in header and "p" in header
    # Per-run metadata on demand: one <details> per complete run and per excluded run, with config and commit.
    assert page.tags["details"] == results.runs.height + 3
    assert text.count("<h4>config.yaml</h4>") == results.runs.height + 3 and "<h4>commit</h4>" in text
    # Failed, diverged and interrupted runs in their own section.
    excluded = text[text.index('id="excluded"'):]
    for status, seed in (("failed", 7), ("diverged", 8), ("interrupted", 9)):
        assert f"<td class=\"text\">{status}</td>" in excluded and f"_s{seed}.partial" in excluded


def test_significance_markers() -> None:
    from autorecbench.results.report import marked_cells

    header = ["method", "auc", "Δ auc", "p", "logloss", "Δ logloss", "p"]
    cells = [["a", "0.8", "+0.0100", "0.004", "0.4", "-0.0100", "0.03"],
             ["b", "0.8", "+0.0010", "0.2", "0.4", "–", "–"]]
    assert marked_cells(header, cells) == [["a", "0.8", "+0.0100**", "0.004", "0.4", "-0.0100*", "0.03"],
                                           ["b", "0.8", "+0.0010", "0.2", "0.4", "–", "–"]]


def test_report_bad_output_writes_nothing(views_results: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from autorecbench.cli.app import app
    from autorecbench.errors import UserError

    for out, expected in ((tmp_path / "report.pdf", "HTML"), (tmp_path, "is a folder")):
        done = CliRunner().invoke(app, ["report", str(views_results), "--out", str(out)])
        assert isinstance(done.exception, UserError) and expected in str(done.exception)
    assert list(tmp_path.iterdir()) == []


def _render(page: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    shot = tmp_path / f"{page.stem}.png"
    done = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           "--window-size=1200,1600", f"--screenshot={shot}", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file(), done.stderr[-2000:]
    return shot, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium; .ci/run does)")
def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    from PIL import Image, ImageStat

    shot, console = _render(report, tmp_path)
    assert console == []
    with Image.open(shot) as image:
        stats = ImageStat.Stat(image.convert("L"))
        assert stats.stddev[0] > 10  # text, tables and figures, not a blank page
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50
    # Control: the same check sees a console error, and a blank page.
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>console.error('boom'); missing();</script></body></html>")
    shot, console = _render(bad, tmp_path)
    assert any("boom" in line for line in console) and any("missing" in line for line in console)
    with Image.open(shot) as image:
        assert ImageStat.Stat(image.convert("L")).stddev[0] < 1
