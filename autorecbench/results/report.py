"""``autorecbench report``: one self-contained HTML page of a results folder, readable offline.

The page holds, in order: the comparison tables (as ``compare``, one per protocol, with Δ and significance
markers against ``--baseline``: ``*`` p < 0.05, ``**`` p < 0.01, from ``compare``'s paired or Welch t-test
across seeds), every figure that applies (``plot``'s kinds, as SVG data URIs with text drawn as paths: no
fonts), each run's metadata behind a ``<details>`` disclosure (config, versions, hardware, git commit, the
searched architecture), and the failed, diverged, interrupted and unpublished runs in their own section.
No scripts, no external stylesheets, fonts or images: the file is the whole report.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autorecbench.errors import UserError
from autorecbench.results.collect import ResultSet
from autorecbench.results.compare import Comparison, compare, display_rows, shared_settings
from autorecbench.results.plot import Plot, draw
from autorecbench.results.run_folder import RunRecord, read_record

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 78em; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.82em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; white-space: normal; }
.figures { display: flex; flex-wrap: wrap; gap: 1.2em; }
figure { margin: 0; flex: 1 1 28em; max-width: 36em; } figure img { width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.8em; color: #555; }
details { margin: 0.3em 0; } summary { cursor: pointer; } pre { background: #f7f7f7; padding: 0.6em;
overflow-x: auto; font-size: 0.8em; }
.note { color: #555; font-size: 0.85em; } .wide { overflow-x: auto; }
"""
SIGNIFICANCE = ((0.01, "**"), (0.05, "*"))


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: Sequence[str] = ()) -> str:
    def cell(tag: str, name: str, value: str) -> str:
        cls = ' class="text"' if name in text_columns else ""
        return f"<{tag}{cls}>{_e(value)}</{tag}>"

    head = "".join(cell("th", h, h) for h in header)
    body = "".join("<tr>" + "".join(cell("td", h, v) for h, v in zip(header, row)) + "</tr>" for row in rows)
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def marked_cells(header: list[str], cells: list[list[str]]) -> list[list[str]]:
    """Each ``Δ`` cell followed by a ``p`` cell gets ``*`` (p < 0.05) or ``**`` (p < 0.01)."""
    out = []
    for row in cells:
        row = list(row)
        for i, name in enumerate(header[:-1]):
            if name.startswith("Δ ") and header[i + 1] == "p" and row[i + 1] not in ("–", ""):
                p = float(row[i + 1])
                row[i] += next((mark for bound, mark in SIGNIFICANCE if p < bound), "")
        out.append(row)
    return out


def _comparison(results: ResultSet, baseline: str | None) -> str:
    """One ``compare`` table per protocol (streaming and offline runs report different metrics)."""
    parts = []
    for runner in sorted(results.runs["runner"].unique().to_list()):
        paths = results.runs.filter(results.runs["runner"] == runner)["path"].to_list()
        note = ""
        try:
            cmp: Comparison = compare(paths, baseline=baseline)
        except UserError as exc:  # e.g. the baseline has no runs under this protocol
            cmp = compare(paths)
            note = f'<p class="note">No baseline here: {_e(exc)}</p>'
        shared = shared_settings(cmp)
        header, cells = display_rows(cmp, shared)
        text = {"dataset", "task", "model", "method", "variant"}
        parts.append(f"<h3>{_e(runner)} runs ({cmp.n_runs})</h3>" + note
                     + _table(header, marked_cells(header, cells), [h for h in header if h in text])
                     + (f'<p class="note">Every row: {_e(" ".join(shared))}</p>' if shared else ""))
    legend = ('<p class="note">mean ± standard deviation over seeds; n: seeds. '
              + (f"Δ: difference to <b>{_e(baseline)}</b> under the same settings; p: paired t-test on shared "
                 "seeds, else Welch's; * p &lt; 0.05, ** p &lt; 0.01." if baseline else "Add --baseline METHOD for "
                 "differences and significance.") + "</p>")
    return legend + "".join(parts)


