"""AutoLoss: Algorithm 1's schedule (controller only on validation steps, every f DRS steps), per-example loss
probabilities, the temperature, every baseline selectable, binary and 5-class tasks, bad options."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from autorecbench.config import compose, validate
from autorecbench.data.offline import OfflineBatch
from autorecbench.errors import UserError
from autorecbench.train.losses import candidate_losses
from autorecbench.methods.autoloss import VARIANTS, AutoLoss, GlobalWeights, LossController, controller_features
from autorecbench.methods.base import method_class
from autorecbench.runners.offline import TrainLoop
from conftest import one_line_error, run_cli
from offline_helpers import Setup, setup

TINY = ["data=synthetic-criteo", "method=autoloss", "data.generator.rows=4000", "data.generator.n_fields=6",
        "data.generator.n_informative=3", "data.generator.n_pairs=1", "data.generator.cardinality_max=20",
        "runner.batch_size=200", "runner.epochs=2"]
MOVIELENS = ["data=synthetic", "method=autoloss", "model=ipnn", "data.generator.n_users=150",
             "data.generator.n_items=80", "data.generator.n_interactions=4000", "runner.batch_size=200",
             "runner.epochs=2"]


def _built(root: Path, *extra: str, **kwargs: object) -> tuple[Setup, AutoLoss, TrainLoop]:
    s = setup(root, [*TINY, *extra], **kwargs)  # type: ignore[arg-type]
    method = s.method
    assert isinstance(method, AutoLoss)
    method.build(None)
    return s, method, s.loop()


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_controller_changes_only_on_validation_steps(tmp_path: Path) -> None:
    s, method, loop = _built(tmp_path)
    controller, model = method.weigher, method.module()
    assert isinstance(controller, LossController)
    drawn: list[int] = []
    draw = loop.valid_batch
    loop.valid_batch = lambda: (drawn.append(loop.step), draw())[1]  # type: ignore[method-assign]
    loop.stage, loop.step = "fit", 0
    for batch in s.data.train.batches(200, torch.Generator().manual_seed(0)):
        ctrl, drs = _snapshot(controller), _snapshot(model)
        method.train_step(batch, loop)
        ctrl_changed = _changed(ctrl, controller)
        if loop.step % 7 == 0:  # f = 7: a validation batch, one controller update (weights and BN stats)
            assert drawn[-1] == loop.step and {k for k in ctrl_changed if "running" not in k}
        else:  # DRS-only steps: nothing of the controller moves, not even batch-norm statistics
            assert ctrl_changed == set() and drawn[-1:] != [loop.step]
        assert any(k.endswith("weight") for k in _changed(drs, model))  # the DRS learns every step
        loop.step += 1
    assert drawn == list(range(0, loop.step, 7)) and method.controller_steps == len(drawn)
    assert [row["step"] for row in method.history] == drawn
    assert [row["tau"] for row in method.history] == pytest.approx([max(0.01, 1 - 5e-5 * t) for t in drawn])


def test_temperature_follows_the_schedule(tmp_path: Path) -> None:
    s, method, loop = _built(tmp_path, "method.tau_decay=0.01", "method.update_every=1")
    loop.stage, loop.step = "fit", 0
    for step, batch in enumerate(s.data.train.batches(200, torch.Generator().manual_seed(0))):
        loop.step = step
        method.train_step(batch, loop)
    taus = [row["tau"] for row in method.history]
    assert taus == pytest.approx([max(0.01, 1 - 0.01 * t) for t in range(len(taus))]) and len(taus) == 16
    assert method.schedule(99) == pytest.approx(0.01) and method.schedule(50) == pytest.approx(0.5)


def test_per_example_probabilities_vary(tmp_path: Path) -> None:
    s = setup(tmp_path, TINY)
    out = s.run()
    method = s.method
    assert isinstance(method, AutoLoss) and out.headline["auc"] > 0.55
    batch = s.data.valid.rows(slice(0, 400))
    model, controller = method.module(), method.weigher
    model.eval()
    controller.eval()
    with torch.no_grad():
        logits = model(batch.x)
        alpha = controller(controller_features(s.data.task, logits, batch.label)).exp()
    assert torch.allclose(alpha.sum(1), torch.ones(400))
    assert (alpha.std(0) > 1e-3).all()  # per example, not one vector for the batch
    clicked, not_clicked = alpha[batch.label == 1].mean(0), alpha[batch.label == 0].mean(0)
    assert (clicked - not_clicked).abs().max() > 1e-3  # depends on (y, ŷ)
    p = method.loss_weights(logits, batch.label, tau=1.0)
    assert torch.equal(p.sum(1), torch.ones(400)) and set(p.unique().tolist()) == {0.0, 1.0}  # hard choices
    assert len(p.argmax(1).unique()) > 1  # different losses for different examples
    rows = method.reports()["loss_weights"]
    assert rows and all(row[f"alpha_std_{n}"] > 0 for row in rows[1:] for n in method.names)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_baseline_runs_through_the_same_code(tmp_path: Path, variant: str) -> None:
    s = setup(tmp_path, [*TINY, f"method.variant={variant}", "runner.epochs=1"])
    out = s.run()
    method = s.method
    assert isinstance(method, AutoLoss) and 0.4 < out.headline["auc"] <= 1
    batch = s.data.valid.rows(slice(0, 50))
    with torch.no_grad():
        logits = method.module()(batch.x)
        p = method.loss_weights(logits, batch.label, tau=0.5)
    arch = method.architecture()
    if variant in ("focal", "kl", "hinge", "ce"):  # one fixed loss
        assert method.names == (variant,) and torch.equal(p, torch.ones(50, 1)) and method.weigher is None
    elif variant == "al1":  # equal weights, no controller
        assert torch.equal(p, torch.full((50, 4), 0.25)) and method.weigher is None
    elif variant == "darts":  # one learned α for every example, no Gumbel
        assert isinstance(method.weigher, GlobalWeights) and torch.allclose(p, p[:1].expand(50, -1))
        assert sum(arch["alpha"].values()) == pytest.approx(1) and arch["alpha"] != dict.fromkeys(method.names, 0.25)
    elif variant == "al2":  # the controller's α, no Gumbel: soft, per example
        assert isinstance(method.weigher, LossController) and not set(p.unique().tolist()) <= {0.0, 1.0}
    else:
        assert set(p.unique().tolist()) == {0.0, 1.0}
    assert arch["controller_steps"] == (len(range(0, 16, 7)) if variant in ("autoloss", "al2", "darts") else 0)


def test_fixed_ce_equals_the_logloss(tmp_path: Path) -> None:
    s, method, loop = _built(tmp_path, "method.variant=ce")
    batch = s.data.valid.rows(slice(0, 100))
    logits = method.module()(batch.x)
    weighted = method._weighted_loss(logits, batch.label, method.loss_weights(logits, batch.label, 1.0))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], batch.label)
    assert weighted.item() == pytest.approx(bce.item(), rel=1e-6)
    assert candidate_losses(s.data.task, logits, batch.label, ["ce"]).shape == (100, 1)


def test_five_classes_on_movielens_with_ipnn(tmp_path: Path) -> None:
    s = setup(tmp_path, MOVIELENS, task="multiclass")
    out = s.run()
    method = s.method
    assert isinstance(method, AutoLoss) and {"auc", "ce"} <= set(out.headline)
    assert out.headline["auc"] > 0.55
    controller = method.weigher
    assert isinstance(controller, LossController) and controller.mlp.net[0].in_features == 10  # one-hot y, 5 probs
    assert method.history and method.history[-1]["alpha_std_hinge"] > 0


def test_autoloss_is_reproducible(tmp_path: Path) -> None:
    first = setup(tmp_path, [*TINY, "runner.epochs=1"]).run()
    second = setup(tmp_path, [*TINY, "runner.epochs=1"]).run()
    assert first.headline == second.headline


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(["method.variant=mse"], "method.variant must be one of"),
     (["method.losses=[ce]"], "needs at least two candidate losses"),
     (["method.losses=[ce,mae]"], "unknown or no candidate losses"),
     (["method.update_every=0"], "method.update_every must be >= 1"),
     (["method.controller_dropout=1"], "controller_dropout")],
)
def test_bad_autoloss_options_are_user_errors(args: list[str], fragment: str) -> None:
    with pytest.raises(UserError, match=fragment.replace(".", r"\.")):
        validate(compose(["data=synthetic-criteo", "method=autoloss", *args]))


def test_autoloss_cli_errors_exit_2(home: Path) -> None:
    line = one_line_error(run_cli("run", "data=synthetic-criteo", "method=autoloss", "method.variant=mse", home=home))
    assert "method.variant must be one of autoloss, al1, al2, darts, focal, kl, hinge, ce" in line
    line = one_line_error(run_cli("run", "method=autoloss", home=home))
    assert "has no streaming version" in line
    assert method_class("autoloss", "offline") is AutoLoss


# ---------------------------------------------------------------- Eq. 13: the one-step unrolled DRS

def _one_controller_step(root: Path, *extra: str) -> tuple[AutoLoss, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A fresh method, one Algorithm-1 iteration (controller on a validation batch, then the DRS); the
    controller's and the DRS's state after the controller step, before the DRS step."""
    s, method, loop = _built(root, *extra)
    loop.stage, loop.step = "fit", 0
    batch = next(s.data.train.batches(200, torch.Generator().manual_seed(0)))
    drs = _snapshot(method.module())
    drs_optimizer = [dict(o.state) for o in method.optimizer.optimizers]
    method._controller_step(loop.valid_batch(), batch, 0, loop)
    assert _changed(drs, method.module()) == set()  # the virtual step writes nothing: W and BN statistics stay
    assert [dict(o.state) for o in method.optimizer.optimizers] == drs_optimizer
    return method, _snapshot(method.weigher), drs


