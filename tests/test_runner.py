"""The streaming protocol: test-then-train order, evaluation window, batches, history, determinism."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from autorecbench.data.schema import TaskSpec
from autorecbench.data.stream import StreamHistory, load_stream
from autorecbench.runners.streaming import StreamingConfig, StreamingRunner, evaluation_window
from conftest import make_streaming_method, prepare_synthetic

DEVICE = torch.device("cpu")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    return prepare_synthetic(tmp_path_factory.mktemp("runner"), n_users=200, n_items=150, n_interactions=6000)


def make_fixed(prepared, task: TaskSpec, seed: int = 0, **overrides):
    return make_streaming_method(prepared, "fixed", task, seed, **{"embedding_dim": 16, **overrides})


@pytest.mark.parametrize("task_name", ["binary", "multiclass"])
def test_prediction_for_a_batch_is_made_before_training_on_it(prepared, task_name: str) -> None:
    task = TaskSpec.from_name(task_name)
    stream = load_stream(prepared, task, DEVICE)
    recorded: dict[int, torch.Tensor] = {}
    events: list[tuple[str, int]] = []

    def hook(event, batch, value):
        events.append((event, batch.index))
        if event == "predicted":
            recorded[batch.index] = value.clone()

    StreamingRunner(StreamingConfig(batch_size=500), hook=hook).run(make_fixed(prepared, task), stream)
    n_batches = len(stream.batch_bounds(500))
    assert events == [(e, b) for b in range(n_batches) for e in ("predicted", "learned")]

    # Replay: a fresh model (same seed) trained on batches 0..k-1 predicts batch k exactly as recorded,
    # and no longer does once it has also trained on batch k.
    k = 5
    replay = make_fixed(prepared, task)
    history = StreamHistory(stream)
    bounds = stream.batch_bounds(500)
    for b in range(k):
        batch = stream.rows(slice(*bounds[b]), b)
        replay.learn(batch, history)
        history.advance(batch)
    batch_k = stream.rows(slice(*bounds[k]), k)
    with torch.no_grad():
        before = replay.predict(batch_k)
    assert torch.equal(before, recorded[k])
    replay.learn(batch_k, history)
    with torch.no_grad():
        after = replay.predict(batch_k)
    assert not torch.allclose(after, recorded[k])


@pytest.mark.parametrize("batch_norm", ["batch", "running"])
def test_one_pass_test_then_train_equals_predict_then_learn(prepared, batch_norm: str) -> None:
    """FIXED's ``predict_and_learn`` uses the training pass's outputs as predictions with batch-statistics
    batch-norm (bit for bit what ``predict`` gives) and a separate ``predict`` with running statistics."""
    task = TaskSpec.from_name("binary")
    stream = load_stream(prepared, task, DEVICE)
    one, two = (make_fixed(prepared, task, model_overrides={"batch_norm": batch_norm}) for _ in range(2))
    history = StreamHistory(stream)
    for b, (start, end) in enumerate(stream.batch_bounds(500)[:4]):
        batch = stream.rows(slice(start, end), b)
        predicted, loss = one.predict_and_learn(batch, history)
        with torch.no_grad():
            expected = two.predict(batch)
        assert torch.equal(predicted, expected) and torch.equal(loss, two.learn(batch, history))
        history.advance(batch)
    assert all(torch.equal(a, b) for a, b in zip(one.model.state_dict().values(), two.model.state_dict().values()))


def test_predict_changes_no_state(prepared) -> None:
    task = TaskSpec.from_name("binary")
    stream = load_stream(prepared, task, DEVICE)
    method = make_fixed(prepared, task)
    batch = stream.rows(slice(0, 500), 0)
    state = {k: v.clone() for k, v in method.model.state_dict().items()}
    tables = method.user_table.weight.detach().clone()
    with torch.no_grad():
        first = method.predict(batch)
        second = method.predict(batch)
    assert torch.equal(first, second)
    assert all(torch.equal(state[k], v) for k, v in method.model.state_dict().items())
    assert torch.equal(tables, method.user_table.weight)


def test_same_seed_same_numbers_and_different_seed_differs(prepared) -> None:
    task = TaskSpec.from_name("binary")

    def run(seed: int) -> list:
        stream = load_stream(prepared, task, DEVICE)
        result = StreamingRunner(StreamingConfig(batch_size=250)).run(make_fixed(prepared, task, seed), stream)
        rows = result.metrics + result.curve + result.buckets
        return [{k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_lazy_and_dense_adam_both_learn_and_differ(prepared) -> None:
    task = TaskSpec.from_name("binary")
    out = {}
    for mode in ("lazy", "dense"):
        stream = load_stream(prepared, task, DEVICE)
        method = make_fixed(prepared, task, embedding_optimizer=mode)
        before = method.item_table.weight.detach().clone()
        result = StreamingRunner(StreamingConfig(batch_size=500)).run(method, stream)
        out[mode] = result.metrics
        after = method.item_table.weight.detach()
        never_seen = torch.ones(prepared.schema.n_items, dtype=torch.bool)
        never_seen[stream.item] = False
        moved = (after != before).any(dim=1)
        if mode == "lazy":
            assert not moved[never_seen].any()  # lazy Adam leaves rows no batch touched
        assert moved[~never_seen].all()
    assert out["lazy"] != out["dense"]


def test_evaluation_window_rule() -> None:
    w = evaluation_window(30_000_000, 5_000_000, 0.2)
    assert (w.rule, w.start, w.n) == ("last_n", 25_000_000, 5_000_000)
    w = evaluation_window(19_999_999, 5_000_000, 0.2)  # fewer than 4 x N rows: last 20%
    assert (w.rule, w.n, w.end) == ("last_fraction", 4_000_000, 19_999_999)
    assert evaluation_window(100_000, 5_000_000, 0.2).start == 80_000


def test_batch_bounds_cover_the_stream_and_merge_a_single_row_tail(prepared) -> None:
    stream = load_stream(prepared, TaskSpec.from_name("binary"), DEVICE, max_rows=1001)
    bounds = stream.batch_bounds(500)
    assert bounds == [(0, 500), (500, 1001)]
    stream = load_stream(prepared, TaskSpec.from_name("binary"), DEVICE, max_rows=1002)
    assert stream.batch_bounds(500) == [(0, 500), (500, 1000), (1000, 1002)]


def test_random_order_is_a_seeded_permutation(prepared) -> None:
    task = TaskSpec.from_name("binary")
    timed = load_stream(prepared, task, DEVICE)
    a = load_stream(prepared, task, DEVICE, order="random", order_seed=7)
    b = load_stream(prepared, task, DEVICE, order="random", order_seed=7)
    c = load_stream(prepared, task, DEVICE, order="random", order_seed=8)
    assert torch.equal(a.timestamp, b.timestamp) and not torch.equal(a.timestamp, c.timestamp)
    assert torch.equal(a.timestamp.sort().values, timed.timestamp)
    assert bool((timed.timestamp[1:] >= timed.timestamp[:-1]).all())


def test_history_counts_and_samples_only_seen_rows(prepared) -> None:
    task = TaskSpec.from_name("binary")
    stream = load_stream(prepared, task, DEVICE)
    history = StreamHistory(stream)
    gen = torch.Generator().manual_seed(0)
    assert history.sample(10, gen) is None and history.last_batch() is None
    bounds = stream.batch_bounds(500)
    for b in range(3):
        history.advance(stream.rows(slice(*bounds[b]), b))
    assert int(history.user_count.sum()) == 1500
    assert torch.equal(history.user_count, torch.bincount(stream.user[:1500], minlength=stream.n_users))
    sample = history.sample(2000, gen)
    assert sample is not None and len(sample) == 2000
    seen_pairs = set(zip(stream.user[:1500].tolist(), stream.item[:1500].tolist()))
    assert set(zip(sample.user.tolist(), sample.item.tolist())) <= seen_pairs
    last = history.last_batch()
    assert last is not None and (last.start, last.end) == (1000, 1500)


def test_frequencies_in_batches_are_occurrence_numbers(prepared) -> None:
    stream = load_stream(prepared, TaskSpec.from_name("binary"), DEVICE)
    first_rows = {}
    for row, user in enumerate(stream.user.tolist()):
        first_rows.setdefault(user, row)
    firsts = torch.tensor(sorted(first_rows.values()))
    assert bool((stream.user_freq[firsts] == 1).all())
    assert int(stream.user_freq.max()) == int(torch.bincount(stream.user).max())


def test_method_reports_become_parquet_tables(tmp_path) -> None:
    import polars as pl

    from autorecbench.results.run_folder import RunFolder

    folder = RunFolder(tmp_path, "r")
    ids = {"dataset": "d", "task": "binary", "method": "m", "seed": 1}
    folder.write_table("sizes", ids, [{"entity": "user", "size": 2, "count": 10}, {"entity": "item", "size": 4, "count": 3}])
    frame = pl.read_parquet(folder.path / "sizes.parquet")
    assert frame.columns == ["run_id", "dataset", "task", "method", "seed", "model", "entity", "size", "count"]
    assert frame["seed"].dtype == pl.Int64 and frame.height == 2


def test_bench_runs_rounds_and_reports_medians_and_the_ratio_to_fixed(tmp_path) -> None:
    """``make bench``'s driver with ``--repeat``: every configuration once per round, medians, FIXED / method."""
    import json
    import subprocess
    import sys

    args = [sys.executable, "-m", "autorecbench.bench.streaming", "--rows=1500", "--users=300", "--items=200",
            "--methods=fixed,esapn", "--optimizers=lazy", "--repeat=2", "--device=cpu", f"--root={tmp_path}"]
    table = subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "250"})
    assert table.returncode == 0, table.stderr
    assert "FIXED / method" in table.stdout and "median (min–max) of 2 rounds" in table.stdout
    esapn_row = next(line for line in table.stdout.splitlines() if line.lstrip("│ ").startswith("esapn"))
    assert "×" in esapn_row and "–" in esapn_row  # a ratio and a range
    lines = subprocess.run([*args, "--json", "--repeat=1"], capture_output=True, text=True, timeout=600).stdout
    results = [json.loads(line) for line in lines.splitlines() if line.startswith("{")]
    assert [(r["method"], r["round"]) for r in results] == [("fixed", 0), ("esapn", 0)]
    assert all(r["rows"] == 1500 and r["interactions_per_second"] > 0 for r in results)