def _figure(plot: Plot) -> str:
    data = base64.b64encode(plot.render("svg")).decode("ascii")
    caption = _e(plot.title.replace("\n", " — "))
    return (f'<figure id="fig-{_e(plot.name)}" data-kind="{_e(plot.kind)}"><img alt="{caption}" '
            f'src="data:image/svg+xml;base64,{data}"><figcaption>{_e(plot.name)}: {caption}</figcaption></figure>')


def _details(title: str, body: str) -> str:
    return f"<details><summary>{title}</summary>{body}</details>"


def _kv(pairs: dict[str, Any]) -> str:
    return _table(["key", "value"], [[k, json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v)]
                                     for k, v in pairs.items()], ["key", "value"])


def _run_metadata(path: Path, info: dict[str, Any]) -> str:
    """A run's config, versions, hardware, commit and searched architecture, folded."""
    parts = [_kv({k: info.get(k) for k in ("run_id", "status", "dataset", "task", "model", "method", "seed",
                                         "runner", "variant", "tuning", "config_hash", "device", "started_at",
                                         "wall_seconds", "command") if k in info})]
    git = info.get("git") or {}
    parts.append("<h4>commit</h4>" + _kv(git if isinstance(git, dict) else {"git": git}))
    for key in ("versions", "hardware"):
        if isinstance(info.get(key), dict):
            parts.append(f"<h4>{key}</h4>" + _kv(info[key]))
    for name in ("config.yaml", "architecture.json"):
        file = path / name
        if file.is_file():
            parts.append(f"<h4>{name}</h4><pre>{_e(file.read_text())}</pre>")
    if info.get("error"):
        parts.append(f"<h4>error</h4><pre>{_e(info.get('traceback') or info['error'])}</pre>")
    return "".join(parts)


def _excluded(records: Sequence[RunRecord]) -> str:
    if not records:
        return "<p>None: every run found completed.</p>"
    rows = []
    for record in records:
        first = (record.error or "").splitlines()[0] if record.error else ""
        rows.append([str(record.path), record.status, first])
    folded = "".join(_details(f"{_e(r.path.name)} — {_e(r.status)}", _run_metadata(r.path, r.info or {}))
                     for r in records if r.info)
    return (_table(["run folder", "status", "error"], rows, ["run folder", "status", "error"])
            + '<p class="note">Never drawn, never in the means.</p>' + folded)


def build_report(results: ResultSet, inputs: Sequence[str], baseline: str | None = None,
                 kinds: Sequence[str] | None = None, metric: str | None = None, title: str | None = None) -> str:
    """The HTML text of the report."""
    plots = draw(results, kinds, metric)
    n = results.runs.height
    heading = title or "autorecbench report"
    made = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    parts = [
        f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(heading)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{_e(heading)}</h1>",
        f'<p class="note">{n} complete run(s), {len(results.excluded)} failed, diverged or interrupted, from '
        f"{_e(', '.join(inputs))}; made {made}.</p>",
        '<nav><a href="#comparison">Comparison</a> · <a href="#figures">Figures</a> · <a href="#runs">Runs</a> · '
        '<a href="#excluded">Failed, diverged and interrupted runs</a></nav>',
        '<h2 id="comparison">Comparison</h2>',
        _comparison(results, baseline) if n else "<p>No complete runs.</p>",
        f'<h2 id="figures">Figures ({len(plots)})</h2>',
        '<div class="figures">' + "".join(_figure(p) for p in plots) + "</div>" if plots else "<p>No figures apply.</p>",
        f'<h2 id="runs">Runs ({n})</h2><p class="note">Click a run for its config, versions, hardware and commit.</p>',
    ]
    for run_id, path in results.paths.items():
        info = read_record(path).info or {}
        label = f"{_e(run_id)} — {_e(info.get('method'))}, seed {_e(info.get('seed'))}"
        parts.append(_details(label, _run_metadata(path, info)))
    parts += [f'<h2 id="excluded">Failed, diverged and interrupted runs ({len(results.excluded)})</h2>',
              _excluded(results.excluded), "</body></html>\n"]
    return "\n".join(parts)


def check_out(out: Path) -> None:
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name the HTML file, e.g. {out / 'report.html'}")
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--out {out}: the report is one HTML file; name it *.html")


def write_report(text: str, out: Path) -> None:
    """Write atomically: a failed write leaves no half report."""
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
