"""``make bench``'s reporting: the README reference figures and their ratios, the hardware line, and the DeepFM
FLOP count (against a count of the kernels torch really runs). No benchmark runs here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from autorecbench.bench.flops import deepfm_flops, layer_widths, matmul_rate
from autorecbench.bench.reference import REFERENCE_FILE, hardware_line, load_references
from autorecbench.data.schema import FieldSpec, TaskSpec
from autorecbench.models.backbones import build_backbone

ELEMENTWISE = {"add", "sub", "mul", "div", "neg"}
MATMUL = {"mm", "addmm", "bmm"}


class KernelFlops(TorchDispatchMode):
    """Brute force: every aten kernel torch runs, counted by its shapes. Matrix products ``2 m k n`` (bias
    additions left out, as the formula does); element-wise arithmetic one FLOP per element written; a sum the
    additions it makes (elements read - elements written); views, copies and fills nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.matmul = 0
        self.elementwise = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name in MATMUL:
            a, b = tensors[-2], tensors[-1]
            self.matmul += 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
        elif name in ELEMENTWISE:
            self.elementwise += out.numel()
        elif name == "sum":
            self.elementwise += tensors[0].numel() - out.numel()
        return out


def tiny_deepfm(n_fields: int, dim: int, hidden: list[int]) -> torch.nn.Module:
    fields = [FieldSpec(f"f{i}", 5 + i) for i in range(n_fields)]
    cfg = OmegaConf.create({"name": "deepfm", "embedding_dim": dim, "hidden": hidden, "dropout": 0.2})
    return build_backbone("deepfm", fields, TaskSpec.from_name("binary"), cfg)


CASES = [(3, 4, [5, 6], 7), (6, 2, [9], 4)]


@pytest.mark.parametrize(("n_fields", "dim", "hidden", "batch"), CASES)
def test_matrix_product_flops_equal_the_kernels_of_a_whole_training_step(n_fields: int, dim: int, hidden: list[int],
                                                                          batch: int) -> None:
    torch.manual_seed(0)
    model = tiny_deepfm(n_fields, dim, hidden)
    x = torch.stack([torch.randint(0, 5, (batch,)) for _ in range(n_fields)], dim=1).int()
    expected = deepfm_flops(n_fields, dim, hidden)
    with FlopCounterMode(display=False) as torch_count, KernelFlops() as ours:
        model(x).sum().backward()
    # Two independent counts of the same step: torch's own FLOP counter and the kernel count.
    assert torch_count.get_total_flops() == ours.matmul == (expected.mlp_forward + expected.mlp_backward) * batch
    # Forward alone is a third of it: the backward's two products per layer are counted, not assumed.
    with KernelFlops() as forward_only:
        model(x)
    assert forward_only.matmul == expected.mlp_forward * batch != ours.matmul


@pytest.mark.parametrize(("n_fields", "dim", "hidden", "batch"), CASES)
def test_fm_flops_equal_the_kernels_torch_runs(n_fields: int, dim: int, hidden: list[int], batch: int) -> None:
    model = tiny_deepfm(n_fields, dim, hidden)
    e = torch.randn(batch, n_fields, dim, requires_grad=True)
    expected = deepfm_flops(n_fields, dim, hidden)
    with KernelFlops() as forward:
        out = model.fm(e)
    with KernelFlops() as backward:
        out.backward(torch.ones_like(out))
    assert (forward.elementwise, backward.elementwise) == (expected.fm_forward * batch, expected.fm_backward * batch)
    assert forward.matmul == backward.matmul == 0


def test_deepfm_flops_at_the_bench_shapes() -> None:
    flops = deepfm_flops(39, 16, [128, 128])
    assert layer_widths(39, 16, [128, 128]) == [(624, 128), (128, 128), (128, 1)]
    products = 624 * 128 + 128 * 128 + 128
    assert (flops.mlp_forward, flops.mlp_backward) == (2 * products, 4 * products)
    assert flops.total == 6 * products + 3 * 624 + 32 - 1 + 4 * 624 + 80


