"""``autorecbench plot``: every kind that applies is written as valid PNG/SVG, figures are checked by structure
(axes, series, labels, titles) rather than pixels, failed/diverged/interrupted runs are never drawn, and the
Pareto front matches brute force."""

from __future__ import annotations

import itertools
import json
import random
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import one_line_error, run_cli
from views_helpers import copy_results

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPECTED = {
    "frequency_ml-100k_binary", "sizes_ml-100k_binary", "pareto_ml-100k_binary", "curve_ml-100k_binary",
    "search-cost_ml-100k_binary", "pareto_synthetic-criteo_binary_fm", "curve_synthetic-criteo_binary_fm",
    "search-cost_synthetic-criteo_binary_fm", "autofis-alpha_synthetic-criteo_binary_fm_autofis",
    "autodim-dims_synthetic-criteo_binary_fm_autodim", "autoloss-weights_synthetic-criteo_binary_fm_autoloss",
    "validate_autofis",
}


@pytest.fixture(scope="module")
def plots(views_results: Path):  # type: ignore[no-untyped-def]
    from autorecbench.results.collect import load_results
    from autorecbench.results.plot import draw

    results = load_results([str(views_results)])
    return results, {p.name: p for p in draw(results)}


def _legend(ax) -> list[str]:  # type: ignore[no-untyped-def]
    legend = ax.get_legend() or ax.figure.legends[0]
    return [t.get_text() for t in legend.get_texts()]


