"""AMEIR: the block ops against brute force and padding, the sliced supernet against standalone children, the
880-architecture enumeration, Step 2's mutation, the SE shortcut, the joint space of the one-shot random search
(``method.search=joint``), and runs through the CLI."""

from __future__ import annotations

import json
import math
import resource
from itertools import combinations, combinations_with_replacement, product
from pathlib import Path

import polars as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autorecbench.config import compose, validate
from autorecbench.data.schema import FieldSpec, Schema, TaskSpec
from autorecbench.data.synthetic_alimama import FIRST_DESIGN_OVERRIDES
from autorecbench.errors import UserError
from autorecbench.methods.ameir import AMEIR, JointSpace, block_space, mlp_space, mlp_widths, mutate, width_pairs
from autorecbench.methods.base import MethodContext
from autorecbench.models.ameir_net import (
    BLOCK_ACTIVATIONS,
    LAYERS,
    AMEIRNet,
    BiGRU,
    Block,
    Choice,
    NetSpec,
    Pool,
    SelfAttention,
    SqueezeExcitation,
    child_spec,
)
from autorecbench.models.supernet import inherit_leading, sample_fair
from autorecbench.reproduce.ameir import NOT_IMPLEMENTED, TABLES, Cell, load_reference, table_rows
from autorecbench.reproduce.ameir import command as reproduce_command
from conftest import one_line_error, read_run, run_cli, run_folders

B, T, D = 6, 7, 6
LENGTHS = torch.tensor([7, 3, 0, 1, 5, 2])
CARDS = [5, 9, 6, 4]  # user, cate_id, brand, pid
SHARED = [1, 2]  # hist_cate -> cate_id, hist_brand -> brand


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g)
    mask = (torch.arange(T)[None] < LENGTHS[:, None])[..., None]
    return h, mask, torch.randn(B, D, generator=g)


