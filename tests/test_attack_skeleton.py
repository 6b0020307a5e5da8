"""One attack skeleton (issue 9, item 3): a final ``Attack.__call__`` checks the inputs, runs the
model in eval mode and restores it, batches and merges; every registered attack implements
``run`` only, and leaves the user's model exactly as it came in."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prepdefense import attacks, defenses
from prepdefense.attacks.base import Attack
from prepdefense.attacks.bpda import with_bpda
from prepdefense.defenses import Defended

SMALL = {
    "fgsm": {}, "bim": dict(steps=2), "i-fgsm": dict(steps=2), "pgd": dict(steps=2), "mi-fgsm": dict(steps=2),
    "adaptive": dict(steps=2, eot=1, draws=2), "bpda": dict(rounds=2), "bpda-eot": dict(rounds=2, eot=2),
    "cw": dict(binary_search_steps=1, steps=3), "lbfgs": dict(binary_search_steps=1, max_iterations=3),
    "deepfool": dict(steps=2),
    "apgd": dict(steps=3), "apgd-ce": dict(steps=3), "apgd-dlr": dict(steps=3), "square": dict(queries=4),
    "spsa": dict(steps=2, samples=2), "transfer": dict(steps=2),
}


#: Attacks that use the model's outputs only (no gradient to report).
GRADIENT_FREE = {"square", "spsa"}


def _bn_model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def test_every_attack_has_small_settings_here():
    assert set(attacks.names()) <= set(SMALL)


@pytest.mark.parametrize("name", attacks.names())
def test_call_is_the_base_skeleton(name):
    attack = attacks.create(name)
    assert isinstance(attack, Attack)
    assert type(attack).__call__ is Attack.__call__, f"{name} overrides the final __call__"
    assert type(attack).run is not Attack.run, f"{name} does not implement run()"


@pytest.mark.parametrize("name", attacks.names())
def test_model_left_as_it_came(name):
    """A model in training mode (batch norm) keeps its mode, every parameter and buffer."""
    model = _bn_model().train()
    model[1].eval()  # a mixed-mode model: each submodule's own mode comes back
    before = copy.deepcopy(model.state_dict())
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels = model.eval()(x).argmax(1)
    model.train()
    model[1].eval()
    attack = attacks.create(name, **SMALL[name])
    targets = None if not attack.supports_targeted else (labels + 1) % 5
    deployed = Defended(defenses.create("bdr"), model)
    attack(deployed if attack.composes_bpda else with_bpda(deployed), x, labels=labels, targets=targets, generator=0)
    assert model.training and model[0].training and not model[1].training
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"{name} changed {k}"


@pytest.mark.parametrize("name", ["pgd", "adaptive", "cw", "bpda"])
def test_inputs_checked_at_the_boundary(name):
    attack = attacks.create(name, **SMALL[name])
    model = _bn_model().eval()
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="labels must have shape"):
        attack(model, x, labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected a batch \(N, C, H, W\)"):
        attack(model, x[0], labels=torch.zeros(2, dtype=torch.long))


def test_untargeted_only_attack_refuses_targets():
    model = _bn_model().eval()
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="untargeted"):
        attacks.create("deepfool")(model, x, labels=torch.zeros(2, dtype=torch.long), targets=torch.ones(2, dtype=torch.long))


@pytest.mark.parametrize("name", ["pgd", "bpda", "cw", "deepfool", "apgd", "square", "spsa", "transfer"])
def test_batches_merge_to_the_whole(name):
    """Results of batch_size=2 equal one batch of 5 (per-image losses, per-image draws)."""
    model = _bn_model().eval()
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    labels = model(x).argmax(1)
    targets = None if name == "deepfool" else (labels + 1) % 5
    kw = dict(SMALL[name])
    whole = attacks.create(name, **kw)(model, x, labels=labels, targets=targets, generator=1)
    split = attacks.create(name, **kw)
    split.batch_size = 2
    parts = split(model, x, labels=labels, targets=targets, generator=1)
    torch.testing.assert_close(parts.adversarial, whole.adversarial, rtol=0, atol=1e-5)
    assert torch.equal(parts.success, whole.success)
    assert len(parts.history) == len(whole.history)
    for a, b in zip(parts.history, whole.history):
        assert a["n"] == b["n"] == 5 and a["accuracy"] == pytest.approx(b["accuracy"])


@pytest.mark.parametrize("name", [n for n in attacks.names() if not attacks.create(n).composes_bpda])
def test_non_differentiable_defense_is_refused_with_bpda_named(name):
    """No silent failure: an attack that does not compose BPDA refuses a model whose defense has
    no gradient, and the message says how to apply BPDA (issue 11, item 3)."""
    model = Defended(defenses.create("jpeg"), _bn_model().eval())
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="with_bpda"):
        attacks.create(name, **SMALL[name])(model, x, labels=torch.zeros(2, dtype=torch.long))


class _Staircase(nn.Module):
    """A classifier whose gradient is zero everywhere (it rounds its input inside)."""

    def __init__(self):
        super().__init__()
        self.inner = _bn_model().eval()

    def forward(self, x):
        return self.inner(torch.round(x * 4) / 4)


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "smooth"])
@pytest.mark.parametrize("name", [n for n in attacks.names() if n not in GRADIENT_FREE])
def test_zero_gradients_are_reported_in_the_result(name, masked):
    """An attack that only ever gets zero gradients says so, and one on a smooth model reports
    none (issue 11, item 3)."""
    model = (_Staircase() if masked else _bn_model()).eval()
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = model(x).argmax(1)
    attack = attacks.create(name, **SMALL[name])
    targets = (labels + 1) % 5 if name in ("bpda", "bpda-eot", "cw", "lbfgs") else None
    stats = attack(model, x, labels=labels, targets=targets, generator=0).info["gradient_stats"]
    assert stats["nonfinite_gradients"] == 0, stats
    assert (stats["zero_gradients"] > 0) if masked else (stats["zero_gradients"] == 0), stats
