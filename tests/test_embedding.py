"""The mixed-dimension embedding store: slots on demand, freeing and reuse, growth, initial values, Adam."""

from __future__ import annotations

import pytest
import torch

from autorecbench.models.embedding import MixedDimEmbedding, hashed_normal
from autorecbench.train.optim import tensor_bytes

CPU = torch.device("cpu")
SIZES = (2, 4, 8)


def store(n: int = 20, **kw) -> MixedDimEmbedding:
    options = {"init_std": 1.0, "seed": 0, "stream": 0, "device": CPU, "min_capacity": 2, "growth": 2.0, **kw}
    return MixedDimEmbedding(n, SIZES, **options)


def move_up(s: MixedDimEmbedding, ids: list[int]) -> None:
    """Enlarge ``ids`` one size, with recognisable values (the id, repeated)."""
    t = torch.tensor(ids)
    target = s.size_index(t) + 1
    values = [None] * len(SIZES)
    for k in range(len(SIZES)):
        chosen = t[target == k]
        if chosen.numel():
            values[k] = chosen[:, None].float().expand(-1, SIZES[k]).clone()
    s.move(t, values, target)


def test_slots_are_allocated_on_demand_freed_on_enlargement_and_reused() -> None:
    s = store()
    assert s.n_stored() == 0 and s.counts() == [0, 0, 0] and s.capacity(0) == 0
    new = s.ensure(torch.tensor([3, 5, 3, 7]))  # duplicates store once
    assert new.tolist() == [3, 5, 7]
    assert s.counts() == [3, 0, 0] and s.size_of[[3, 5, 7]].tolist() == [0, 0, 0]
    assert sorted(s.slot_of[[3, 5, 7]].tolist()) == [0, 1, 2]
    assert s.ensure(torch.tensor([5, 3])).numel() == 0  # already stored: nothing happens

    slot_of_5 = int(s.slot_of[5])
    move_up(s, [5])
    assert s.size_of[5] == 1 and s.counts() == [2, 1, 0]
    assert s.n_free[0] == 1 and int(s.free[0][0]) == slot_of_5  # the old slot is free...
    s.ensure(torch.tensor([11]))
    assert int(s.slot_of[11]) == slot_of_5 and s.n_free[0] == 0  # ...and the next entity at size 2 gets it
    assert torch.equal(s.tables[1][s.slot_of[5].long()], torch.full((4,), 5.0))

    # Entities at different sizes move together; a slot freed at size 4 is reused by the next arrival there.
    slot_of_5 = int(s.slot_of[5])
    move_up(s, [5, 3])  # 5: 4 -> 8, 3: 2 -> 4
    assert s.size_of[[3, 5]].tolist() == [1, 2] and s.counts() == [2, 1, 1]
    assert int(s.slot_of[3]) == slot_of_5 and s.high_water[1] == 1  # 5's slot at size 4 went to 3
    lookup = s.lookup(torch.tensor([5, 3, 7]))
    assert lookup.counts == [1, 1, 1]
    assert torch.equal(lookup.values[2], torch.full((1, 8), 5.0))
    assert torch.equal(lookup.values[1], torch.full((1, 4), 3.0))


def test_tables_grow_geometrically_and_bytes_are_measured() -> None:
    s = store(n=5000)
    capacities = []
    for start in range(0, 1000, 50):  # 20 batches of 50 new entities
        s.ensure(torch.arange(start, start + 50))
        capacities.append(s.capacity(0))
    assert s.n_stored() == 1000
    grows = sum(1 for a, b in zip(capacities, capacities[1:]) if b != a)
    assert grows <= 5  # 50 -> 100 -> 200 -> 400 -> 800 -> 1600, not once per entity
    assert 1000 <= s.capacity(0) <= 2000
    assert s.table_bytes() == [tensor_bytes(t) for t in s.tables]
    assert s.table_bytes()[0] == s.capacity(0) * 2 * 4 and s.table_bytes()[1] == 0
    assert s.nbytes() == sum(s.table_bytes()) + s.index_bytes()
    assert s.index_bytes() >= 5000 * (1 + 4)  # int8 size + int32 slot per entity


def test_never_stored_entities_read_the_values_they_will_be_stored_with() -> None:
    s = store(init_std=0.5)
    ids = torch.tensor([4, 9])
    before = s.lookup(ids)
    assert before.counts == [2, 0, 0] and (before.slots[0] == -1).all()
    assert s.n_stored() == 0  # reading stores nothing
    s.ensure(ids)
    after = s.lookup(ids)
    assert torch.equal(before.values[0], after.values[0])
    # A mix of stored and unstored rows in one lookup.
    mixed = s.lookup(torch.tensor([4, 13, 9]))
    assert torch.equal(mixed.values[0][[0, 2]], after.values[0])
    assert torch.equal(mixed.values[0][1], s.initial_values(torch.tensor([13]), 0)[0])


