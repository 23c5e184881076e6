"""ESAPN's parts: reward queue (Eq. 2), enlargement through W (Eq. 1), temporary adjustments, REINFORCE."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from autorecbench.config import compose
from autorecbench.data.schema import TaskSpec
from autorecbench.data.stream import StreamHistory, load_stream, within_batch_rank
from autorecbench.methods.base import MethodContext, method_class
from autorecbench.methods.esapn import ENLARGE, LossQueue, PolicyStates, adjusted_unified
from autorecbench.methods.sizesearch import last_rows
from conftest import make_streaming_method, prepare_synthetic

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    return prepare_synthetic(tmp_path_factory.mktemp("esapn"), n_users=120, n_items=90, n_interactions=4000)


def make(prepared, name: str = "esapn", task: str = "binary", seed: int = 0, **overrides):
    return make_streaming_method(prepared, name, TaskSpec.from_name(task), seed, **overrides)


def warm(method, prepared, n_batches: int, task: str = "binary"):
    """A method trained on the first batches of the stream; returns it with the stream and history."""
    stream = load_stream(prepared, TaskSpec.from_name(task), CPU)
    history = StreamHistory(stream)
    for b, (start, end) in enumerate(stream.batch_bounds(250)[:n_batches]):
        batch = stream.rows(slice(start, end), b)
        method.learn(batch, history)
        history.advance(batch)
    return stream, history


def test_within_batch_rank_and_last_rows() -> None:
    ids = torch.tensor([5, 2, 5, 5, 9, 2])
    rank, count = within_batch_rank(ids)
    assert rank.tolist() == [0, 0, 1, 2, 0, 1]
    assert count.tolist() == [3, 2, 3, 3, 1, 2]
    assert last_rows(ids).tolist() == [False, False, False, True, True, True]


def test_reward_queue_keeps_the_last_t_losses_of_each_entity() -> None:
    """Against a deque per entity, with repeated entities in a batch and wrap-around."""
    gen = torch.Generator().manual_seed(0)
    n, window = 7, 3
    queue = LossQueue(n, window, CPU)
    reference = {i: deque(maxlen=window) for i in range(n)}
    for _ in range(40):
        ids = torch.randint(0, n, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen)
        losses = torch.rand(ids.numel(), generator=gen)
        queue.push(ids, losses)
        for i, loss in zip(ids.tolist(), losses.tolist()):
            reference[i].append(loss)
        mean, have = queue.mean(torch.arange(n))
        for i in range(n):
            assert int(have[i]) == len(reference[i])
            expected = sum(reference[i]) / len(reference[i]) if reference[i] else 0.0
            assert abs(float(mean[i]) - expected) < 1e-6
    # More than T losses of one entity in one batch: only the last T count.
    q = LossQueue(2, 3, CPU)
    q.push(torch.tensor([1, 1, 1, 1, 1]), torch.tensor([9.0, 9.0, 1.0, 2.0, 3.0]))
    assert q.mean(torch.tensor([1]))[0].item() == pytest.approx(2.0)


def test_enlargement_initialises_through_w_not_at_random(prepared) -> None:
    method = make(prepared)
    warm(method, prepared, 2)
    store, maps = method.stores["user"], method.maps["user"]
    ids = torch.nonzero((store.size_of >= 0) & (store.size_of < len(method.sizes) - 1)).squeeze(1)[:6]
    assert ids.numel() >= 2
    before = store.lookup(ids)
    unified_before = maps(before)
    k = store.size_index(ids)
    method.enlarge("user", ids)
    after = store.lookup(ids)
    assert torch.equal(store.size_index(ids), k + 1)
    for j in range(len(method.sizes) - 1):
        rows = (k == j).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        new = torch.stack([after.row_value(int(r)) for r in rows])
        old = torch.stack([before.row_value(int(r)) for r in rows])
        with torch.no_grad():
            assert torch.allclose(new, maps.step(j, old))  # e_{k+1} = W e_k + b
        assert not torch.allclose(new, store.initial_values(ids[rows], j + 1))  # not a fresh random draw
    with torch.no_grad():  # Eq. 1 chained: the unified embedding is unchanged by the enlargement
        assert torch.allclose(maps(after), unified_before, atol=1e-5)


def test_temporary_adjustments_in_the_policy_step_leave_no_trace(prepared) -> None:
    method = make(prepared, validation="history")
    stream, history = warm(method, prepared, 4)
    model_state = {k: v.clone() for k, v in method.model.state_dict().items()}
    maps_state = {k: v.clone() for k, v in method.maps.state_dict().items()}
    stores = {f: {k: v.clone() for k, v in s.state_tensors().items()} for f, s in method.stores.items()}
    queues = {f: (q.losses.clone(), q.count.clone()) for f, q in method.queues.items()}
    policy_before = [p.clone() for p in method.policies.parameters()]
    method.uniform = lambda n: torch.zeros(n)  # sample "enlarge" wherever allowed: every row adjusts
    valid = history.sample(250, torch.Generator().manual_seed(1))
    method.policy_step(valid)
    assert any(not torch.equal(a, b) for a, b in zip(policy_before, method.policies.parameters()))
    for k, v in method.model.state_dict().items():
        assert torch.equal(v, model_state[k]), k
    for k, v in method.maps.state_dict().items():
        assert torch.equal(v, maps_state[k]), k
    for f, s in method.stores.items():
        for k, v in s.state_tensors().items():
            assert torch.equal(v, stores[f][k]), (f, k)
    for f, q in method.queues.items():
        assert torch.equal(q.losses, queues[f][0]) and torch.equal(q.count, queues[f][1])


def test_adjusted_rows_use_the_enlarged_embedding_through_w(prepared) -> None:
    """Line 4: a row whose action is "enlarge" is computed from W_{k->k+1} e + b mapped up from k+1; others from
    e. Duplicated entities may take different actions on different rows; rows at the top size cannot enlarge."""
    method = make(prepared)
    warm(method, prepared, 2)
    store, maps = method.stores["item"], method.maps["item"]
    top = len(method.sizes) - 1
    below = torch.nonzero((store.size_of >= 0) & (store.size_of < top)).squeeze(1)[:6]
    store.move(below[:1], [None] * top + [torch.zeros(1, method.sizes[top])], torch.tensor([top]))  # one at the top
    ids = torch.cat([below, below[:3]])
    enlarge = torch.arange(ids.numel()) % 2 == 0
    lookup = store.lookup(ids, distinct=True)
    with torch.no_grad():
        got = adjusted_unified(lookup, enlarge, maps)
        for r in range(ids.numel()):
            k = int(lookup.size_index[r])
            e = lookup.row_value(r)[None]
            if enlarge[r] and k < top:
                values = [v[:0] for v in lookup.values]
                values[k + 1] = maps.step(k, e)
            else:
                values = [v[:0] for v in lookup.values]
                values[k] = e
            assert torch.allclose(got[r], maps.unified(values)[0], atol=1e-6), r
        assert torch.allclose(got, maps(lookup), atol=1e-5)  # Eq. 1 chained: the same unified embeddings


@pytest.mark.parametrize("batch_norm", ["batch", "running"])
@pytest.mark.parametrize("training", [True, False])
def test_policy_per_distinct_state_equals_the_policy_per_row(prepared, batch_norm: str, training: bool) -> None:
    """The policy runs once per distinct (frequency, size) state, its batch-norms weighing states by their
    row counts: every row's logits, the parameter gradients of a per-row loss and the running statistics equal
    those of the per-row network (the official code's way)."""
    one, two = (make(prepared, model_overrides={"batch_norm": batch_norm}) for _ in range(2))
    stream, history = warm(one, prepared, 3)
    warm(two, prepared, 3)
    batch = history.last_batch()
    for field in ("user", "item"):
        ids, freq = one._ids(batch, field)
        size = one.stores[field].size_index(ids)
        states = PolicyStates.of(one.policies[field], freq, size, len(one.sizes))
        assert len(states.counts) < len(ids) and int(states.counts.sum()) == len(ids)
        per_state = states.logits(one.policies[field].train(training))
        per_row = two.policies[field].train(training)(freq, torch.nn.functional.one_hot(size, 6).float())
        assert torch.allclose(per_state.index_select(0, states.inverse), per_row, atol=1e-5)
        weights = torch.linspace(-1, 1, len(ids))[:, None]
        (per_state.index_select(0, states.inverse) * weights).sum().backward()
        (per_row * weights).sum().backward()
        for a, b in zip(one.policies[field].parameters(), two.policies[field].parameters()):
            assert torch.allclose(a.grad, b.grad, atol=1e-4, rtol=1e-4)
        for a, b in zip(one.policies[field].buffers(), two.policies[field].buffers()):
            assert torch.allclose(a.float(), b.float(), atol=1e-5)


@pytest.mark.parametrize("batch_norm", ["batch", "running"])
def test_rating_model_on_some_rows_equals_those_rows_of_the_full_batch(batch_norm: str) -> None:
    """The reward pass (line 5) runs the rating model's layers after batch-norm on the rows that took a decision
    only; batch-norm statistics still come from every row."""
    from autorecbench.models.rating import RatingMLP

    torch.manual_seed(0)
    model = RatingMLP(2, 16, 5, hidden=(32,), batch_norm=batch_norm)
    fields = [torch.randn(40, 16) * 3 + 1, torch.randn(40, 16)]
    rows = torch.tensor([3, 0, 17, 39, 22])
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            full = model(fields)
            assert torch.allclose(model(fields, rows=rows), full[rows], atol=1e-6)
            if training or batch_norm == "batch":  # statistics of the 5 rows alone would differ
                assert not torch.allclose(model([f[rows] for f in fields]), full[rows], atol=1e-3)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_reinforce_moves_the_policy_towards_rewarded_actions(prepared, sign: float) -> None:
    """Positive reward for the sampled action ("enlarge" everywhere) raises π(enlarge|s); negative lowers it.

    Plain SGD replaces Adam here so that the step follows the REINFORCE gradient itself (Adam's first step
    is sign-like and can overshoot)."""
    method = make(prepared)
    stream, history = warm(method, prepared, 3)
    method.policy_optimizer = torch.optim.SGD(method.policies.parameters(), lr=1e-3)
    valid = history.last_batch()
    for field, queue in method.queues.items():
        # Eq. 2: R = mean(past losses) - L. Past losses of 5 (MSE <= 1) make R > 0; of 0 make R < 0.
        queue.losses.fill_(5.0 if sign > 0 else 0.0)
    method.uniform = lambda n: torch.zeros(n)

    def log_p_enlarge(field: str) -> torch.Tensor:
        ids, freq = method._ids(valid, field)
        size = method.stores[field].size_index(ids)
        policy = method.policies[field].eval()
        with torch.no_grad():
            one_hot = torch.nn.functional.one_hot(size, len(method.sizes)).float()
            probs = torch.softmax(policy(freq, one_hot), dim=1)[:, ENLARGE]
        return probs[size < len(method.sizes) - 1]

    before = {f: log_p_enlarge(f) for f in ("user", "item")}
    method.policy_step(valid)
    for f in ("user", "item"):
        change = (log_p_enlarge(f) - before[f]).mean()
        assert change * sign > 0, (f, float(change))


def test_predict_changes_nothing_and_matches_the_prediction_after_enlargement(prepared) -> None:
    method = make(prepared)
    stream, history = warm(method, prepared, 3)
    batch = stream.rows(slice(750, 1000), 3)
    stores = {f: {k: v.clone() for k, v in s.state_tensors().items()} for f, s in method.stores.items()}
    with torch.no_grad():
        first = method.predict(batch)
        assert torch.equal(first, method.predict(batch))
    for f, s in method.stores.items():
        assert all(torch.equal(v, stores[f][k]) for k, v in s.state_tensors().items())
    method.select_sizes(batch)  # Algorithm 1 lines 8-9 as the official code runs them before predicting
    with torch.no_grad():
        assert torch.allclose(method.predict(batch), first, atol=1e-5)


@pytest.mark.parametrize("name", ["esapn", "darts", "autoemb"])
def test_same_seed_same_numbers(prepared, name: str) -> None:
    """Same seed, same device: identical predictions and search state; another seed differs."""

    def run(seed: int):
        method = make(prepared, name, seed=seed, validation="history")
        stream, history = warm(method, prepared, 6)
        with torch.no_grad():
            pred = method.predict(stream.rows(slice(1500, 1750), 6))
        return pred, method.reports()

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("name, overrides", [
    ("esapn", {"embedding_optimizer": "dense", "validation": "history", "validation_size": 100,
               "frequency_encoding": "log2", "short_history": "skip", "initial_size": 4}),
    ("darts", {"embedding_optimizer": "dense", "validation": "history"}),
    ("autoemb", {"embedding_optimizer": "dense", "frequency_encoding": "log2", "frequency_cap": 64}),
])
@pytest.mark.parametrize("batch_norm", ["batch", "running"])
def test_non_default_options_learn_and_predict(prepared, name: str, overrides: dict, batch_norm: str) -> None:
    cfg_overrides = [f"method={name}", *[f"method.{k}={v}" for k, v in overrides.items()],
                     f"model.batch_norm={batch_norm}", "model.loss_reduction=sum"]
    cfg = compose(cfg_overrides)
    task = TaskSpec.from_name("multiclass")
    method = method_class(name)(MethodContext(prepared.schema, task, cfg.method, cfg.model, CPU, 0))
    stream, history = warm(method, prepared, 6, task="multiclass")
    with torch.no_grad():
        probs = method.predict(stream.rows(slice(1500, 1750), 6))
    assert probs.shape == (250, 5) and torch.allclose(probs.sum(1), torch.ones(250), atol=1e-5)
    reports = method.reports()
    assert sum(r["n"] for r in reports["size_by_frequency"] if r["entity"] == "user" and r["size"] == 2) == 1500
    if name == "esapn":
        assert all(r["entities"] == 0 for r in reports["embedding_sizes"] if r["size"] == 2)  # start at 4


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_one_pass_test_then_train_predicts_what_predict_would_and_learns_the_same(prepared, task: str) -> None:
    """``predict_and_learn`` (batch-statistics batch-norm) takes the predictions from line 10's forward pass:
    they equal ``predict``'s before learning (up to rounding), and the method ends in the state ``learn`` gives."""
    one, two = make(prepared, task=task), make(prepared, task=task)
    stream, history = warm(one, prepared, 3, task=task)
    warm(two, prepared, 3, task=task)
    batch = stream.rows(slice(750, 1000), 3)
    predicted, loss = one.predict_and_learn(batch, history)
    with torch.no_grad():
        expected = two.predict(batch)
    assert torch.allclose(predicted, expected, atol=1e-5)
    assert torch.equal(loss, two.learn(batch, history))
    for a, b in zip(one.model.parameters(), two.model.parameters()):
        assert torch.equal(a, b)
    for f in ("user", "item"):
        for k, v in one.stores[f].state_tensors().items():
            assert torch.equal(v, two.stores[f].state_tensors()[k]), (f, k)