def test_matmul_rate_counts_two_flops_per_multiply_add() -> None:
    rate = matmul_rate(64, 32, 16, torch.device("cpu"), seconds=0.03)
    assert (rate.m, rate.k, rate.n) == (64, 32, 16) and rate.repeats >= 1 and rate.flops_per_second > 0


def test_reference_ratios_match_bench_figure_configuration_and_device_kind() -> None:
    refs = load_references()
    fixed = refs.find("streaming", "interactions_per_second", "cpu", method="fixed", optimizer="lazy", task="binary")
    assert fixed is not None and fixed.hardware in refs.hardware
    assert refs.ratio(fixed.value / 2, "streaming", "interactions_per_second", "cpu", method="fixed",
                      optimizer="lazy", task="binary") == f"0.50× {fixed.hardware}"
    gpu = refs.find("streaming", "interactions_per_second", "cuda:0", method="fixed", optimizer="lazy", task="binary")
    assert gpu is not None and gpu.value != fixed.value
    # Another configuration, figure or bench has no reference: a dash, never another row's figure.
    assert refs.ratio(1.0, "streaming", "interactions_per_second", "cpu", method="fixed", optimizer="lazy",
                      task="multiclass") == "–"
    assert refs.ratio(1.0, "streaming", "interactions_per_second", "cpu", method="fixed") == "–"
    assert refs.ratio(1.0, "ctr", "interactions_per_second", "cpu", method="fixed", optimizer="lazy",
                      task="binary") == "–"
    assert refs.ratio(None, "ctr", "train_samples_per_second", "cpu", model="deepfm") == "–"
    assert refs.ratio(101_800, "ctr", "train_samples_per_second", "cpu", model="deepfm") == "2.00× cpu-2core"
    assert "cpu-2core:" in refs.legend()


def test_the_reference_file_names_its_hardware_and_is_read_strictly(tmp_path: Path) -> None:
    text = REFERENCE_FILE.read_text()
    assert "ctr" in text and "alimama" in text and "checkpoint" in text
    bad = tmp_path / "reference.yaml"
    bad.write_text("hardware: {a: x}\nfigures:\n  - {bench: ctr, figure: f, device: cpu, hardware: b, value: 1}\n")
    with pytest.raises(ValueError, match="unknown hardware 'b'"):
        load_references(bad)


def test_hardware_line_names_cpu_threads_torch_and_load() -> None:
    line = hardware_line("cpu", 1.25)
    assert line.startswith("hardware: ") and f"torch {torch.__version__}" in line
    threads = f"torch threads {torch.get_num_threads()},"
    assert "cores" in line and threads in line and "device cpu" in line and "1.25 at start" in line


def test_fuxictr_deepfm_has_our_deepfm_parameters_and_trains(tmp_path: Path) -> None:
    """``bench.ctr --fuxictr``: FuxiCTR's DeepFM (from its layers) has exactly our DeepFM's parameters for the same
    fields and sizes, and one epoch on a planted first-order signal runs and learns it."""
    pytest.importorskip("fuxictr")
    from types import SimpleNamespace

    from autorecbench.bench.fuxictr_deepfm import train_fuxictr

    n_fields, dim, hidden = 3, 4, [8, 8]
    ours = tiny_deepfm(n_fields, dim, hidden)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (3000, n_fields), generator=generator, dtype=torch.int32)
    label = (x[:, 0] < 2).float()  # field 0's value decides the click

    class Split(SimpleNamespace):
        def __len__(self) -> int:
            return int(self.x.shape[0])

    data = SimpleNamespace(fields=[FieldSpec(f"f{i}", 5 + i) for i in range(n_fields)],
                           train=Split(x=x[:2000], label=label[:2000]), test=Split(x=x[2000:], label=label[2000:]))
    cfg = OmegaConf.create({"embedding_dim": dim, "hidden": hidden, "dropout": 0.2, "batch_norm": True})
    result = train_fuxictr(data, cfg, 200, 1e-2, torch.device("cpu"), tmp_path, workers=0)
    assert result["parameters"] == sum(p.numel() for p in ours.parameters())
    assert result["train_rows"] == 2000 and result["samples_per_second"] > 0
    assert result["test_auc"] > 0.9
