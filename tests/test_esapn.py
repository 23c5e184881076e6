"""ESAPN's parts: reward queue (Eq. 2), enlargement through W (Eq. 1), temporary adjustments, REINFORCE."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from autorecbench.config import compose
from autorecbench.data.schema import TaskSpec
from autorecbench.data.stream import StreamHistory, load_stream, within_batch_rank
from autorecbench.methods.base import MethodContext, method_class
from autorecbench.methods.esapn import ENLARGE, LossQueue, PolicyStates
from autorecbench.methods.sizesearch import FIELDS, last_rows
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


@pytest.mark.parametrize("sink", [False, True])  # True: the static step's push (one fixed-length scatter)
def test_reward_queue_keeps_the_last_t_losses_of_each_entity(sink: bool) -> None:
    """Against a deque per entity, with repeated entities in a batch and wrap-around."""
    gen = torch.Generator().manual_seed(0)
    n, window = 7, 3
    queue = LossQueue(n, window, CPU, sink=sink)
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
    q = LossQueue(2, 3, CPU, sink=sink)
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


def test_an_enlargement_through_w_leaves_the_unified_embedding_unchanged(prepared) -> None:
    """Eq. 1 chained: W_{k->k+1} e + b mapped up from k+1 is e mapped up from k, for every size below the top.
    This is why line 4's temporary adjustment only moves a row to the next size group (its normalisation, with
    norm_scope=per_size) and does not recompute its unified embedding."""
    method = make(prepared)
    warm(method, prepared, 2)
    store, maps = method.stores["item"], method.maps["item"]
    top = len(method.sizes) - 1
    ids = torch.nonzero((store.size_of >= 0) & (store.size_of < top)).squeeze(1)[:6]
    lookup = store.lookup(ids, distinct=True)
    with torch.no_grad():
        current = maps(lookup)
        for r in range(ids.numel()):
            k = int(lookup.size_index[r])
            values = [v[:0] for v in lookup.values]
            values[k + 1] = maps.step(k, lookup.row_value(r)[None])
            assert torch.allclose(maps.unified(values)[0], current[r], atol=1e-5), r


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
    method.select_sizes(batch)  # Algorithm 1 lines 8-9 for good, as the official code runs them before predicting
    with torch.no_grad():  # the stored sizes now give what predict gave by enlarging temporarily
        fields = {f: method._rows(f, method.stores[f].lookup(method._ids(batch, f)[0], distinct=True)) for f in FIELDS}
        assert torch.allclose(torch.sigmoid(method._logits(fields)[:, 0]), first, atol=1e-5)


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
    they equal ``predict``'s between the policy step and lines 8-10 (up to rounding), and the method ends in the
    state ``learn`` gives."""
    one, two, three = make(prepared, task=task), make(prepared, task=task), make(prepared, task=task)
    stream, history = warm(one, prepared, 3, task=task)
    warm(two, prepared, 3, task=task)
    warm(three, prepared, 3, task=task)
    batch = stream.rows(slice(750, 1000), 3)
    predicted, loss = one.predict_and_learn(batch, history)
    two.shares_forward_pass = lambda: False  # predict, then learn
    expected, loss_two = two.predict_and_learn(batch, history)
    assert torch.allclose(predicted, expected, atol=1e-5)
    assert torch.equal(loss, loss_two) and torch.equal(loss, three.learn(batch, history))
    for a, b in zip(one.model.parameters(), three.model.parameters()):
        assert torch.equal(a, b)
    for f in ("user", "item"):
        for k, v in one.stores[f].state_tensors().items():
            assert torch.equal(v, three.stores[f].state_tensors()[k]), (f, k)


@pytest.mark.parametrize("affine", ["shared", "per_size"])
@pytest.mark.parametrize("batch_norm", ["batch", "running"])
def test_size_norm_equals_batch_norm_group_by_group(affine: str, batch_norm: str) -> None:
    """SizeNorm against a loop over groups of F.batch_norm (outputs, gradients, running statistics); a group of
    one row normalises to β."""
    from autorecbench.models.norm import SizeNorm

    torch.manual_seed(0)
    norm = SizeNorm(4, 8, batch_norm, affine)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = (torch.randn(30, 8) * 3 + 1).requires_grad_(True)
    group = torch.tensor([0] * 12 + [2] * 17 + [3])  # group 1 empty, group 3 a single row
    out = norm(x, group)
    upstream = torch.randn(30, 8)
    (out * upstream).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref, b_ref = norm.weight.detach().clone().requires_grad_(True), norm.bias.detach().clone().requires_grad_(True)
    ref = torch.empty(30, 8)
    parts = []
    for k in (0, 2, 3):
        rows = (group == k).nonzero().squeeze(1)
        xs = x_ref[rows]
        mean, var = xs.mean(0), xs.var(0, unbiased=False)
        w, b = (w_ref[k], b_ref[k]) if affine == "per_size" else (w_ref[0], b_ref[0])
        parts.append((rows, (xs - mean) / torch.sqrt(var + 1e-5) * w + b))
    for rows, value in parts:
        ref = ref.index_put((rows,), value)
    (ref * upstream).sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(out[-1], norm.bias[-1 if affine == "per_size" else 0].detach())
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-4)
    assert torch.allclose(norm.weight.grad, w_ref.grad, atol=1e-4)
    if batch_norm == "running":  # groups of >= 2 rows moved 10% towards their statistics; others did not
        assert torch.allclose(norm.running_mean[0], 0.1 * x[:12].mean(0).detach(), atol=1e-5)
        assert torch.allclose(norm.running_var[2], 0.9 + 0.1 * x[12:29].var(0).detach(), atol=1e-4)
        assert torch.equal(norm.running_mean[1], torch.zeros(8)) and torch.equal(norm.running_var[3], torch.ones(8))
        norm.eval()
        with torch.no_grad():
            y = norm(x, group)
        expected = (x[0] - norm.running_mean[0]) / torch.sqrt(norm.running_var[0] + 1e-5) * norm.weight[0] + norm.bias[0]
        assert torch.allclose(y[0], expected.detach(), atol=1e-5)


