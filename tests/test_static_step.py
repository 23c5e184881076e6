"""The static-shape streaming step (``method.static_shapes=true``): no device->host transfer, no data-dependent
shape in the per-batch step of FIXED, DARTS and AutoEmb, proven by compiling it with ``fullgraph=True`` through
a backend that rejects any data-dependent value; the same numbers as eager, and as the default step up to float
rounding. Also the static helpers against brute force, and ``runner.amp=bf16`` offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autorecbench.data.schema import TaskSpec
from autorecbench.data.stream import StreamHistory, batch_groups, load_stream
from autorecbench.runners.streaming import StreamingConfig, StreamingRunner
from autorecbench.train.optim import RowAdam
from omegaconf import OmegaConf

from conftest import REPO, make_streaming_method, one_line_error, prepare_synthetic, read_run, run_cli, run_folders

ML100K = "data.path=" + str(REPO / "data" / "raw" / "ml-100k")


def _config(folder: Path):  # type: ignore[no-untyped-def]
    return OmegaConf.load(folder / "config.yaml")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return prepare_synthetic(tmp_path_factory.mktemp("static"), 300, 200, 3000)


def test_batch_groups_match_brute_force() -> None:
    ids = torch.randint(0, 12, (200,), generator=torch.Generator().manual_seed(0))
    groups = batch_groups(ids)
    values = torch.randn(200, 3, generator=torch.Generator().manual_seed(1))
    listed = ids.tolist()
    for row, i in enumerate(listed):
        rows = [r for r, j in enumerate(listed) if j == i]
        assert int(groups.rank[row]) == rows.index(row)
        assert int(groups.count[row]) == len(rows)
        assert int(groups.last_row[row]) == rows[-1]
        assert torch.allclose(groups.per_group_sum(values)[row], values[rows].sum(0), atol=1e-6)
    distinct = sorted(set(listed))
    assert [distinct[int(g)] for g in groups.group] == listed


def test_row_adam_is_sparse_adam() -> None:
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(50, 4, generator=gen)
    sparse = torch.nn.Embedding(50, 4, sparse=True)
    sparse.weight.data.copy_(start)
    reference = torch.optim.SparseAdam([sparse.weight], lr=0.01)
    table = start.clone()
    rows = RowAdam([table], lr=0.01)
    naive = start.clone()  # control: the same rows stepped once per row, duplicates not summed
    naive_rows = RowAdam([naive], lr=0.01)
    for _ in range(3):
        ids = torch.randint(0, 50, (40,), generator=gen)
        target = torch.randn(40, 4, generator=gen)
        reference.zero_grad()
        ((sparse(ids) - target) ** 2).sum().backward()
        reference.step()
        gathered = table.index_select(0, ids).requires_grad_()
        ((gathered - target) ** 2).sum().backward()
        rows.update(0, ids, gathered.grad, batch_groups(ids), rows.advance())
        plain = naive.index_select(0, ids).requires_grad_()
        ((plain - target) ** 2).sum().backward()
        naive_rows.update(0, ids, plain.grad, batch_groups(torch.arange(40)), naive_rows.advance())
    assert torch.allclose(table, sparse.weight.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(naive, sparse.weight.detach(), rtol=1e-4, atol=1e-5)  # duplicates matter


def _reject_data_dependent(gm: torch.fx.GraphModule, example_inputs: list) -> object:  # type: ignore[type-arg]
    """A torch.compile backend that fails on any value whose shape or value is data-dependent (``.item()``,
    ``nonzero``, ``unique``, boolean masks, ``bincount``): what needs a device->host transfer."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    bad = [n.format_node() for n in gm.graph.nodes if free_unbacked_symbols(n.meta.get("example_value"))]
    if bad:
        raise AssertionError("data-dependent values in the step: " + "; ".join(bad[:3]))
    return gm.forward


