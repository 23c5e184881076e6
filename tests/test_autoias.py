"""AutoIAS: the supernet's children against standalone networks with copied weights (Eq. 9), batched students
against one-at-a-time students, the KD loss (Eq. 14-16), the search step, and runs through the CLI."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import polars as pl
import pytest
import torch

from autorecbench.config import compose, validate
from autorecbench.errors import UserError
from autorecbench.methods.autoias import (
    CONCAT,
    FUNCTIONS,
    AutoIAS,
    AutoIASSpace,
    AutoIASSupernet,
    ChildNet,
    kd_loss,
)
from autorecbench.models.supernet import ArchSpace
from conftest import read_run, run_cli, run_folders
from offline_helpers import setup

FIELDS = ["a", "b", "c", "d"]
CARDS = [7, 5, 9, 4]


def _space() -> AutoIASSpace:
    return AutoIASSpace(FIELDS, dims=[2, 4, 8], hidden=[3, 6], layers=3)


def _supernet(space: AutoIASSpace, seed: int = 0) -> AutoIASSupernet:
    torch.manual_seed(seed)
    net = AutoIASSupernet(CARDS, space, init_std=0.5, sparse=False)
    with torch.no_grad():  # non-zero everywhere, so a wrong slice shows
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def _rows(n: int = 50) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.stack([torch.randint(0, c, (n,), generator=g) for c in CARDS], dim=1).to(torch.int32)


def _archs(space: AutoIASSpace, count: int, seed: int = 2) -> dict[str, torch.Tensor]:
    archs = space.space.sample_uniform(count, torch.Generator().manual_seed(seed))
    archs["function"][0] = CONCAT  # at least one student with every pair on concat
    archs["selected"][1] = 1  # one with everything selected
    archs["selected"][2] = 0  # one with nothing selected (the MLP of biases)
    return archs


def test_space_matches_table3_and_the_teacher_is_the_largest() -> None:
    space = AutoIASSpace([f"f{i}" for i in range(39)], [4, 8, 16, 32, 64, 128], [64, 128, 256], 5)
    n, p = 39, 741
    comps = {c.name: c for c in space.space.components}
    assert [c.name for c in space.space.components] == ["embedding_dim", "projection_dim", "function", "selected",
                                                          "layer", "hidden"]  # S1..S6, the generator's order
    assert (comps["embedding_dim"].n_decisions, comps["projection_dim"].n_decisions) == (n, p)
    assert comps["selected"].n_decisions == comps["layer"].n_decisions == n + p
    assert comps["function"].choices == FUNCTIONS and comps["layer"].choices == (0, 1, 2, 3, 4)
    assert round(space.space.log10_size()) == 1835  # the spec: ≈ 10^1835 for Criteo
    small = _space()
    net = _supernet(small)
    teacher = small.teacher("concat")
    x = _rows()
    big = ChildNet(small, teacher, CARDS, 1e-4, False)
    params = sum(p.numel() for p in big.parameters())
    for k in range(20):
        child = ChildNet(small, ArchSpace.select(small.space.sample_uniform(20, torch.Generator().manual_seed(k)), k),
                         CARDS, 1e-4, False)
        assert sum(p.numel() for p in child.parameters()) <= params
    big.copy_from(net)
    assert torch.allclose(big(x)[:, 0], net(x, small.decode(teacher), (0,))[0], atol=1e-5)


@pytest.mark.parametrize("host_grouping", [True, False])
def test_student_sliced_from_the_supernet_equals_a_standalone_network(host_grouping: bool) -> None:
    """Both ways of computing the inserted inputs: grouped on the host (the CPU's) and gated (a GPU's)."""
    space = _space()
    net = _supernet(space)
    net.host_grouping = host_grouping
    x = _rows()
    archs = _archs(space, 12)
    decoded = space.decode(archs)
    batched = net(x, decoded)
    for s in range(12):
        arch = ArchSpace.select(archs, s)
        child = ChildNet(space, arch, CARDS, 1e-4, False)
        child.copy_from(net)
        assert torch.allclose(child(x)[:, 0], batched[s], atol=1e-5), space.describe(arch)
        # the child holds only its own tensors: tables of its sizes for the fields it uses
        used = set(space.describe(arch)["used_fields"])
        dims = space.decode(arch).one(0)["field_dim"]
        assert sorted(g.table.weight.shape[1] for g in child.fields) == sorted(
            {dims[FIELDS.index(f)] for f in used})


def test_batched_students_equal_one_at_a_time() -> None:
    space = _space()
    net = _supernet(space)
    x = _rows()
    archs = _archs(space, 9)
    batched = net(x, space.decode(archs))
    single = torch.stack([net(x, space.decode(ArchSpace.select(archs, s)))[0] for s in range(9)])
    assert torch.allclose(batched, single, atol=1e-6)
    # ... and so are their gradients (Eq. 16's mean over students)
    label = torch.randint(0, 2, (50,)).float()
    teacher = torch.rand(1, 50)
    net.zero_grad()
    kd_loss(net(x, space.decode(archs)), teacher, label[None], 0.5).mean().backward()
    together = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    for s in range(9):
        (kd_loss(net(x, space.decode(ArchSpace.select(archs, s))), teacher, label[None], 0.5).sum() / 9).backward()
    for name, p in net.named_parameters():
        if name in together:
            assert torch.allclose(p.grad, together[name], atol=1e-6), name


def test_kd_loss_matches_eq_14_to_16() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 20)
    teacher = torch.rand(1, 20)
    label = torch.randint(0, 2, (1, 20)).float()
    p = torch.sigmoid(logits)

    def ce(target: torch.Tensor) -> torch.Tensor:  # Eq. 10 with a soft or hard target
        return -(target * p.log() + (1 - target) * (1 - p).log()).mean(1)

    for beta in (0.0, 0.25, 0.5, 1.0):
        assert torch.allclose(kd_loss(logits, teacher, label, beta), beta * ce(teacher) + (1 - beta) * ce(label),
                              atol=1e-6)


# ---------------------------------------------------------------- the search, in process

TINY = ["data=synthetic-criteo", "method=autoias", "data.generator.rows=3000", "data.generator.n_fields=4",
        "data.generator.n_informative=2", "data.generator.n_pairs=1", "data.generator.cardinality_max=10",
        "runner.batch_size=300", "runner.epochs=1", "method.dims=[2,4]", "method.hidden=[4,8]",
        "method.search_epochs=1", "method.students=3", "method.reward_samples=2"]


def test_search_takes_two_supernet_steps_and_one_generator_step_per_batch(tmp_path: Path) -> None:
    s = setup(tmp_path, TINY, active_only=True)
    method = s.method
    assert isinstance(method, AutoIAS)
    steps = {"adam": 0, "generator": 0}
    original_adam = method.adam

    def counting_adam(*args, **kwargs):  # type: ignore[no-untyped-def]
        optimizer = original_adam(*args, **kwargs)
        step = optimizer.step

        def counted() -> None:
            steps["adam"] += 1
            step()

        optimizer.step = counted  # type: ignore[method-assign]
        return optimizer

    method.adam = counting_adam  # type: ignore[method-assign]
    original_step = torch.optim.Adam.step

    def generator_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        steps["generator"] += 1
        return original_step(self, *args, **kwargs)

    torch.optim.Adam.step = generator_step  # type: ignore[method-assign]
    try:
        searched = method.search(s.loop())
    finally:
        torch.optim.Adam.step = original_step  # type: ignore[method-assign]
    batches = -(-len(s.data.train) // 300)
    assert steps["adam"] == 2 * batches  # Eq. 11 (teacher) and Eq. 16 (students), one optimiser
    assert steps["generator"] >= batches  # Eq. 21 (plus the dense optimisers inside the supernet's Adam)
    assert searched["search_steps"] == batches and len(method.search_rows) == 1
    row = method.search_rows[0]
    assert 0 < row["teacher_loss"] < 1 and 0 < row["student_loss"] < 1 and 0 <= row["reward_auc"] <= 1
    assert set(searched["p_select_pairs"]) == {"|".join(p) for p in s.method.space.pair_names}
    method.build(searched)
    assert isinstance(method.module(), ChildNet) and method.costs()["flops_per_example"] > 0


def test_same_seed_same_search(tmp_path: Path) -> None:
    runs = []
    for _ in range(2):
        s = setup(tmp_path, TINY, active_only=True)
        searched = s.method.search(s.loop())
        runs.append((searched["decisions"], s.method.search_rows))
    assert runs[0] == runs[1]


def test_kd_off_skips_the_teacher(tmp_path: Path) -> None:
    s = setup(tmp_path, [*TINY, "method.kd=false", "method.search=random", "method.random_candidates=3"],
              active_only=True)
    method = s.method
    assert isinstance(method, AutoIAS)
    calls = []
    forward = AutoIASSupernet.forward

    def spy(self, x, arch, input_layers=None):  # type: ignore[no-untyped-def]
        calls.append(input_layers)
        return forward(self, x, arch, input_layers)

    AutoIASSupernet.forward = spy  # type: ignore[method-assign]
    try:
        searched = method.search(s.loop())
    finally:
        AutoIASSupernet.forward = forward  # type: ignore[method-assign]
    assert (0,) not in calls  # no teacher pass
    assert searched["search"] == "random" and torch.isnan(torch.tensor(method.search_rows[0]["teacher_loss"]))


def test_bad_options_are_user_errors() -> None:
    base = ["data=synthetic-criteo", "method=autoias"]
    for bad, fragment in ((["method.budget=huge"], "method.budget"), (["method.beta=2"], "method.beta"),
                          (["method.search=grid"], "method.search"), (["method.dims=[4,4]"], "method.dims"),
                          (["task=multiclass", "data=ml-100k", "model=deepfm"], "binary")):
        with pytest.raises(UserError, match=fragment):
            validate(compose([*base, *bad]))
    quick = compose([*base, "method.budget=quick"])
    assert list(quick.method.dims) == [2, 4, 8] and quick.method.search_epochs == 2
    assert list(compose(base).method.dims) == [4, 8, 16, 32, 64, 128]


# ---------------------------------------------------------------- CLI

def test_cli_run_writes_the_architecture_and_its_costs(home: Path) -> None:
    args = [a for a in TINY if not a.startswith("method=")]
    run_cli("run", "method=autoias", *args, "-q", home=home, check=True)
    (folder,) = run_folders(home)
    arch = json.loads((folder / "architecture.json").read_text())
    assert set(arch) >= {"embedding_dim", "selected_fields", "selected_pairs", "pair_functions",
                         "pair_projection_dims", "pair_layers", "hidden", "decisions", "cost"}
    assert all(isinstance(p, list) and len(p) == 2 for p in arch["selected_pairs"])
    metrics = pl.read_parquet(folder / "metrics.parquet")
    cost = dict(zip(*metrics.filter(pl.col("split") == "cost").select("metric", "value")))
    assert cost["flops_per_example"] == arch["cost"]["flops_per_example"] > 0
    assert cost["parameters"] == arch["cost"]["parameters"] and cost["search_seconds"] > 0
    assert {"auc", "logloss"} <= set(metrics.filter(pl.col("split") == "test")["metric"])
    search = pl.read_parquet(folder / "search.parquet")
    assert {"teacher_loss", "student_loss", "reward_auc", "probe_valid_logloss", "derived_valid_auc"} <= set(search.columns)
    choices = pl.read_parquet(folder / "choices.parquet")
    assert choices.group_by("component", "key").agg(pl.col("probability").sum())["probability"].is_between(0.999, 1.001).all()
    assert read_run(folder)["method_info"]["fidelity"] == "faithful, deviations documented"


@pytest.mark.slow
def test_quick_budget_on_80k_criteo_rows_through_the_cli(home: Path) -> None:
    """The quick budget end to end: all 39 Criteo fields (741 pairs), 80,000 rows, search and re-train within
    10 minutes of 2 cores (checked as CPU time, which other processes on a shared machine do not inflate)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run_cli("run", "data=synthetic-criteo", "method=autoias", "method.budget=quick", "data.generator.rows=80000", "-q",
            home=home, check=True, timeout=7200)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    (folder,) = run_folders(home)
    cost = dict(zip(*pl.read_parquet(folder / "metrics.parquet").filter(pl.col("split") == "cost").select("metric", "value")))
    arch = json.loads((folder / "architecture.json").read_text())
    print(f"CPU {cpu:.0f} s, search {cost['search_seconds']:.0f} s, re-train {cost['train_seconds']:.0f} s (wall)")
    assert len(arch["decisions"]["function"]) == 741 and cost["flops_per_example"] > 0
    assert cpu <= 2 * 600