@pytest.mark.parametrize("batch_norm", ["batch", "running"])
def test_the_reward_depends_on_the_action_with_per_size_norm_and_not_with_selected(prepared, batch_norm: str) -> None:
    """policy_action_sensitivity (mean |L(enlarge) − L(unchange)| on validation rows): > 0 with per-size
    batch-norm, exactly 0 with one batch-norm for all sizes (Eq. 1 makes the unified embeddings equal)."""
    from autorecbench.runners.streaming import StreamingConfig, StreamingRunner

    values = {}
    for scope in ("per_size", "selected"):
        method = make(prepared, norm_scope=scope, sensitivity_every=1, model_overrides={"batch_norm": batch_norm})
        StreamingRunner(StreamingConfig(batch_size=250)).run(method, load_stream(prepared, TaskSpec.from_name("binary"), CPU, max_rows=2000))
        row, share = method.metrics()
        assert (row["split"], row["metric"], share["metric"]) == ("search", "policy_action_sensitivity",
                                                                  "policy_enlarge_share")
        assert 0.0 <= share["value"] <= 1.0
        values[scope] = row["value"]
    assert values["per_size"] > 1e-4 and values["selected"] == 0.0, values
    assert [r["metric"] for r in make(prepared, sensitivity_every=0).metrics()] == ["policy_enlarge_share"]


@pytest.mark.parametrize("sink", [False, True])
def test_reward_queue_of_the_official_code_keeps_one_loss_per_entity_per_batch(sink: bool) -> None:
    """reward_queue=batches: an entity's last row of each batch enters its FIFO, and the count is in batches."""
    gen = torch.Generator().manual_seed(1)
    queue = LossQueue(5, 3, CPU, per_batch=True, sink=sink)
    reference = {i: deque(maxlen=3) for i in range(5)}
    for _ in range(25):
        ids = torch.randint(0, 5, (8,), generator=gen)
        losses = torch.rand(8, generator=gen)
        queue.push(ids, losses)
        last = {}
        for i, loss in zip(ids.tolist(), losses.tolist()):
            last[i] = loss
        for i, loss in last.items():
            reference[i].append(loss)
        mean, have = queue.mean(torch.arange(5))
        for i in range(5):
            assert int(have[i]) == len(reference[i])
            assert float(mean[i]) == pytest.approx(sum(reference[i]) / max(len(reference[i]), 1), abs=1e-6)


def test_frequency_restart_counts_from_the_evaluation_window(prepared) -> None:
    """frequency_restart: the policy's frequency of a row in the evaluation window is its entity's occurrence
    number counted from the window's first row (slices and sampled rows alike); before it, the stream's."""
    method = make(prepared, frequency_restart=True)
    stream = load_stream(prepared, TaskSpec.from_name("binary"), CPU)
    start = 2600
    history = StreamHistory(stream, eval_start=start)
    method._start_restart(history)
    for batch in (stream.rows(slice(2500, 2750)), stream.rows(torch.tensor([5, 2700, 3999, 2599, 2600]))):
        for field, ids in (("user", stream.user), ("item", stream.item)):
            got = method._policy_frequency(batch, field)
            for r, pos in enumerate(batch.positions().tolist()):
                first = start if pos >= start else 0
                expected = int((ids[first:pos + 1] == ids[pos]).sum())
                assert int(got[r]) == expected, (field, pos)
    plain = make(prepared)
    plain._start_restart(history)
    batch = stream.rows(slice(2500, 2750))
    assert torch.equal(plain._policy_frequency(batch, "user"), batch.user_freq)


@pytest.mark.parametrize("top_size", ["skip", "unchange"])
def test_top_size_rows_enter_the_policy_loss_only_as_the_official_code_does(prepared, top_size: str) -> None:
    """With every entity at the top size no row takes a decision: ``skip`` leaves the policy as it is;
    ``unchange`` (the official code) still steps it on −R log π(unchange|s)."""
    method = make(prepared, top_size=top_size)
    stream, history = warm(method, prepared, 3)
    top = len(method.sizes) - 1
    for f, store in method.stores.items():
        stored = torch.nonzero(store.size_of >= 0).squeeze(1)
        store.move(stored, [None] * top + [torch.zeros(stored.numel(), method.sizes[top])],
                   torch.full((stored.numel(),), top))
    before = [p.clone() for p in method.policies.parameters()]
    method.policy_step(history.last_batch())
    moved = any(not torch.equal(a, b) for a, b in zip(before, method.policies.parameters()))
    assert moved == (top_size == "unchange")


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_autoemb_previous_weights_start_as_the_official_code(prepared, task: str) -> None:
    """Before an entity's first row its previous weights are [1, 0, ...] (MSE) or [1.5, 0, ...] (CE), as the
    official baseline initialises them; ``initial_previous=zeros`` starts them at 0."""
    method = make(prepared, "autoemb", task=task)
    first = 1.0 if task == "binary" else 1.5
    for table in method.previous.values():
        assert torch.equal(table[:, 0], torch.full((table.shape[0],), first)) and not table[:, 1:].any()
    assert not any(t.any() for t in make(prepared, "autoemb", task=task, initial_previous="zeros").previous.values())