def test_mulmod32_matches_integer_arithmetic() -> None:
    from autorecbench.models.embedding import _mulmod32

    x = torch.cat([torch.randint(0, 2**32, (10000,), generator=torch.Generator().manual_seed(0)),
                   torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1])])
    for c in (0x7FEB352D, 0x846CA68B, 2**31, 2**32 - 1, 3):
        assert _mulmod32(x, c).tolist() == [(v * c) % 2**32 for v in x.tolist()]


def test_hashed_normal_is_a_deterministic_standard_normal() -> None:
    rows = torch.arange(20000)
    a = hashed_normal(0, 1, rows, 8, 1.0)
    assert torch.equal(a, hashed_normal(0, 1, rows, 8, 1.0))
    assert torch.equal(a[123:124], hashed_normal(0, 1, torch.tensor([123]), 8, 1.0))  # row by row the same
    assert abs(float(a.mean())) < 0.01 and abs(float(a.std()) - 1.0) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([a[:, 0], a[:, 1]]))[0, 1])) < 0.03
    assert not torch.equal(a, hashed_normal(1, 1, rows, 8, 1.0))
    assert not torch.equal(a, hashed_normal(0, 2, rows, 8, 1.0))
    assert abs(float(hashed_normal(0, 1, rows, 8, 0.1).std()) - 0.1) < 0.002


def _adam_reference(p: torch.Tensor, grads: list[torch.Tensor], lr: float) -> torch.Tensor:
    param = torch.nn.Parameter(p.clone())
    opt = torch.optim.Adam([param], lr=lr)
    for g in grads:
        opt.zero_grad()
        param.grad = g.clone()
        opt.step()
    return param.detach()


@pytest.mark.parametrize("mode", ["lazy", "dense"])
def test_adam_on_the_store_matches_torch_adam(mode: str) -> None:
    """dense: torch.optim.Adam over every stored row. lazy: Adam's rule on the touched rows only."""
    s = store(n=10, mode=mode, lr=0.01)
    s.ensure(torch.arange(6))
    start = s.tables[0][:6].clone()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.tensor([0, 1, 1]), torch.tensor([2, 0])]
    full_grads = []
    for ids in batches:
        lookup = s.lookup(ids)
        grad = torch.randn(len(ids), 2, generator=gen)
        s.apply_gradients(lookup, [grad, None, None])
        dense = torch.zeros(6, 2).index_add_(0, ids, grad)
        full_grads.append(dense)
    slots = s.slot_of[:6].long()
    got = s.tables[0][slots]
    reference_rows = start[slots]
    after_step1_row1 = _adam_reference(reference_rows[1:2], [full_grads[0][1:2]], 0.01)
    if mode == "dense":
        expected = _adam_reference(reference_rows, full_grads, 0.01)
        assert torch.allclose(got, expected, atol=1e-6)
        # Row 1 had no gradient at step 2 but still moves on its momentum under dense Adam.
        assert not torch.allclose(got[1:2], after_step1_row1, atol=1e-6)
    else:
        assert torch.allclose(got[1:2], after_step1_row1, atol=1e-6)  # lazy: step 2 left it alone
        # Rows 0 and 1 saw gradients in batch 1, rows 0 and 2 in batch 2; 3-5 never: unchanged.
        assert torch.equal(got[3:], reference_rows[3:])
        # Row 0 was touched at both steps: exactly Adam's two steps.
        row0 = _adam_reference(reference_rows[0:1], [g[0:1] for g in full_grads], 0.01)
        assert torch.allclose(got[0:1], row0, atol=1e-6)
        # Row 2 only at step 2, with step-2 bias correction and fresh moments.
        m = 0.1 * full_grads[1][2]
        v = 0.001 * full_grads[1][2] ** 2
        expected2 = reference_rows[2] - 0.01 / (1 - 0.9**2) * m / ((v / (1 - 0.999**2)).sqrt() + 1e-8)
        assert torch.allclose(got[2], expected2, atol=1e-6)


def test_a_reused_slot_starts_with_fresh_adam_moments() -> None:
    s = store(n=10, lr=0.01)
    s.ensure(torch.tensor([0]))
    lookup = s.lookup(torch.tensor([0]))
    s.apply_gradients(lookup, [torch.ones(1, 2), None, None])
    slot = int(s.slot_of[0])
    assert s.exp_avg[0][slot].abs().sum() > 0
    move_up(s, [0])
    s.ensure(torch.tensor([1]))
    assert int(s.slot_of[1]) == slot
    assert s.exp_avg[0][slot].abs().sum() == 0 and s.exp_avg_sq[0][slot].abs().sum() == 0