@pytest.mark.parametrize("name, overrides, batch_norm", [
    ("fixed", {"embedding_dim": 16}, "batch"),
    ("darts", {}, "batch"),
    ("autoemb", {}, "batch"),
    ("esapn", {}, "batch"),
    ("esapn", {}, "running"),  # predict, then learn (no shared forward pass)
    ("esapn", {"validation": "history"}, "batch"),
])
def test_changing_the_labels_of_batch_t_leaves_its_predictions_unchanged(prepared, name: str, overrides: dict,
                                                                         batch_norm: str) -> None:
    """The streaming protocol for every streaming method: the predictions for batch t are made before its
    labels are used. Flipping batch t's labels leaves the predictions of batches 0..t exactly as they were
    and changes later ones (control: the labels do reach the model)."""
    task = TaskSpec.from_name("binary")
    stream = load_stream(prepared, task, DEVICE, max_rows=1500)
    t, size = 3, 250

    def predictions(labels: torch.Tensor) -> torch.Tensor:
        recorded = torch.empty(len(stream))
        copy = dataclasses.replace(stream, label=labels)

        def hook(event, batch, value):
            if event == "predicted":
                recorded[batch.start:batch.end] = value

        method = make_streaming_method(prepared, name, task, 0, model_overrides={"batch_norm": batch_norm}, **overrides)
        StreamingRunner(StreamingConfig(batch_size=size), hook=hook).run(method, copy)
        return recorded

    flipped = stream.label.clone()
    flipped[t * size:(t + 1) * size] = 1.0 - flipped[t * size:(t + 1) * size]
    before, after = predictions(stream.label), predictions(flipped)
    assert torch.equal(before[: (t + 1) * size], after[: (t + 1) * size])
    assert not torch.allclose(before[(t + 1) * size:], after[(t + 1) * size:])
