"""`Defended(..., defend_at=S)` (issue 15, item 3): the defense runs at side S, the model at
its own input size; draws are made for the defended size; BPDA keeps the setting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prepdefense import defenses
from prepdefense.attacks.bpda import with_bpda
from prepdefense.defenses.defended import Defended, resize_images


class SizedModel(nn.Module):
    """A classifier that accepts only its declared input size."""

    def __init__(self, input_size: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.input_size = input_size
        self.fc = nn.Linear(3 * input_size * input_size, classes)
        torch.manual_seed(0)

    def forward(self, x):
        assert x.shape[-2:] == (self.input_size, self.input_size), x.shape
        return self.fc(x.flatten(1))


@pytest.fixture
def x():
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["dct-distort", "jpeg", "tv", "rand"])
def test_defended_at_a_larger_side_equals_the_composition(name, x):
    model = SizedModel()
    d = defenses.create(name)
    deployed = Defended(d, model, defend_at=24)
    params = deployed.sample_params(x, 7)
    if params is not None and "mask" in params:  # tv draws its mask for the defended size
        assert params["mask"].shape[-2:] == (24, 24)
    expected = model(resize_images(d.run(resize_images(x, (24, 24)), params), (16, 16)))
    assert torch.allclose(deployed.apply(x, params), expected)
    assert torch.equal(deployed(x, generator=7), deployed.apply(x, params))


def test_default_defends_at_the_input_size(x):
    model = SizedModel()
    d = defenses.create("jpeg")
    assert torch.equal(Defended(d, model)(x), model(d(x)))


def test_without_a_declared_size_the_output_goes_back_to_the_input_size(x):
    seen = []

    class Any(nn.Module):
        def forward(self, t):
            seen.append(tuple(t.shape[-2:]))
            return t.mean(dim=(2, 3))

    Defended(defenses.create("jpeg"), Any(), defend_at=(20, 28))(x)
    assert seen == [(16, 16)]


def test_bpda_keeps_defend_at_and_the_gradient_flows(x):
    model = SizedModel()
    deployed = with_bpda(Defended(defenses.create("dct-distort"), model, defend_at=24))
    assert deployed.defend_at == (24, 24)
    xr = x.clone().requires_grad_(True)
    deployed(xr, generator=3).sum().backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0


def test_resize_is_identity_at_the_same_size_and_rejects_bad_sides(x):
    assert resize_images(x, (16, 16)) is x
    with pytest.raises(ValueError, match="defend_at"):
        Defended(defenses.create("jpeg"), SizedModel(), defend_at=0)


@pytest.mark.parametrize("name", ["tv", "rand", "dct-distort"])
def test_eot_over_a_model_defended_at_another_side(name, x):
    """EOT batches the draws of a chunk itself: it must defend at ``defend_at`` too."""
    from prepdefense.attacks.eot import EOT

    model = SizedModel()
    deployed = Defended(defenses.create(name), model, defend_at=24)
    eot = EOT(deployed, 3, reduce="none")
    params = eot.sample_params(x, 5)
    z = eot.apply(x, params)
    assert z.shape == (3, x.shape[0], 5)
    for k in range(3):
        assert torch.allclose(z[k], deployed.apply(x, params[str(k)]), atol=1e-6)
