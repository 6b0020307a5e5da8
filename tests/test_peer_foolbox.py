"""Peer check (issue 4, item 9): our PGD (Linf, L2) and C&W against foolbox 3 on the
undefended default model, the same images, the same budget and steps.

The fast tests attack 6 correctly classified images of the shared sample with short runs at
small budgets (so that success is not trivially 0% or 100%), without random start, so that
both libraries follow the same deterministic path and agree image by image up to floating
point; they allow one image of difference (17 points at n=6; the issue's 10 points is
checked on 20 images by the slow tests, which use random starts as the attacks' defaults).
"""

from __future__ import annotations

import pytest
import torch

fb = pytest.importorskip("foolbox")

from prepdefense import data, seeding  # noqa: E402
from prepdefense.attacks.carlini_wagner import CarliniWagnerL2  # noqa: E402
from prepdefense.attacks.gradient import PGD  # noqa: E402


def _sample(model, folder, n):
    s = data.protocol_sample(model, folder, n=n, seed=0, batch_size=8)
    return s.x, s.labels, s.targets


@pytest.fixture(scope="module")
def peer(model, imagenet_sample_dir):
    for p in model.parameters():
        p.requires_grad_(False)
    x, labels, targets = _sample(model, imagenet_sample_dir, 6)
    return model, fb.PyTorchModel(model, bounds=(0, 1)), x, labels, targets


def _rate(success: torch.Tensor) -> float:
    return float(success.float().mean())


def _close(ours: torch.Tensor, theirs: torch.Tensor, tol: float) -> None:
    n = ours.numel()
    r_ours, r_theirs = _rate(ours), _rate(theirs)
    msg = f"success ours {r_ours:.2f} vs foolbox {r_theirs:.2f} on {n} images"
    print(msg)
    assert abs(r_ours - r_theirs) <= max(tol, 1.0 / n) + 1e-9, msg


def _pgd_pair(model, fmodel, x, labels, *, norm, eps, steps, step, random_start, generator=None):
    """``eps``/``step`` in foolbox's units (Linf, or Euclidean L2); ours takes L2 in the paper's
    RMS unit, the Euclidean figure over sqrt(C*H*W)."""
    scale = 1.0 if norm == "linf" else x[0].numel() ** 0.5
    ours = PGD(norm=norm, eps=eps / scale, steps=steps, step_size=step / scale, random_start=random_start)(
        model, x, labels=labels, generator=generator)
    cls = fb.attacks.LinfPGD if norm == "linf" else fb.attacks.L2PGD
    _, clipped, theirs = cls(abs_stepsize=step, steps=steps, random_start=random_start)(fmodel, x, labels, epsilons=eps)
    return ours, clipped, theirs


@pytest.mark.parametrize("norm,eps", [("linf", 0.25 / 255), ("l2", 0.25)])
def test_pgd_matches_foolbox(peer, norm, eps):
    model, fmodel, x, labels, _ = peer
    steps = 4
    ours, clipped, theirs = _pgd_pair(model, fmodel, x, labels, norm=norm, eps=eps, steps=steps,
                                      step=2.5 * eps / steps, random_start=False)
    _close(ours.success, theirs, 0.10)
    # same deterministic path: the adversarial images themselves nearly coincide (sign steps
    # absorb float noise; normalised L2 steps let it grow, to about 5% of eps in 4 steps)
    diff = (ours.adversarial - clipped).flatten(1)
    agree = diff.abs().amax(dim=1) < 1e-4 if norm == "linf" else diff.norm(dim=1) < 0.1 * eps
    assert torch.equal(ours.success[agree], theirs[agree])
    assert agree.sum() >= x.shape[0] - 1
    # the budget is respected by both
    d = (ours.adversarial - x).flatten(1)
    if norm == "linf":
        assert d.abs().max() <= eps + 1e-6
    else:
        assert (d.norm(dim=1) <= eps + 1e-4).all()


def test_cw_matches_foolbox(peer):
    model, fmodel, x, labels, targets = peer
    settings = dict(binary_search_steps=1, steps=6, initial_const=30.0)
    ours = CarliniWagnerL2(lr=0.05, abort_early=False, **settings)(model, x, labels=labels, targets=targets)
    attack = fb.attacks.L2CarliniWagnerAttack(stepsize=0.05, abort_early=False, **settings)
    criterion = fb.criteria.TargetedMisclassification(targets)
    _, clipped, theirs = attack(fmodel, x, criterion, epsilons=None)
    # foolbox returns an all-zero image where it found nothing; that is no success
    theirs = theirs & (clipped.flatten(1).abs().sum(dim=1) > 0)
    _close(ours.success, theirs, 0.10)
    both = ours.success & theirs
    if both.any():
        l2_ours = (ours.adversarial - x).flatten(1).norm(dim=1)[both]
        l2_theirs = (clipped - x).flatten(1).norm(dim=1)[both]
        assert torch.allclose(l2_ours, l2_theirs, rtol=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("norm,eps", [("linf", 0.5 / 255), ("l2", 0.5)])
def test_pgd_random_start_matches_foolbox_20_images(model, imagenet_sample_dir, norm, eps):
    for p in model.parameters():
        p.requires_grad_(False)
    x, labels, _ = _sample(model, imagenet_sample_dir, 20)
    fmodel = fb.PyTorchModel(model, bounds=(0, 1))
    steps = 10
    ours, _, theirs = _pgd_pair(model, fmodel, x, labels, norm=norm, eps=eps, steps=steps, step=2.5 * eps / steps,
                                random_start=True, generator=seeding.make_generator(0))
    _close(ours.success, theirs, 0.10)


@pytest.mark.slow
def test_cw_matches_foolbox_20_images(model, imagenet_sample_dir):
    for p in model.parameters():
        p.requires_grad_(False)
    x, labels, targets = _sample(model, imagenet_sample_dir, 20)
    fmodel = fb.PyTorchModel(model, bounds=(0, 1))
    settings = dict(binary_search_steps=3, steps=20, initial_const=10.0)
    ours = CarliniWagnerL2(lr=0.05, **settings)(model, x, labels=labels, targets=targets)
    attack = fb.attacks.L2CarliniWagnerAttack(stepsize=0.05, **settings)
    _, clipped, theirs = attack(fmodel, x, fb.criteria.TargetedMisclassification(targets), epsilons=None)
    theirs = theirs & (clipped.flatten(1).abs().sum(dim=1) > 0)
    _close(ours.success, theirs, 0.10)