def _compiled_against_eager(prepared, name: str, static: str, batches: int = 4) -> None:  # type: ignore[no-untyped-def]
    import torch._dynamo

    task = TaskSpec.from_name("binary")
    stream = load_stream(prepared, task, torch.device("cpu"))
    bounds = stream.batch_bounds(200)[:batches]
    outputs = []
    for compiled in (False, True):
        method = make_streaming_method(prepared, name, task, static_shapes=static)
        history = StreamHistory(stream)
        # ESAPN's step has a host part between steps (validation rows, uniforms, table growth): compile the rest.
        prepare = getattr(method, "prepare_step", None) if method.static else None
        step = method.predict_and_learn if prepare is None else method.static_step
        if compiled:
            torch._dynamo.reset()
            step = torch.compile(step, fullgraph=True, backend=_reject_data_dependent)
        out = []
        for index, (start, end) in enumerate(bounds):
            batch = stream.rows(slice(start, end), index)
            predicted, loss = step(batch, history if prepare is None else prepare(batch, history))
            history.advance(batch)
            out.append((predicted.detach().clone(), loss.detach().clone()))
        outputs.append(out)
    for (p0, l0), (p1, l1) in zip(*outputs):
        assert torch.equal(p0, p1) and torch.equal(l0, l1)


@pytest.fixture()
def trace_backward():  # type: ignore[no-untyped-def]
    import torch._dynamo.config as dynamo_config

    with dynamo_config.patch(trace_autograd_ops=True):  # backward() inside the compiled step
        yield


@pytest.mark.usefixtures("trace_backward")
@pytest.mark.parametrize("name", ["fixed", pytest.param("darts", marks=pytest.mark.slow),
                                  pytest.param("autoemb", marks=pytest.mark.slow),
                                  pytest.param("esapn", marks=pytest.mark.slow)])  # ESAPN: 21 CPU-s, 3 graphs
def test_static_step_compiles_fullgraph_without_host_sync(prepared, name: str) -> None:  # type: ignore[no-untyped-def]
    _compiled_against_eager(prepared, name, "true")


@pytest.mark.usefixtures("trace_backward")
def test_the_check_rejects_the_data_dependent_step(prepared) -> None:  # type: ignore[no-untyped-def]
    """Control: FIXED's default CPU step (sparse gradients, SparseAdam's coalesce) does not pass."""
    import torch._dynamo.exc

    with pytest.raises(torch._dynamo.exc.TorchDynamoException):
        _compiled_against_eager(prepared, "fixed", "false", batches=2)


