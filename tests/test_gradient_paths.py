"""Every defense on every attack path, at every batch size and thread count that selects a
different internal code path (issue 14).

The regression this guards against: Step 1's fast CPU path (per-image steps on
``cpu_workers`` threads, chosen once a batch has two or more steps and torch has two
threads) ran with an input that required grad, and grad mode is per thread, so the
caller's ``no_grad`` did not reach the workers. The rule checked here: the
non-differentiable parts never run on the autograd graph, whichever path the batch size,
thread count or EOT chunking selects, and the gradient an attack gets is finite and
non-zero (BPDA supplies it through the non-differentiable parts; differentiable parts
keep their real gradient).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prepdefense import attacks, defenses
from prepdefense.attacks.bpda import BPDA
from prepdefense.attacks.eot import EOT
from prepdefense.cpu_workers import CPUWorkers, use
from prepdefense.defenses import Defended
from prepdefense.seeding import make_generator

NAMES = defenses.names()
BATCHES = (1, 2, 10, 64)
THREADS = (1, 2)
SIDE = 32  # small images keep the matrix fast; still four 8x8 blocks per side
MODES = ("forward", "bpda", "eot-bpda", "adaptive", "bpda-eot")
STEP1_DEFENSES = {"dct-quant", "fd", "dct-distort"}  # Step 1 on the CPU workers


class TinyConvNet(nn.Module):
    """Any-size [0,1] NCHW in, 10 logits out (global pooling, so size-changing defenses work)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def tiny_model() -> nn.Module:
    return TinyConvNet().eval()


@pytest.fixture(params=THREADS, ids=lambda t: f"threads{t}")
def threads(request):
    """The torch thread count, with Step 1's CPU workers sized to one small image per step, so
    that a batch of two or more takes the multi-step path (on the worker threads with two
    torch threads) exactly as a 64-image batch of 299x299 images does. Yields the
    :class:`CPUWorkers` in force, whose ``stats`` show which path ran."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        with CPUWorkers(step_elements=3 * SIDE * SIDE) as workers, use(workers):
            yield workers
    finally:
        torch.set_num_threads(before)


def _assert_step1_path(name: str, n: int, workers: CPUWorkers) -> None:
    """Step 1's defenses ran on the path this case is meant to cover: one image per step, so
    several steps for n >= 2, on the worker threads when torch has two threads."""
    assert STEP1_DEFENSES <= set(NAMES)
    if name not in STEP1_DEFENSES:
        return
    stats = workers.stats
    assert stats.calls > 0, "Step 1 did not run through the configured workers"
    if n >= 2:  # (with n = 1, EOT's copies of the image can still make several steps)
        assert stats.most_steps >= 2, "the multi-step path was not taken"
        assert (stats.pooled_calls > 0) == (torch.get_num_threads() >= 2), "the worker pool was (not) used"


def _images(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, SIDE), torch.linspace(0, 1, SIDE), indexing="ij")
    base = torch.stack([yy, xx, (yy + xx) / 2]).expand(n, 3, SIDE, SIDE)
    return (base + 0.2 * torch.randn(n, 3, SIDE, SIDE, generator=g)).clamp(0, 1)


def _grad(model: nn.Module, x: torch.Tensor, generator) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    logits = model(x, generator=generator)
    loss = nn.functional.cross_entropy(logits, torch.zeros(x.shape[0], dtype=torch.long), reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def _assert_useful(grad: torch.Tensor) -> None:
    assert torch.isfinite(grad).all(), "non-finite gradient"
    per_image = grad.flatten(1).abs().amax(dim=1)
    assert (per_image > 0).all(), f"zero gradient for images {(per_image == 0).nonzero().flatten().tolist()}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", BATCHES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("name", NAMES)
def test_every_defense_on_every_attack_path(name, n, mode, threads, tiny_model):
    defense = defenses.create(name)
    x = _images(n)
    labels = torch.zeros(n, dtype=torch.long)
    g = make_generator(1)
    if mode == "forward":
        # The deployed model on an input that requires grad: a non-differentiable defense must
        # not put its internals on the graph (no crash, no graph); a differentiable one keeps
        # its real gradient.
        xr = x.clone().requires_grad_(True)
        logits = Defended(defense, tiny_model)(xr, generator=g)
        assert torch.isfinite(logits).all() and logits.shape == (n, 10)
        if defense.differentiable:
            _assert_useful(_grad(Defended(defense, tiny_model), x, make_generator(1)))
        else:
            out = defense(xr, generator=make_generator(1))
            assert not out.requires_grad, "a non-differentiable defense returned a graph"
    elif mode == "bpda":
        _assert_useful(_grad(Defended(BPDA(defense), tiny_model), x, g))
    elif mode == "eot-bpda":
        # chunk=1 and chunk=None take different EOT branches: both must give the same gradient
        model = Defended(BPDA(defense), tiny_model)
        whole = _grad(EOT(model, 3), x, make_generator(2))
        chunked = _grad(EOT(model, 3, chunk=1), x, make_generator(2))
        _assert_useful(whole)
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    elif mode == "adaptive":
        attack = attacks.create("adaptive", norm="linf", eps=8 / 255, steps=1, eot=2, draws=2, restarts=1, losses=("ce",))
        result = attack(Defended(defense, tiny_model), x, labels=labels, generator=g)
        stats = result.info["gradient_stats"]
        assert stats["nonfinite_gradients"] == 0 and stats["zero_gradients"] == 0, stats
        assert result.adversarial.shape == x.shape and torch.isfinite(result.adversarial).all()
        assert float((result.adversarial - x).abs().max()) <= 8 / 255 + 1e-6
    else:  # bpda-eot: one round of the paper's protocol
        attack = attacks.create("bpda-eot", rounds=1, eot=2)
        targets = torch.ones(n, dtype=torch.long)
        result = attack(Defended(defense, tiny_model), x, labels=labels, targets=targets, generator=g)
        assert result.adversarial.shape == x.shape and torch.isfinite(result.adversarial).all()
        assert len(result.history) == 1
        # the paper's raw-gradient step moved every image that had not stopped
        moved = (result.adversarial - x).flatten(1).abs().amax(dim=1) > 0
        assert moved.all(), f"images {(~moved).nonzero().flatten().tolist()} were not moved"
    _assert_step1_path(name, n, threads)