def test_a_distinct_lookup_groups_each_entity_once_and_rows_gather_their_entry() -> None:
    s = store(n=12)
    s.ensure(torch.arange(8))
    move_up(s, [2, 5])
    move_up(s, [5])
    ids = torch.tensor([5, 2, 7, 5, 11, 2, 2, 0])  # 11 never stored
    rows, distinct = s.lookup(ids), s.lookup(ids, distinct=True)
    assert rows.counts == [3, 3, 2] and distinct.counts == [3, 1, 1]
    assert distinct.entry_ids.tolist() == [0, 7, 11, 2, 5]  # by size, then id
    assert not distinct.all_stored and rows.row_of_entry is not None and distinct.row_of_entry is None
    for lookup in (rows, distinct):
        for r in range(len(ids)):
            entry = int(lookup.entry_of_row[r])
            assert int(lookup.entry_ids[entry]) == int(ids[r]) and int(lookup.entry_size[entry]) == int(lookup.size_index[r])
            assert torch.equal(lookup.row_value(r), rows.row_value(r))


@pytest.mark.parametrize("mode", ["lazy", "dense"])
def test_adam_from_a_distinct_lookup_equals_adam_from_the_rows(mode: str) -> None:
    """Duplicated rows share one entry in a distinct lookup: the gradients autograd sums there give the same
    Adam step as coalescing the rows' gradients (the sparse-gradient semantics)."""
    ids = torch.tensor([3, 1, 3, 4, 1, 3])
    grads = torch.randn(len(ids), 4, generator=torch.Generator().manual_seed(0))
    results = []
    for distinct in (False, True):
        s = store(n=6, mode=mode, lr=0.01)
        s.ensure(torch.arange(6))
        move_up(s, [3, 4])
        lookup = s.lookup(ids, distinct=distinct)
        values = [v.clone().requires_grad_(True) for v in lookup.values]
        unified = torch.cat([torch.nn.functional.pad(v, (0, 4 - v.shape[1])) for v in values])
        rows = unified.index_select(0, lookup.entry_of_row)
        (rows * grads).sum().backward()  # d/d(row value) = grads; entries collect their rows' sums
        s.apply_gradients(lookup, [v.grad for v in values])
        results.append([t.clone() for t in s.tables])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-7)


def test_move_up_from_a_lookup_equals_move() -> None:
    stores = [store(n=12), store(n=12)]
    for s in stores:
        s.ensure(torch.arange(10))
        move_up(s, [1, 2, 3])
    ids = torch.tensor([7, 2, 9, 3])
    a, b = stores
    lookup = a.lookup(ids, distinct=True)
    values = [None] + [torch.full((c, d), float(k + 1)) for k, (c, d) in enumerate(zip(lookup.counts[:-1], SIZES[1:]))]
    a.move_up(lookup, values)
    b.move(lookup.entry_ids, values, lookup.entry_size + 1)
    for k, v in a.state_tensors().items():
        assert torch.equal(v, b.state_tensors()[k]), k
    assert a.size_of[[7, 2, 9, 3]].tolist() == [1, 2, 1, 2]
    with pytest.raises(ValueError):
        a.move_up(a.lookup(ids), values)  # a row lookup


@pytest.mark.parametrize("fused", [True, False])
def test_flat_adam_equals_torch_adam_with_zeroed_gradients(fused: bool) -> None:
    """FlatAdam (one flat buffer per quantity) steps like torch.optim.Adam with ``zero_grad(set_to_none=False)``:
    gradients land in the flat buffer, a parameter that gets no gradient in a step moves on its momentum, and a
    gradient someone replaced is taken over."""
    from autorecbench.train.optim import FlatAdam

    def net() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2), torch.nn.Linear(2, 2))

    mine, theirs = net(), net()
    flat = FlatAdam(mine.parameters(), lr=1e-2)
    flat._fused = fused
    ref = torch.optim.Adam(theirs.parameters(), lr=1e-2, fused=True)
    x = torch.randn(11, 5, generator=torch.Generator().manual_seed(1))
    for step in range(6):
        for model, opt in ((mine, flat), (theirs, ref)):
            opt.zero_grad(set_to_none=False)
            out = model[2](model[1](model[0](x)))
            if step < 3:
                out = model[3](out)  # from step 3 on, model[3] gets no gradient
            (out ** 2).sum().backward()
            if step == 4 and model is mine:
                model[0].bias.grad = model[0].bias.grad.clone()  # replaced: FlatAdam copies it back in
            opt.step()
        if step == 0:
            assert torch.equal(flat.grad[: mine[0].weight.numel()], mine[0].weight.grad.reshape(-1))
        for a, b in zip(mine.parameters(), theirs.parameters()):
            assert torch.allclose(a, b, atol=1e-6), step
        assert torch.allclose(flat.state[mine[0].weight]["exp_avg"], ref.state[theirs[0].weight]["exp_avg"])
    moved = mine[3].weight.detach().clone()
    flat.zero_grad()
    flat.step()
    assert not torch.equal(mine[3].weight, moved)  # no gradient, still moving on its momentum
    assert mine[0].weight.data_ptr() == flat.flat.data_ptr()