def test_a_second_order_step_moves_the_controller_differently(tmp_path: Path) -> None:
    first, after_first, _ = _one_controller_step(tmp_path, "method.xi=0")
    second, after_second, _ = _one_controller_step(tmp_path, "method.xi=0.01")
    again, after_again, _ = _one_controller_step(tmp_path, "method.xi=0.01")
    assert {k for k in after_first if not torch.equal(after_first[k], after_second[k]) and "weight" in k}
    assert all(torch.equal(after_second[k], after_again[k]) for k in after_second)  # same seed, same step
    assert second.controller_steps == first.controller_steps == 1


def _unrolled_validation_ce(method: AutoLoss, train: OfflineBatch, valid: OfflineBatch, logits_v: torch.Tensor,
                            xi: float) -> torch.Tensor:
    """Brute force: W* = W - ξ ∇_W L_train(W, V) on a deep copy of the DRS, then the validation CE under W*."""
    model = copy.deepcopy(method.module())
    statistics = copy.deepcopy(dict(model.named_buffers()))
    weights = torch.softmax(logits_v, 0)
    model.train()
    out = model(train.x)
    losses = candidate_losses(method.ctx.task, out, train.label, method.names, method.options)
    grads = torch.autograd.grad((losses * weights).sum(1).mean(), list(model.parameters()))
    with torch.no_grad():
        for name, buffer in model.named_buffers():  # the virtual step leaves the running statistics as they were
            buffer.copy_(statistics[name])
        for w, g in zip(model.parameters(), grads):
            w -= xi * g
    model.eval()
    with torch.no_grad():
        return torch.nn.functional.binary_cross_entropy_with_logits(model(valid.x)[:, 0], valid.label)


