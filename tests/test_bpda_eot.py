"""BPDA and EOT model wrappers (issue 4, item 2; STYLE.md: identity BPDA passes the gradient
through, EOT over a deterministic model changes nothing)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prepdefense import seeding
from prepdefense.attacks.bpda import BPDA, bpda_model, with_bpda
from prepdefense.attacks.eot import EOT
from prepdefense.draws import DrawKey, Params
from prepdefense.defenses import Compose, Defended
from prepdefense.defenses.base import Defense


# Tiny models: one torch thread avoids oversubscription (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


class Quantize(Defense):
    """Non-differentiable (round), deterministic."""

    def apply(self, x, params=None):
        return torch.round(x * 4) / 4


class NoisyQuantize(Defense):
    """Non-differentiable and random: quantise, then add a per-image offset."""

    randomized = True

    def draw(self, x, generator):
        return Params(offset=seeding.rand((x.shape[0], 1, 1, 1), generator, device=x.device) * 0.2 - 0.1)

    def apply(self, x, params):
        return (torch.round(x * 4) / 4 + params["offset"]).clamp(0, 1)


class Shift(Defense):
    """Differentiable and random: a random per-image brightness shift."""

    randomized = True
    differentiable = True

    def draw(self, x, generator):
        return Params(offset=seeding.rand((x.shape[0], 1, 1, 1), generator, device=x.device) * 0.2 - 0.1)

    def apply(self, x, params):
        return x * 0.9 + params["offset"]


class Pad(Defense):
    """Non-differentiable and size-changing (pads by 2)."""

    changes_size = True

    def apply(self, x, params=None):
        return F.pad(torch.round(x * 4) / 4, (2, 2, 2, 2), value=0.5)


def _clf(seed=0, side=8):
    torch.manual_seed(seed)  # test-only: weights of a tiny model
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * side * side, 10))


def _grad(fn, x):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    (out * torch.linspace(-1, 1, out[0].numel()).view(1, *out.shape[1:])).sum().backward()
    return x.grad


def test_identity_bpda_value_and_gradient():
    x = torch.rand(3, 3, 8, 8)
    b = BPDA(Quantize())
    out = b(x)
    assert torch.equal(out, Quantize()(x))
    g = _grad(b, x)
    assert torch.equal(g, _grad(lambda t: t, x))  # identity backward, exactly
    # Without BPDA the round kills the gradient.
    xr = x.clone().requires_grad_(True)
    assert Quantize()(xr).requires_grad is False


def test_bpda_with_module_gives_the_approximations_gradient():
    x = torch.rand(2, 3, 8, 8)
    approx = nn.Conv2d(3, 3, 3, padding=1)
    b = BPDA(Quantize(), approx=approx)
    assert torch.allclose(b(x), Quantize()(x))
    assert torch.allclose(_grad(b, x), _grad(approx, x))


def test_bpda_uses_real_gradient_of_differentiable_defense():
    x = torch.rand(2, 3, 8, 8)
    d = Shift()
    out = BPDA(d)(x, generator=seeding.make_generator(1))
    assert torch.equal(out, d(x, generator=seeding.make_generator(1)))
    g = _grad(lambda t: BPDA(d)(t, generator=seeding.make_generator(1)), x)
    ref = _grad(lambda t: d(t, generator=seeding.make_generator(1)), x)
    assert torch.allclose(g, ref)
    assert torch.allclose(g, 0.9 * _grad(lambda t: t, x))


def test_bpda_partwise_on_compose():
    x = torch.rand(2, 3, 8, 8)
    chain = Compose([Quantize(), Shift()])
    out = BPDA(chain)(x, generator=seeding.make_generator(3))
    assert torch.equal(out, chain(x, generator=seeding.make_generator(3)))
    # identity through Quantize, 0.9 through Shift
    g = _grad(lambda t: BPDA(chain)(t, generator=seeding.make_generator(3)), x)
    assert torch.allclose(g, 0.9 * _grad(lambda t: t, x))


def test_bpda_size_changing_defense_value_and_shape():
    x = torch.rand(2, 3, 8, 8)
    out = BPDA(Pad())(x)
    assert out.shape == (2, 3, 12, 12)
    assert torch.equal(out, Pad()(x))
    g = _grad(BPDA(Pad()), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_with_bpda_rewrites_defended_and_keeps_predictions():
    clf = _clf()
    m = Defended(NoisyQuantize(), clf)
    mb = with_bpda(m)
    assert isinstance(mb.defense, BPDA) and with_bpda(mb) is mb and with_bpda(clf) is clf
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(m(x, generator=seeding.make_generator(5)), mb(x, generator=seeding.make_generator(5)))
    x.requires_grad_(True)
    mb(x, generator=seeding.make_generator(5)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_eot_over_deterministic_model_changes_nothing():
    clf = _clf()
    x = torch.rand(4, 3, 8, 8)
    m = bpda_model(Quantize(), clf)
    e = EOT(m, 10)
    assert torch.equal(e(x), m(x))
    assert torch.allclose(_grad(e, x), _grad(m, x))
    assert torch.allclose(EOT(clf, 7, reduce="prob")(x), clf(x).log_softmax(1), atol=1e-6)


def _manual_mean(model, x, n, seed):
    """The mean of n manual calls, draw i under the run key's sub-stream ("eot", i)."""
    key = DrawKey(seeding.child_seed(seeding.make_generator(seed)), n=x.shape[0])
    return torch.stack([model(x, generator=key.child("eot", i)) for i in range(n)]).mean(0)