def test_flat_adam_falls_back_when_the_fused_kernel_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from autorecbench.train.optim import FlatAdam

    def missing(*args, **kwargs):
        raise NotImplementedError("no fused Adam kernel for this device")

    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    fused, plain = FlatAdam(a.parameters(), 1e-2), FlatAdam(b.parameters(), 1e-2)
    plain._fused = False
    monkeypatch.setattr(torch, "_fused_adam_", missing)
    x = torch.randn(4, 3)
    for _ in range(2):
        for opt, layer in ((fused, a), (plain, b)):
            opt.zero_grad()
            layer(x).sum().backward()
            opt.step()
    assert not fused._fused and torch.allclose(a.weight, b.weight) and not torch.equal(a.weight, torch.zeros(2, 3))


@pytest.mark.parametrize("mode", ["lazy", "dense"])
def test_the_static_store_equals_the_default_store_step_by_step(mode: str) -> None:
    """StaticMixedDimEmbedding (per-row masked reads/writes, device free lists, growth only in make_room) against
    MixedDimEmbedding over the same random batches: stores, enlargements with given values, Adam steps; every
    entity's size and value agree, slots never collide, the sink stays zero, and the device is read rarely."""
    from autorecbench.data.stream import batch_groups
    from autorecbench.models.embedding import StaticMixedDimEmbedding

    gen = torch.Generator().manual_seed(0)
    n, rows, rounds = 40, 12, 30
    options = {"init_std": 1.0, "seed": 0, "stream": 0, "device": CPU, "min_capacity": 2, "growth": 2.0,
               "mode": mode, "lr": 0.01}
    default = MixedDimEmbedding(n, SIZES, **options)
    static = StaticMixedDimEmbedding(n, SIZES, headroom=5, **options)
    for _ in range(rounds):
        ids = torch.randint(0, n, (rows,), generator=gen)
        groups = batch_groups(ids)
        static.make_room(rows)
        shapes = [t.shape for t in static.tables]
        default.ensure(ids)
        static.ensure_rows(ids, groups)
        says = torch.rand(rows, generator=gen) < 0.3
        lookup = static.rows(ids)
        moves = (groups.per_group_sum(says.long()) > 0) & (lookup.size_index < len(SIZES) - 1)
        new_values = [torch.randn(rows, SIZES[k + 1], generator=gen) for k in range(len(SIZES) - 1)]
        moving = torch.unique(ids[moves])
        if moving.numel():  # the default store gets each moving entity's value from its first row
            first = [int((ids == i).nonzero()[0]) for i in moving.tolist()]
            target = default.size_index(moving) + 1
            values = [None] + [torch.stack([new_values[int(t) - 1][r] for r, t in zip(first, target) if t == k])
                               if bool((target == k).any()) else None for k in range(1, len(SIZES))]
            default.move(moving, values, target)
        static.move_rows_up(ids, groups, lookup, moves, new_values)
        grads = torch.randn(rows, SIZES[-1], generator=gen)
        distinct = default.lookup(ids, distinct=True)
        per_entry = torch.zeros(len(distinct.entry_ids), SIZES[-1]).index_add_(0, distinct.entry_of_row, grads)
        default.apply_gradients(distinct, [per_entry[distinct.group(k), : SIZES[k]] for k in range(len(SIZES))])
        after = static.rows(ids)
        static.step_rows(groups, after, [torch.where((after.size_index == k)[:, None], grads[:, : SIZES[k]], 0.0)
                                         for k in range(len(SIZES))])
        assert [t.shape for t in static.tables] == shapes  # a step never grows a table
    everyone = torch.arange(n)
    assert torch.equal(default.size_of, static.size_of) and default.counts() == static.counts()
    stored = everyone[default.size_of >= 0]
    expected, got = default.lookup(stored), static.rows(stored)
    for k in range(len(SIZES)):
        mine = got.values[k][got.size_index == k]
        assert torch.allclose(expected.values[k], mine, atol=1e-6), k
    high_water = static.high_water_t.tolist()
    for k in range(len(SIZES)):
        live = static.slot_of[static.size_of == k].long()
        free = static.free[k][1: int(static.n_free_t[k]) + 1]
        handed_out = sorted(live.tolist() + free.tolist())
        assert handed_out == list(range(1, high_water[k]))  # every slot either live or free, never both
        assert not bool(static.tables[k][0].any()) and not bool(static.moments[k][0].any())  # the sink
    assert 0 < static.device_reads <= rounds // 5 + 1  # at most one read per `headroom` steps