def test_second_order_gradient_matches_finite_differences(tmp_path: Path) -> None:
    """DARTS' global weights (deterministic: no Gumbel draw), no dropout, float64: the controller's gradient of the
    validation CE through Eq. 13 against central differences of the brute-force unrolled loss."""
    s, method, loop = _built(tmp_path, "method.variant=darts", "method.val_objective=ce", "method.xi=0.5",
                             "model.dropout=0")
    method.module().double()
    method.weigher.double()
    batches = s.data.train.batches(200, torch.Generator().manual_seed(0))
    train, valid = next(batches), next(batches)
    train.label, valid.label = train.label.double(), valid.label.double()
    captured: dict[str, torch.Tensor] = {}
    method.weigher_optimizer.step = lambda: captured.update(g=method.weigher.logits.grad.clone())  # type: ignore[method-assign]
    method._controller_step(valid, train, 0, loop)
    v = method.weigher.logits.detach().clone()
    h = 1e-5
    numeric = torch.zeros_like(v)
    for i in range(len(v)):
        step = torch.zeros_like(v)
        step[i] = h
        numeric[i] = (_unrolled_validation_ce(method, train, valid, v + step, 0.5)
                      - _unrolled_validation_ce(method, train, valid, v - step, 0.5)) / (2 * h)
    assert numeric.abs().max() > 1e-6  # the validation CE really depends on V through W*
    assert torch.allclose(captured["g"], numeric, rtol=1e-4, atol=1e-9)


def test_first_order_ce_objective_is_rejected() -> None:
    with pytest.raises(UserError, match="val_objective=ce needs method.xi > 0"):
        validate(compose(["data=synthetic-criteo", "method=autoloss", "method.val_objective=ce", "method.xi=0"]))
    for bad in (["method.xi=-1"], ["method.val_objective=auc"], ["method.kl_smoothing=1"]):
        with pytest.raises(UserError):
            validate(compose(["data=synthetic-criteo", "method=autoloss", *bad]))