def _randomise(module: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# ---------------------------------------------------------------- Stage 1 ops

@pytest.mark.parametrize("layer", LAYERS)
def test_every_block_op_keeps_the_shape_and_ignores_padded_positions(layer: str) -> None:
    torch.manual_seed(0)
    block = Block(D, [layer], True, NetSpec(attention_activation="relu"))
    _randomise(block)
    h, mask, target = _inputs()
    for norm, act in product(("layernorm", "none"), BLOCK_ACTIVATIONS):
        out = block(torch.where(mask, h, 0.0), mask, LENGTHS, target, (norm, layer, act))
        noisy = torch.where(mask, h, 100 * torch.randn_like(h))  # other values at padded positions
        again = block(torch.where(mask, noisy, 0.0), mask, LENGTHS, target, (norm, layer, act))
        assert out.shape == (B, T, D)
        assert torch.equal(out[~mask[..., 0]], torch.zeros_like(out[~mask[..., 0]]))
        assert torch.allclose(out, again, atol=1e-6)
        # the control: a valid position's input does move the output (the op is not the identity)
        moved = h.clone()
        moved[0, 2, 0] += 1.0  # one coordinate (LayerNorm ignores a shift of all of them)
        changed = block(torch.where(mask, moved, 0.0), mask, LENGTHS, target, (norm, layer, act))
        assert (layer == "zero") == torch.allclose(changed - moved * mask, out - h * mask, atol=1e-6)


def test_network_readout_ignores_what_padded_codes_hold() -> None:
    net = _net(_spec([("none", "conv3", "relu")] * 2, ["sum", "last", "attention"]))
    x, seq = _rows()
    other = {k: torch.where(torch.arange(T)[None] < LENGTHS[:, None], v, (v + 1) % 5) for k, v in seq.items()}
    net.eval()
    assert torch.allclose(net(x, seq, LENGTHS.to(torch.int32)), net(x, other, LENGTHS.to(torch.int32)), atol=1e-6)
    e, items = net.embed(x, seq)
    h_a = net.behaviour(e, items, LENGTHS, [])  # no blocks: sum, last, attention of the raw behaviours
    valid = (torch.arange(T)[None] < LENGTHS[:, None])[..., None]
    assert torch.allclose(h_a[:, :2 * 3], (items * valid).sum(1), atol=1e-6)
    last = torch.stack([items[b, max(int(n) - 1, 0)] * (n > 0) for b, n in enumerate(LENGTHS)])
    assert torch.allclose(h_a[:, 2 * 3:4 * 3], last, atol=1e-6)
    assert torch.equal(h_a[2], torch.zeros_like(h_a[2]))  # an empty history reads 0


def test_pooling_against_a_loop_over_valid_windows() -> None:
    h, mask, target = _inputs()
    x = torch.where(mask, h, 0.0)
    avg, mx = Pool("avg")(x, mask, LENGTHS, target), Pool("max")(x, mask, LENGTHS, target)
    for b, n in enumerate(LENGTHS.tolist()):
        for t in range(n):
            window = h[b, max(t - 1, 0):min(t + 2, n)]
            assert torch.allclose(avg[b, t], window.mean(0), atol=1e-6)
            assert torch.allclose(mx[b, t], window.max(0).values, atol=1e-6)


def test_bigru_equals_a_packed_bidirectional_gru() -> None:
    torch.manual_seed(0)
    ours = BiGRU(D)
    ref = nn.GRU(D, D // 2, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for name, p in ours.forward_gru.named_parameters():
            getattr(ref, name).copy_(p)
        for name, p in ours.backward_gru.named_parameters():
            getattr(ref, name + "_reverse").copy_(p)
    h, mask, target = _inputs()
    out = ours(torch.where(mask, h, 0.0), mask, LENGTHS, target)
    keep = LENGTHS > 0
    packed = nn.utils.rnn.pack_padded_sequence(h[keep], LENGTHS[keep], batch_first=True, enforce_sorted=False)
    expected, _ = nn.utils.rnn.pad_packed_sequence(ref(packed)[0], batch_first=True, total_length=T)
    valid = mask[keep][..., 0]
    assert torch.allclose(out[keep][valid], expected[valid], atol=1e-5)


def test_self_attention_against_a_loop_over_valid_keys() -> None:
    torch.manual_seed(0)
    attention = SelfAttention(D, 2)
    h, mask, target = _inputs()
    out = attention(torch.where(mask, h, 0.0), mask, LENGTHS, target)
    for b, n in enumerate(LENGTHS.tolist()):
        if n == 0:
            continue
        q, k, v = attention.qkv(h[b, :n]).view(n, 3, 2, 3).permute(1, 2, 0, 3)
        heads = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(3), -1) @ v  # [2, n, 3]
        assert torch.allclose(out[b, :n], attention.out(heads.transpose(0, 1).reshape(n, 6)), atol=1e-5)


def test_se_shortcut_is_the_formula() -> None:
    torch.manual_seed(0)
    se = SqueezeExcitation(5, 3, 3.0)
    q = torch.randn(4, 5, 3)
    assert se.squeeze.out_features == 2  # ceil(5 / 3)
    a = torch.sigmoid(se.excite.weight @ F.relu(se.squeeze.weight @ (q @ se.v.weight[0]).T
                                                + se.squeeze.bias[:, None]) + se.excite.bias[:, None]).T
    assert torch.allclose(se(q), (a[..., None] * q).sum(1), atol=1e-6)


# ---------------------------------------------------------------- the supernet and its children

def _spec(blocks: list[tuple[str, str, str]], readout: list[str], supernet: bool = False,
          hidden: list[int] | None = None, dice: list[list[int]] | None = None) -> NetSpec:
    hidden = hidden or [8, 5]
    return NetSpec(block_layers=[list(LAYERS) if supernet else [l] for _, l, _ in blocks],
                   block_norm=[supernet or n == "layernorm" for n, _, _ in blocks], readout=readout,
                   interactions=[(0, 3), (1, 2, 3)], interaction_mode="mlp+se", hidden=hidden,
                   dice_widths=dice or [[], []], attention_activation="relu",
                   default=Choice(tuple(blocks), tuple(hidden), ("relu", "relu")))


def _net(spec: NetSpec) -> AMEIRNet:
    torch.manual_seed(0)
    net = AMEIRNet(CARDS, SHARED, ["hist_cate", "hist_brand"], 3, 0.5, False, spec)
    _randomise(net)
    return net


def _rows(n: int = B) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    x = torch.stack([torch.randint(0, c, (n,), generator=g) for c in CARDS], 1).to(torch.int32)
    valid = torch.arange(T)[None] < LENGTHS[:n, None]
    seq = {name: torch.where(valid, torch.randint(1, CARDS[j], (n, T), generator=g), 0).to(torch.int32)
           for name, j in zip(["hist_cate", "hist_brand"], SHARED)}
    return x, seq


@pytest.mark.parametrize("training", [True, False])
def test_a_sliced_child_equals_the_standalone_network_with_copied_weights(training: bool) -> None:
    blocks = [("layernorm", "conv3", "gelu"), ("none", "bigru", "swish"), ("layernorm", "target_attention", "relu")]
    k0 = _net(_spec(blocks, ["sum", "last", "attention"])).in_dim
    widths = mlp_widths([0.3, 0.6, 1.0], k0)
    supernet = _net(_spec(blocks, ["sum", "last", "attention"], supernet=True, hidden=[k0, k0],
                          dice=[widths, widths]))
    x, seq = _rows()
    lengths = LENGTHS.to(torch.int32)
    for hidden, acts in (((widths[2], widths[1]), ("dice", "identity")), ((widths[1], widths[0]), ("swish", "dice"))):
        choice = Choice(tuple(blocks), hidden, acts)
        child = _net(child_spec(supernet.spec, choice))
        copied = inherit_leading(child, supernet.state_dict())
        assert set(dict(child.named_parameters())) <= set(copied)
        assert child.mlp[0].weight.shape == (hidden[0], k0) and child.mlp[1].weight.shape == (hidden[1], hidden[0])
        supernet.train(training)
        child.train(training)
        assert torch.allclose(supernet(x, seq, lengths, choice), child(x, seq, lengths), atol=1e-5)
        # a different width is a different function (the check can fail)
        other = Choice(tuple(blocks), (widths[0], widths[0]), acts)
        assert not torch.allclose(supernet(x, seq, lengths, other), child(x, seq, lengths), atol=1e-3)
    assert sum(p.numel() for p in child.parameters()) < sum(p.numel() for p in supernet.parameters())


def test_the_mlp_space_enumerates_exactly_880_architectures() -> None:
    ratios = [round(0.1 * i, 1) for i in range(1, 11)]
    space = mlp_space(ratios, 2, ["relu", "swish", "identity", "dice"])
    archs = list(space.enumerate())
    described = {json.dumps(space.to_json(a), sort_keys=True) for a in archs}
    brute = {(a, b, f, g) for a in ratios for b in ratios for f in range(4) for g in range(4) if b <= a}
    assert space.size() == len(archs) == len(described) == len(brute) == 880
    assert sorted(width_pairs(ratios, 2)) == sorted([[a, b] for a, b in combinations_with_replacement(ratios, 2)
                                                     for a, b in [(max(a, b), min(a, b))]])
    assert mlp_widths(ratios, 108)[:3] == [11, 22, 32] and mlp_widths([0.001], 108) == [1]
    assert block_space(3, LAYERS).size() == (2 * 12 * 4) ** 3


def test_strict_fairness_trains_every_option_once_per_step() -> None:
    space = block_space(3, LAYERS)
    drawn = sample_fair(space, "layer", torch.Generator().manual_seed(0))
    assert drawn["layer"].shape == (12, 3)
    for block in range(3):
        assert sorted(drawn["layer"][:, block].tolist()) == list(range(12))
    assert not all(torch.equal(drawn["layer"][:, 0], drawn["layer"][:, b]) for b in (1, 2))


def test_mutation_against_brute_force() -> None:
    n = 4
    first = mutate([(f,) for f in range(n)], n, "union")
    assert first == [p for p in sorted({tuple(sorted(c)) for c in product(range(n), repeat=2)}, key=lambda p: (len(p), p))
                     if len(set(p)) == 2]
    kept = [(0, 1), (2, 3)]
    children = {tuple(sorted(set(p) | {j})) for p in kept for j in range(n) if j not in p}
    assert set(mutate(kept, n, "children_only")) == children == {(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)}
    assert set(mutate(kept, n, "union")) == children | set(kept)
    assert all(len(set(p)) == len(p) for p in mutate(children, n, "union"))


def test_bad_options_are_user_errors() -> None:
    base = ["data=synthetic-alimama", "method=ameir"]
    for bad, fragment in ((["method.budget=huge"], "method.budget"), (["method.variant=D"], "method.variant"),
                          (["method.layers=[conv3,conv9]"], "method.layers"), (["method.keep=2"], "method.keep"),
                          (["method.width_ratios=[0.5,1.5]"], "width_ratios"), (["method.fairness=x"], "fairness"),
                          (["method.search=greedy"], "method.search"),
                          (["method.search=joint", "method.variant=A"], "method.variant=C"),
                          (["method.search=joint", "method.joint_max_order=1"], "joint_max_order"),
                          (["method.joint_fairness=fair"], "joint_fairness"),
                          (["method.joint_epochs=0"], "joint_epochs")):
        with pytest.raises(UserError, match=fragment):
            validate(compose([*base, *bad]))
    quick = compose([*base, "method.budget=quick"])
    assert quick.method.children == 200 and quick.method.cycles == 2 and quick.method.keep == 10
    assert compose(base).method.children == 2000 and compose(base).method.lr == 1e-5


# ---------------------------------------------------------------- the joint space (method.search=joint)

def test_the_joint_space_size_enumeration_and_sampling_are_exact() -> None:
    blocks, mlp = block_space(1, ["conv3", "zero"]), mlp_space([0.5, 1.0], 2, ["relu", "dice"])
    space = JointSpace(blocks, True, 4, 2, 3, mlp)  # 4 fields, M = 2 slots, orders 2..3
    sets = [s for r in (2, 3) for s in combinations(range(4), r)]
    block_keys = [json.dumps(blocks.to_json(a)) for a in blocks.enumerate()]
    mlp_keys = [json.dumps(mlp.to_json(a)) for a in mlp.enumerate()]
    brute = {(b, pair, m) for b in block_keys for pair in combinations(sets, 2) for m in mlp_keys}
    assert space.interaction_count() == len(sets) == 10
    assert space.size() == len(brute) == 16 * 45 * 12
    assert JointSpace(blocks, False, 4, 2, 3, mlp).size() == 45 * 12  # no histories: the blocks do not count
    assert JointSpace(blocks, True, 3, 5, 9, mlp).size() == 16 * 1 * 12  # orders capped at N; M capped at S = 4
    # sampling: M distinct sets of the space, every set pair reachable; the first slot's set drawn with
    # P = 1 / (orders × C(N, r)) (order first, then fields), which uniform-over-sets sampling would fail
    g = torch.Generator().manual_seed(0)
    draws = [space.sample_interactions(g) for _ in range(6000)]
    assert all(len(d) == 2 and d[0] != d[1] and set(d) <= set(sets) for d in draws)
    assert {frozenset(d) for d in draws} == {frozenset(p) for p in combinations(sets, 2)}
    first = [sum(d[0] == s for d in draws) for s in sets]

    def chi2(expected: list[float]) -> float:
        return sum((o - 6000 * e) ** 2 / (6000 * e) for o, e in zip(first, expected))

    assert chi2([1 / (2 * math.comb(4, len(s))) for s in sets]) < 27.9  # chi-square, 9 df, p = 0.001
    assert chi2([1 / len(sets)] * len(sets)) > 100  # the control: uniform over sets
    # strict fairness over one component: every choice once per draw, the rest uniform
    fair_blocks = space.sample(g, fair="layer")
    assert sorted(int(d.blocks["layer"][0]) for d in fair_blocks) == [0, 1]
    fair_mlp = space.sample(g, fair="activation")
    assert all(sorted(int(d.mlp["activation"][l]) for d in fair_mlp) == [0, 1] for l in range(2))
    assert len(space.sample(g, 7)) == 7


@pytest.mark.parametrize("training", [True, False])
def test_a_joint_child_equals_the_standalone_network_with_its_interactions(training: bool) -> None:
    """The joint supernet's M slots take a child's own interactions (one weight per slot): the child built from
    it with the slices copied computes the same function."""
    blocks = [("layernorm", "conv3", "gelu"), ("none", "bigru", "swish")]
    k0 = _net(_spec(blocks, ["sum", "attention"])).in_dim
    widths = mlp_widths([0.5, 1.0], k0)
    supernet = _net(_spec(blocks, ["sum", "attention"], supernet=True, hidden=[k0, k0], dice=[widths, widths]))
    x, seq = _rows()
    lengths = LENGTHS.to(torch.int32)
    choice = Choice(tuple(blocks), (widths[1], widths[0]), ("dice", "relu"), ((1, 2), (0, 2, 3)))
    child = _net(child_spec(supernet.spec, choice))
    inherit_leading(child, supernet.state_dict())
    assert child.spec.interactions == [(1, 2), (0, 2, 3)] and child.spec.default.interactions is None
    supernet.train(training)
    child.train(training)
    assert torch.allclose(supernet(x, seq, lengths, choice), child(x, seq, lengths), atol=1e-5)
    # the control: the spec's own interactions in the slots are another function
    spec_path = Choice(choice.blocks, choice.hidden, choice.activations)
    assert not torch.allclose(supernet(x, seq, lengths, spec_path), child(x, seq, lengths), atol=1e-3)


def _method(*overrides: str) -> AMEIR:
    """AMEIR on an Alimama-like schema (8 fields, two histories sharing cate_id's and brand's tables), no data."""
    names = ["userid", "age_level", "cate_id", "brand", "pid", "cms_segid", "final_gender_code", "shopping_level"]
    fields = [FieldSpec(n, c) for n, c in zip(names, [50, 7, 9, 6, 3, 4, 3, 4])]
    sequences = [FieldSpec("hist_cate", 9, "sequence", "cate_id", 5), FieldSpec("hist_brand", 6, "sequence", "brand", 5)]
    schema = Schema(dataset="synthetic-alimama", family="alimama", fingerprint="-", fields=fields, n_rows=0,
                    time_min=0, time_max=0, rating_values=[], source={}, options={}, rows_in_file=0, created_at="",
                    cache_version=0, label="click", sequence_fields=sequences)
    cfg = compose(["data=synthetic-alimama", "method=ameir", *overrides])
    return AMEIR(MethodContext(schema, TaskSpec.from_name("binary"), cfg.method, cfg.model, torch.device("cpu"), 0))


def test_a_joint_child_round_trips_through_architecture_json(tmp_path: Path) -> None:
    method = _method("method.search=joint")  # paper budget: 4 cycles, so orders 2..5
    space = method.joint_space()
    assert space.max_order == 5 and space.slots == 5 and method.joint_epochs() == 1 + 4 * 1 + 1
    assert _method("method.search=joint", "method.budget=quick").joint_epochs() == 1 + 2 * 2 + 1
    g = torch.Generator().manual_seed(1)
    draws = space.sample(g, 40)
    assert {len(i) for d in draws for i in d.interactions} == {2, 3, 4, 5}
    spec, k0 = method.sliced_mlp_spec(method._blocks(draws[0].blocks), draws[0].interactions, supernet_blocks=True)
    choice = method._joint_choice(draws[1], space, k0)
    child = child_spec(spec, choice)
    path = tmp_path / "architecture.json"
    path.write_text(json.dumps(method.describe(child)))
    arch = method.read_architecture(str(path))
    assert arch["interactions"] == [[method.field_names[f] for f in i] for i in choice.interactions]  # slot order
    again = method.spec_from(arch)
    assert (again.interactions, again.default.blocks, again.hidden) == (child.interactions, choice.blocks,
                                                                        list(choice.hidden))
    shapes = {n: p.shape for n, p in method.new_net(child).named_parameters()}
    assert {n: p.shape for n, p in method.new_net(again).named_parameters()} == shapes
    # Table 4's "Random" draws from the same space: orders up to cycles + 1
    random_orders = {len(i) for _ in range(40) for i in method.random_architecture(g)["interactions"]}
    assert random_orders == {2, 3, 4, 5}
    quick = _method("method.budget=quick")
    assert {len(i) for _ in range(40) for i in quick.random_architecture(g)["interactions"]} == {2, 3}


# ---------------------------------------------------------------- through the CLI

TINY = ["data=synthetic-alimama", *FIRST_DESIGN_OVERRIDES, "data.generator.users=200", "data.generator.ads=60",
        "data.generator.samples=2000", "data.generator.events_max=15", "data.max_seq_len=6", "runner.epochs=1",
        "runner.batch_size=250", "method=ameir", "method.budget=quick", "method.children=4", "method.top=1",
        "method.cycles=1", "method.keep=3", "method.interactions=2", "method.width_ratios=[0.5,1.0]",
        "method.mlp_activations=[relu,dice]", "method.finetune_steps=1", "method.manual_hidden=[16,8]",
        "method.layers=[conv3,bigru,attention2,target_attention,zero]", "method.valid_rows=500"]


def test_cli_run_writes_the_architecture_the_search_and_the_costs(home: Path) -> None:
    run_cli("run", *TINY, "-q", home=home, check=True)
    (c,) = run_folders(home)
    arch = json.loads((c / "architecture.json").read_text())
    assert arch["variant"] == "C" and len(arch["blocks"]) == 3 and len(arch["interactions"]) == 2
    assert {b["layer"] for b in arch["blocks"]} <= {"conv3", "bigru", "attention2", "target_attention", "zero"}
    assert all(isinstance(f, str) for inter in arch["interactions"] for f in inter)
    assert arch["mlp_hidden"][0] >= arch["mlp_hidden"][1] and arch["interaction_mode"] == "mlp+se"
    metrics = pl.read_parquet(c / "metrics.parquet")
    cost = dict(zip(*metrics.filter(pl.col("split") == "cost").select("metric", "value")))
    assert cost["flops_per_example"] == arch["cost"]["flops_per_example"] > 0 and cost["inference_qps"] > 0
    assert cost["parameters"] == arch["cost"]["parameters"] and cost["search_seconds"] > 0
    assert {"auc", "logloss", "gauc"} <= set(metrics.filter(pl.col("split") == "test")["metric"])
    search = pl.read_parquet(c / "search.parquet")
    per_step = dict(zip(*search.group_by("step").agg(pl.len()).sort("step")))
    assert per_step == {1: 4, 2: 16 * 15 // 2, 3: 3 * 2 * 2}  # 4 children; C(16, 2) pairs; 3 width pairs x 2^2
    assert search.filter(pl.col("step") != 2)["kept"].sum() == 2
    assert read_run(c)["method_info"]["fidelity"] == "faithful, deviations documented"
    # a given architecture is trained as it is, without a search; a file that is not one is a user error
    given = [a for a in TINY if not a.startswith("method.") or a == "method=ameir"]
    run_cli("run", *given, f"method.architecture={c / 'architecture.json'}", "-q", home=home, check=True)
    (fixed,) = [f for f in run_folders(home) if f != c]
    again = json.loads((fixed / "architecture.json").read_text())
    assert {k: again[k] for k in ("blocks", "interactions", "mlp_hidden")} == \
        {k: arch[k] for k in ("blocks", "interactions", "mlp_hidden")}
    assert not (fixed / "search.parquet").exists()
    bad = home / "bad.json"
    bad.write_text('{"blocks": []}')
    line = one_line_error(run_cli("run", *given, f"method.architecture={bad}", home=home))
    assert "method.architecture" in line and "interactions" in line
    assert len(run_folders(home)) == 2


@pytest.mark.slow
def test_cli_joint_search_writes_what_ameir_writes_and_its_child_retrains_from_scratch(home: Path) -> None:
    """``method.search=joint`` end to end on a tiny synthetic Alimama file (slow: about a minute on 2 shared
    cores), then its architecture.json re-trained from scratch."""
    run_cli("run", *TINY, "method.search=joint", "-q", home=home, check=True)
    (c,) = run_folders(home)
    arch = json.loads((c / "architecture.json").read_text())
    assert arch["search"] == "joint" and arch["variant"] == "C" and arch["interaction_mode"] == "mlp+se"
    assert arch["fairness"] == "uniform"  # joint_fairness: one child per batch
    assert len(arch["blocks"]) == 3 and len(arch["interactions"]) == 2 and len(arch["mlp_hidden"]) == 2
    assert all(2 <= len(i) <= 2 for i in arch["interactions"])  # orders 2..cycles + 1 = 2
    assert arch["joint_space_log10"] == pytest.approx(math.log10((2 * 5 * 4) ** 3 * math.comb(120, 2) * 3 * 4))
    search = pl.read_parquet(c / "search.parquet")
    assert search["step"].unique().to_list() == ["joint"] and search.height == 4 and search["kept"].sum() == 1
    kept = json.loads(search.filter(pl.col("kept"))["candidate"][0])
    assert kept["interactions"] == arch["interactions"] and kept["hidden"] == arch["mlp_hidden"]
    epochs = pl.read_parquet(c / "epochs.parquet")
    assert epochs.filter(pl.col("stage") == "search")["epoch"].max() == 1 + 1 * 2 + 1  # AMEIR's step epochs
    metrics = pl.read_parquet(c / "metrics.parquet")
    cost = dict(zip(*metrics.filter(pl.col("split") == "cost").select("metric", "value")))
    assert cost["search_seconds"] > 0 and cost["parameters"] == arch["cost"]["parameters"]
    assert cost["flops_per_example"] == arch["cost"]["flops_per_example"] > 0 and cost["inference_qps"] > 0
    assert {"auc", "logloss", "gauc"} <= set(metrics.filter(pl.col("split") == "test")["metric"])
    given = [a for a in TINY if not a.startswith("method.") or a == "method=ameir"]
    run_cli("run", *given, f"method.architecture={c / 'architecture.json'}", "-q", home=home, check=True)
    (fixed,) = [f for f in run_folders(home) if f != c]
    again = json.loads((fixed / "architecture.json").read_text())
    keys = ("blocks", "interactions", "interaction_mode", "mlp_hidden", "mlp_activations")
    assert {k: again[k] for k in keys} == {k: arch[k] for k in keys}
    assert again["cost"]["parameters"] == arch["cost"]["parameters"] and not (fixed / "search.parquet").exists()
    line = one_line_error(run_cli("run", *TINY, "method.search=joint", "method.variant=B", home=home))
    assert "method.search=joint" in line and len(run_folders(home)) == 2
    # the search figure draws the joint search's children (step "joint")
    run_cli("plot", str(c), "--kind", "ameir-search", "--out", str(home / "figures"), "--format", "png", home=home,
            check=True)
    assert len(list((home / "figures").glob("ameir-search_*.png"))) == 1


def test_reproduction_stops_without_raw_data_and_marks_what_the_suite_lacks(home: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTORECBENCH_HOME", str(home))
    monkeypatch.chdir(home)
    with pytest.raises(UserError, match="raw data missing, nothing run.*behavior_log.*--small"):
        reproduce_command(small=False, tables="table1,table3", seeds="0", random=3, fmt="table", output=None,
                          extra=None)
    with pytest.raises(UserError, match="--tables"):
        reproduce_command(tables="table2")
    with pytest.raises(UserError, match="--data"):
        reproduce_command(data="movielens")
    assert not (home / "results").exists()
    reference = load_reference()
    assert set(reference) - {"source"} == set(TABLES)
    cells = {("table1", "AMEIR-C", "alimama"): Cell({"auc": [0.63, 0.64], "qps": [46_000.0, 47_000.0]})}
    header, rows = table_rows("table1", cells, reference, small=True)
    ours = {r[0]: r for r in rows if r[1].startswith("ours")}
    assert header == ["model", "source", "alimama AUC", "alimama QPS"]
    assert ours["DSIN"][2:] == [NOT_IMPLEMENTED] * 2 and ours["AMEIR-C"][2:] == ["0.6350 ± 0.0071", "46 ± 1K"]
    assert ours["DIEN"][2:] == ["–"] * 2 and TABLES["table1"][2]["DIEN"] == ["method=fixed", "model=dien"]
    assert [label for label, o in TABLES["table1"][2].items() if o is None] == ["DSIN"]
    assert [r[2] for r in rows if r[:2] == ["AMEIR-C", "paper"]] == ["0.6383 ± 0.0004"]
    # Table 4: Random, the one-shot random search over the joint space and AMEIR run; the other NAS rows do not
    runs = {label: o for label, o in TABLES["table4"][2].items() if o is not None}
    assert list(runs) == ["Random", "One-shot random search", "AMEIR"]
    assert "method.search=joint" in runs["One-shot random search"] and "method.search=joint" not in runs["AMEIR"]
    cells = {("table4", "One-shot random search", "alimama"): Cell({"auc": [0.62, 0.64],
                                                                     "search_seconds": [100.0, 120.0]})}
    header, rows = table_rows("table4", cells, reference, small=True)
    by = {(r[0], r[1].split(" ")[0]): r[2:] for r in rows}
    assert header == ["model", "source", "alimama AUC", "alimama search cost"]
    assert by[("One-shot random search", "paper")] == ["0.6365 ± 0.0006", "0.3"]
    assert by[("One-shot random search", "ours")] == ["0.6300 ± 0.0141", "110.0 ± 14.1"]
    assert [label for (label, src), v in by.items() if src == "ours" and v == [NOT_IMPLEMENTED] * 2] == \
        ["RL", "EA", "ENAS", "DARTS", "SNAS"]


@pytest.mark.slow
def test_quick_budget_on_80k_alimama_rows_through_the_cli(home: Path) -> None:
    """The quick budget end to end on ~80,000 Alimama-format rows: search and re-train within 10 minutes of
    2 cores (checked as CPU time, which other processes on a shared machine do not inflate)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run_cli("run", "data=synthetic-alimama", *FIRST_DESIGN_OVERRIDES, "data.generator.samples=80000", "method=ameir",
            "method.budget=quick", "runner.batch_size=1024", "-q", home=home, check=True, timeout=7200)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    (folder,) = run_folders(home)
    cost = dict(zip(*pl.read_parquet(folder / "metrics.parquet").filter(pl.col("split") == "cost").select("metric", "value")))
    test = dict(zip(*pl.read_parquet(folder / "metrics.parquet").filter(pl.col("split") == "test").select("metric", "value")))
    search = pl.read_parquet(folder / "search.parquet")
    print(f"CPU {cpu:.0f} s, search {cost['search_seconds']:.0f} s, re-train {cost['train_seconds']:.0f} s (wall), "
          f"test AUC {test['auc']:.4f}, {json.loads((folder / 'architecture.json').read_text())}")
    assert len(search.filter(pl.col("step") == 3)) == 880 and len(search.filter(pl.col("step") == 1)) == 200
    assert cpu <= 2 * 600


@pytest.mark.slow
def test_a_joint_search_without_histories_resumes_to_the_same_numbers(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``method.search=joint`` on Criteo-format data (no histories: ``joint_fairness=strict`` is over the MLP
    activations), killed inside its one-shot training and resumed from the checkpoint: every table as without the
    kill."""
    from test_resume import CTR, assert_same, run_in_process, stop_and_resume

    overrides = [*CTR, "method=ameir", "method.search=joint", "method.budget=quick", "method.cycles=1",
                 "method.cycle_epochs=1", "method.interactions=2", "method.children=4", "method.top=1",
                 "method.finetune_steps=2", "method.width_ratios=[0.5,1.0]", "method.joint_fairness=strict"]
    reference = run_in_process(tmp_path / "a", overrides)
    arch = json.loads((reference / "architecture.json").read_text())
    assert arch["search"] == "joint" and arch["blocks"] == [] and len(arch["interactions"]) == 2
    assert_same(reference, stop_and_resume(tmp_path / "b", overrides, 5, monkeypatch))


# ---------------------------------------------------------------- validation statistics (no training)

def _step1_row(layers: list[str], auc: float) -> dict[str, object]:
    return {"step": 1, "cycle": 0, "candidate": json.dumps([["none", layer, "relu"] for layer in layers]),
            "valid_auc": auc}


def _pair_row(key: str, auc: float, cycle: int = 1) -> dict[str, object]:
    return {"step": 2, "cycle": cycle, "candidate": key, "valid_auc": auc}


def test_search_statistics_read_the_one_shot_scores() -> None:
    from autorecbench.validate.ameir import search_statistics, structure_statistics

    # conv3 / bigru children score 0.62 and 0.60, the others 0.55 and 0.57: gap 0.05; the planted pair (written
    # in the other field order) is 2nd of cycle 1, a cycle-2 row scoring higher does not count
    rows = [_step1_row(["conv3", "zero", "zero"], 0.62), _step1_row(["zero", "bigru", "conv1"], 0.60),
            _step1_row(["conv1", "zero", "dconv3"], 0.55), _step1_row(["avgpool3", "zero", "zero"], 0.57),
            _step1_row(["zero", "zero", "zero"], math.nan),
            _pair_row("pid*brand", 0.58), _pair_row("cate_id*age_level", 0.57), _pair_row("userid*pid", 0.50),
            _pair_row("age_level*cate_id*pid", 0.70, cycle=2)]
    gap, rank = search_statistics(rows, keep=1)
    assert gap.value == pytest.approx(0.05) and gap.passed
    assert rank.value == 2 and not rank.passed and not rank.higher_is_better
    # the control: order ops scored lowest and the pair missing
    null = [_step1_row(["conv3", "zero", "zero"], 0.5), _step1_row(["zero", "zero", "zero"], 0.6),
            _pair_row("pid*brand", 0.6)]
    gap, rank = search_statistics(null, keep=10)
    assert gap.value == pytest.approx(-0.1) and not gap.passed and math.isnan(rank.value) and not rank.passed
    arch = {"blocks": [{"layer": "bigru"}, {"layer": "zero"}],
            "interactions": [["cate_id", "age_level"], ["userid", "pid"], ["brand", "pid", "cms_group_id"]]}
    assert structure_statistics(arch) == {"order_sensitive_op": 1.0, "planted_pair_kept": 1.0,
                                          "planted_triple_kept": 1.0, "informative_interaction_share": 2 / 3}
    assert structure_statistics({"blocks": [{"layer": "conv1"}], "interactions": []})["order_sensitive_op"] == 0.0


def test_a_diverged_run_leaves_its_cell_to_the_other_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that diverges does not stop the grid: its metrics are NaN (the cell's mean is the other seeds'), it
    is listed in ``Grid.diverged`` and runs once; any other failure still propagates."""
    import autorecbench.reproduce.ameir as reproduction
    from autorecbench.errors import RunDiverged
    from autorecbench.reproduce.ameir import Grid, run_tables
    from autorecbench.reproduce.runs import mean_std

    def fake_run(args: list[str], label: str) -> Path:
        calls.append(label)
        if "model=dnn" in args and "seed=1" in args:
            raise RunDiverged("fit", 48, "validation logloss 1.14 above the bar")
        if "model=deepfm" in args:
            raise RuntimeError("a bug")
        return tmp_path / label.replace(" / ", "-").replace(" ", "_")

    calls: list[str] = []
    monkeypatch.setattr(reproduction, "run_once", fake_run)
    real_metrics = Grid.metrics  # NaN for a diverged run; a finished run's folder is read from its parquet
    monkeypatch.setattr(Grid, "metrics", lambda self, folder: real_metrics(self, None) if folder is None
                        else {"auc": 0.6 if "seed_0" in folder.name else 0.7, "logloss": 0.5})
    grid = Grid(True, [], 3, tmp_path)
    monkeypatch.setitem(reproduction.TABLES, "tiny", (["alimama"], ["auc"], {"DNN": ["method=fixed", "model=dnn"]}))
    cells = run_tables(["tiny"], [0, 1, 2], ["alimama"], grid)
    values = cells[("tiny", "DNN", "alimama")].values["auc"]
    assert values[0] == 0.6 and math.isnan(values[1]) and values[2] == 0.7
    assert mean_std(values) == "0.6500 ± 0.0707" and len(calls) == 3
    assert len(grid.diverged) == 1 and "DNN / seed 1" in grid.diverged[0] and "diverged in the fit stage" in grid.diverged[0]
    grid.run("alimama", ["method=fixed", "model=dnn"], 1, "DNN")  # a diverged configuration is not run again
    assert len(calls) == 3
    with pytest.raises(RuntimeError, match="a bug"):
        grid.run("alimama", ["method=fixed", "model=deepfm"], 0, "DeepFM")