@pytest.mark.parametrize("name", ["fixed", "darts", "autoemb"])
def test_static_step_equals_default_up_to_rounding(prepared, name: str) -> None:  # type: ignore[no-untyped-def]
    task = TaskSpec.from_name("binary")
    metrics = {}
    for static in ("false", "true"):
        method = make_streaming_method(prepared, name, task, static_shapes=static)
        result = StreamingRunner(StreamingConfig(batch_size=200, eval_last=10**7)).run(
            method, load_stream(prepared, task, torch.device("cpu")))
        metrics[static] = {r["metric"]: r["value"] for r in result.metrics if r["split"] == "all"}
    assert metrics["true"].keys() == metrics["false"].keys()
    for key, value in metrics["false"].items():
        assert metrics["true"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def _stream_metrics(prepared, name: str, **overrides) -> dict[str, float]:  # type: ignore[no-untyped-def]
    task = TaskSpec.from_name("binary")
    method = make_streaming_method(prepared, name, task, **overrides)
    result = StreamingRunner(StreamingConfig(batch_size=200, eval_last=10**7)).run(
        method, load_stream(prepared, task, torch.device("cpu")))
    return {r["metric"]: r["value"] for r in result.metrics if r["split"] == "all"}


@pytest.mark.parametrize(("overrides", "tolerance"), [({"norm_scope": "selected"}, 5e-5), ({}, 5e-3)])
def test_esapn_static_step_equals_default_up_to_rounding(prepared, overrides: dict, tolerance: float) -> None:  # type: ignore[no-untyped-def]
    """ESAPN's static step (per-row lookups, policy per row, masked writes) against its default step (distinct
    entities and states). One step from the same state computes the same gradients up to float rounding (below
    1e-7), but with the per-size batch-norm the maps' biases have gradients that are exactly zero in exact
    arithmetic (each size group is normalised after them), i.e. rounding noise of ~1e-8-1e-7, which Adam's first
    steps scale to ~lr-sized moves: over a stream the metrics then differ by ~1e-4 (measured; README "Speed").
    With ``norm_scope=selected`` they agree to ~1e-5."""
    metrics = {static: _stream_metrics(prepared, "esapn", static_shapes=static, **overrides)
               for static in ("false", "true")}
    for key, value in metrics["false"].items():
        assert metrics["true"][key] == pytest.approx(value, abs=tolerance), key


def test_esapn_static_step_computes_the_default_gradients(prepared) -> None:  # type: ignore[no-untyped-def]
    """The first step from the same state: equal predictions, and every gradient of the rating model, the maps
    and the per-size norms within 1e-7 of the default step's; the maps' biases' gradients are rounding noise
    (below 1e-4 of the weights': what Adam amplifies into the stream differences above)."""
    task = TaskSpec.from_name("binary")
    stream = load_stream(prepared, task, torch.device("cpu"))
    batch = stream.rows(slice(0, 200), 0)
    grads, predictions = {}, {}
    for static in ("false", "true"):
        method = make_streaming_method(prepared, "esapn", task, static_shapes=static)
        predictions[static] = method.predict_and_learn(batch, StreamHistory(stream))[0]
        modules = (method.model, method.maps, method.size_norms)
        grads[static] = {n: p.grad.clone() for m in modules for n, p in m.named_parameters()}
    assert torch.allclose(predictions["true"], predictions["false"], atol=1e-6)
    for name, grad in grads["false"].items():
        assert torch.allclose(grads["true"][name], grad, atol=1e-7), name
    biases = [g.abs().max() for n, g in grads["false"].items() if "maps" in n and n.endswith("bias")]
    weights = [g.abs().max() for n, g in grads["false"].items() if "maps" in n and n.endswith("weight")]
    assert max(biases) < 1e-4 * max(weights)  # zero up to rounding, where the weights' are ~1e-3


@pytest.mark.slow  # two CLI processes: ~30 s on the loaded 2-core machine
def test_static_shapes_through_the_cli(home: Path, ml100k_dir: Path) -> None:
    run_cli("run", "method=darts", "method.static_shapes=true", "runner.max_rows=2000", ML100K, "-q", home=home,
            check=True)
    (folder,) = run_folders(home)
    assert _config(folder).method.static_shapes is True and read_run(folder)["metrics"]["auc"] > 0.5
    done = run_cli("run", "method=fixed", "method.static_shapes=maybe", "runner.max_rows=2000", ML100K, "-q",
                   home=home)
    assert "method.static_shapes" in one_line_error(done)
    assert run_folders(home) == [folder]


@pytest.mark.slow  # two offline CLI runs: ~45 s on the loaded 2-core machine
def test_offline_bf16_autocast_learns_as_float32(home: Path) -> None:
    args = ["run", "data=synthetic-criteo", "model=deepfm", "runner.max_rows=20000", "runner.epochs=2", "-q"]
    run_cli(*args, home=home, check=True)
    run_cli(*args, "runner.amp=bf16", home=home, check=True)
    runs = {str(_config(f).runner.amp): read_run(f)["metrics"] for f in run_folders(home)}
    assert runs["bf16"]["auc"] == pytest.approx(runs["off"]["auc"], abs=0.02)
    assert runs["bf16"]["auc"] > 0.53  # above chance (±0.013 on these test rows)
    done = run_cli(*args, "runner.amp=fp8", home=home)
    assert "runner.amp" in one_line_error(done)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fixed", "darts", "autoemb"])
def test_static_step_on_cuda_is_reproducible(prepared, name: str) -> None:  # type: ignore[no-untyped-def]
    """On CUDA ``static_shapes=auto`` is the static step: reruns are bit-identical, and close to the CPU's."""
    from autorecbench.config import compose
    from autorecbench.methods.base import MethodContext, method_class

    task = TaskSpec.from_name("binary")
    runs = []
    for device in ("cuda", "cuda", "cpu"):
        cfg = compose([f"method={name}", "method.static_shapes=true"])
        torch.manual_seed(0)
        method = method_class(name)(MethodContext(prepared.schema, task, cfg.method, cfg.model, torch.device(device), 0))
        assert method.static
        result = StreamingRunner(StreamingConfig(batch_size=200, eval_last=10**7)).run(
            method, load_stream(prepared, task, torch.device(device)))
        runs.append({r["metric"]: r["value"] for r in result.metrics if r["split"] == "all"})
    assert runs[0] == runs[1]
    assert runs[0]["auc"] == pytest.approx(runs[2]["auc"], abs=0.01)