def test_eot_equals_mean_of_manual_draws_and_chunking_is_invisible():
    clf = _clf()
    m = bpda_model(NoisyQuantize(), clf)
    x = torch.rand(3, 3, 8, 8)
    ref = _manual_mean(m, x, 6, 11)
    for chunk in (None, 1, 4):
        got = EOT(m, 6, chunk=chunk)(x, generator=seeding.make_generator(11))
        assert torch.allclose(got, ref, atol=1e-5), chunk
    per = EOT(m, 6, reduce="none")(x, generator=seeding.make_generator(11))
    assert per.shape == (6, 3, 10)
    assert not torch.allclose(per[0], per[1])  # draws differ
    # gradients: chunking and checkpointing do not change them
    g1 = _grad(lambda t: EOT(m, 6)(t, generator=seeding.make_generator(2)), x)
    g2 = _grad(lambda t: EOT(m, 6, chunk=2, checkpoint=True)(t, generator=seeding.make_generator(2)), x)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_eot_generic_model_without_defended_structure():
    class RandomModel(nn.Module):
        randomized = True

        def __init__(self):
            super().__init__()
            self.clf = _clf()

        def forward(self, x, *, generator=None):
            return self.clf(x + seeding.rand((x.shape[0], 1, 1, 1), generator) * 0.1)

    m = RandomModel()
    x = torch.rand(2, 3, 8, 8)
    # one generator per draw for the whole batch: reproducible, and chunking is invisible
    ref = EOT(m, 5)(x, generator=seeding.make_generator(4))
    assert torch.allclose(EOT(m, 5, chunk=2)(x, generator=seeding.make_generator(4)), ref, atol=1e-6)
    per = EOT(m, 5, reduce="none")(x, generator=seeding.make_generator(4))
    assert not torch.allclose(per[0], per[1])  # draws differ
    p = EOT(m, 5, reduce="prob")(x, generator=seeding.make_generator(4))
    assert torch.allclose(p.exp().sum(1), torch.ones(2), atol=1e-5)


def test_expectation_gradient_in_chunks_equals_one_pass_and_bounds_the_calls():
    """EOT's gradient computed a chunk of draws at a time (each graph freed after its backward)
    equals the one-pass gradient, and no classifier call sees more than max(64, N) images
    (issue 13, item 4: bounded memory for any number of draws)."""
    from prepdefense.attacks.eot import EOT_CHUNK_IMAGES, expectation_gradient

    sizes = []

    class Counting(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            sizes.append(x.shape[0])
            return self.inner(x)

    clf = Counting(_clf())
    m = bpda_model(NoisyQuantize(), clf)
    x = torch.rand(5, 3, 8, 8)
    key = DrawKey(3, n=5)
    ce = lambda z: F.cross_entropy(z.reshape(-1, 10), torch.zeros(z.shape[0] * 5, dtype=torch.long), reduction="none").view(z.shape[0], 5)  # noqa: E731
    obj, grad, logits = expectation_gradient(m, x, key, 40, ce)
    assert max(sizes) <= max(EOT_CHUNK_IMAGES, 5) and logits.shape == (40, 5, 10)
    xr = x.clone().requires_grad_(True)
    z = EOT(m, 40, reduce="none")(xr, generator=key)
    (ref,) = torch.autograd.grad(ce(z).mean(0).sum(), xr)
    torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(obj, ce(z).mean(0).detach(), rtol=1e-5, atol=1e-6)
    sizes.clear()
    expectation_gradient(m, x, key, 40, ce, chunk=3)
    assert max(sizes) == 15