def test_plot_cli_writes_every_kind_as_valid_png_and_svg(views_results: Path, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "figures"
    done = run_cli("plot", str(views_results), "--out", str(out), "--format", "png,svg", check=True)
    written = {p.name for p in out.iterdir()}
    assert written == {f"{name}.{fmt}" for name in EXPECTED for fmt in ("png", "svg")}
    for name in EXPECTED:
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(PNG_SIGNATURE)
        with Image.open(out / f"{name}.png") as image:
            image.verify()
        root = ET.parse(out / f"{name}.svg").getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert not list(root.iter("{http://www.w3.org/2000/svg}text"))  # text drawn as paths: no fonts needed
    assert "not drawn: 3 failed, diverged or interrupted run(s)" in done.stdout


def test_figures_have_the_expected_structure(plots) -> None:  # type: ignore[no-untyped-def]
    results, by_name = plots
    assert set(by_name) == EXPECTED
    frequency = by_name["frequency_ml-100k_binary"].figure
    assert len(frequency.axes) == 2
    assert [ax.get_xlabel() for ax in frequency.axes] == ["user frequency (occurrences)", "item frequency (occurrences)"]
    assert _legend(frequency.axes[0]) == ["esapn", "fixed"]
    for ax in frequency.axes:
        assert len(ax.containers) == 2  # one error-bar series per method
        assert ax.get_ylabel() == "accuracy"
    title = frequency.get_suptitle()
    assert "ml-100k" in title and "binary" in title and "seeds 0,1" in title
    # Only the size-search method has sizes by frequency.
    sizes = by_name["sizes_ml-100k_binary"].figure
    assert _legend(sizes.axes[0]) == ["esapn"] and sizes.axes[0].get_yscale() == "log"
    pareto = by_name["pareto_synthetic-criteo_binary_fm"].figure.axes[0]
    assert pareto.get_xscale() == "log" and "embedding MiB" in pareto.get_xlabel()
    assert _legend(pareto) == ["Pareto front", "autodim", "autofis", "autoloss", "fixed"]
    assert pareto.get_ylabel().startswith("auc")
    # Offline curve: the search stages are shaded (AutoDim and AutoFIS search; FIXED and AutoLoss do not).
    curve = by_name["curve_synthetic-criteo_binary_fm"].figure.axes[0]
    assert sum(1 for p in curve.patches if p.get_alpha() == 0.08) == 2 and "search stage" in _legend(curve)
    stream_curve = by_name["curve_ml-100k_binary"].figure.axes[0]
    assert len(stream_curve.get_lines()) == 2 and stream_curve.get_xlabel().startswith("interactions")
    cost = by_name["search-cost_synthetic-criteo_binary_fm"].figure.axes[0]
    assert _legend(cost) == ["autodim", "autofis", "autoloss"]  # FIXED is the reference, not a point
    heatmap = by_name["autofis-alpha_synthetic-criteo_binary_fm_autofis"].figure.axes[0]
    fields = results.table("pairs").select("field_a").unique().height + 1
    assert heatmap.images[0].get_array().shape == (fields, fields)
    dims = by_name["autodim-dims_synthetic-criteo_binary_fm_autodim"].figure.axes[0]
    assert len(dims.patches) == results.table("dims")["field"].n_unique()
    weights = by_name["autoloss-weights_synthetic-criteo_binary_fm_autoloss"].figure.axes[0]
    assert _legend(weights) == ["focal", "kl", "hinge", "ce"]
    validate = by_name["validate_autofis"].figure
    assert [ax.get_ylabel() for ax in validate.axes] == ["recall", "auc_gain"]
    assert _legend(validate.axes[0]) == ["method", "oracle", "null"]
    assert [t.get_text() for t in validate.axes[0].get_xticklabels()] == ["planted", "control"]


def test_colours_are_consistent_across_figures(plots) -> None:  # type: ignore[no-untyped-def]
    _, by_name = plots

    def colours(name: str) -> dict[str, str]:
        from matplotlib.colors import to_hex

        ax = by_name[name].figure.axes[0]
        return {c.get_label(): to_hex(c.lines[0].get_color()) for c in ax.containers}

    frequency = colours("frequency_ml-100k_binary")
    pareto = colours("pareto_ml-100k_binary")
    assert frequency["fixed"] == pareto["fixed"] == "#333333"
    assert frequency["esapn"] == pareto["esapn"] != "#333333"


def test_failed_diverged_and_interrupted_runs_are_never_drawn(plots, views_results: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import polars as pl

    from autorecbench.results.collect import load_results

    results, _ = plots
    assert sorted(r.status for r in results.excluded) == ["diverged", "failed", "interrupted"]
    assert set(results.runs["seed"].to_list()) == {0, 1}  # the seeds 7-9 of the excluded runs are nowhere
    assert results.table("buckets")["seed"].unique().sort().to_list() == [0, 1]
    # Control: a complete run whose headline metric is not finite counts as diverged too.
    copy = copy_results(views_results, tmp_path / "results")
    folder = next(p for p in copy.iterdir() if p.name.endswith("_esapn_s1"))
    info = json.loads((folder / "run.json").read_text())
    info["metrics"]["accuracy"] = float("nan")
    (folder / "run.json").write_text(json.dumps(info))
    again = load_results([str(copy)])
    assert "diverged" in [r.status for r in again.excluded] and again.runs.height == results.runs.height - 1
    assert pl.Series(again.runs["run_id"]).str.contains("esapn_s1").sum() == 0


def test_pareto_front_matches_brute_force() -> None:
    from autorecbench.results.figures.common import pareto_front

    rng = random.Random(0)
    for lower in (False, True):
        for _ in range(50):
            points = [(rng.choice([1.0, 2.0, 4.0, 8.0]), rng.random()) for _ in range(rng.randint(1, 8))]

            def beats(a, b):  # type: ignore[no-untyped-def]
                better = a[1] <= b[1] if lower else a[1] >= b[1]
                return a[0] <= b[0] and better and a != b

            brute = {p for p in points if not any(beats(q, p) for q in points)}
            front = pareto_front(points, lower)
            assert set(front) == brute
            assert all(a[0] < b[0] for a, b in itertools.pairwise(front))


def test_plot_bad_input_is_one_line_and_writes_nothing(views_results: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from autorecbench.cli.app import app
    from autorecbench.errors import UserError

    out = tmp_path / "figures"
    line = one_line_error(run_cli("plot", str(tmp_path / "nowhere"), "--out", str(out)))
    assert "no runs found" in line and not out.exists()
    # The rest in process (the exit-code contract is the CLI wrapper's, checked above): each a UserError.
    runner = CliRunner()
    for args, expected in (
        (["--kind", "frequencies"], "unknown figure kind(s) frequencies"),
        (["--format", "png,gif"], "gif"),
    ):
        done = runner.invoke(app, ["plot", str(views_results), "--out", str(out), *args])
        assert isinstance(done.exception, UserError) and expected in str(done.exception), done.output
    done = runner.invoke(app, ["plot", str(views_results / "validate"), "--out", str(out), "--kind", "frequency"])
    assert isinstance(done.exception, UserError) and "nothing to draw" in str(done.exception)
    assert not out.exists()
    kinds = runner.invoke(app, ["plot", "--list-kinds"]).output
    assert "frequency" in kinds and "validate" in kinds and "search-cost" in kinds
