"""Transfer (issue 10, item 3): PGD on the bare classifier inside a defended model, judged on the
defended model."""

from __future__ import annotations

import torch
from torch import nn

from prepdefense import attacks, defenses
from prepdefense.attacks.eot import EOT
from prepdefense.attacks.gradient import PGD
from prepdefense.attacks.transfer import Transfer, source_classifier
from prepdefense.defenses import Defended
from prepdefense.attacks.bpda import with_bpda


def _clf():
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m.eval()


def test_source_is_the_bare_classifier():
    clf = _clf()
    deployed = Defended(defenses.create("jpeg"), clf)
    assert source_classifier(deployed) is clf
    assert source_classifier(with_bpda(deployed)) is clf
    assert source_classifier(EOT(Defended(defenses.create("grid-distort"), clf), 3)) is clf
    assert source_classifier(clf) is clf


def test_images_are_pgd_on_the_classifier_judged_on_the_defense():
    clf = _clf()
    deployed = Defended(defenses.create("jpeg"), clf)  # no gradient: refused by PGD, fine here
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = clf(x).argmax(1)
    res = attacks.create("transfer", eps=0.1, steps=10)(deployed, x, labels=y, generator=0)
    from prepdefense.draws import DrawKey

    pgd = PGD(eps=0.1, steps=10)(clf, x, labels=y, generator=DrawKey.from_seed(0, 4).child("source"))
    torch.testing.assert_close(res.adversarial, pgd.adversarial)
    assert res.info["source_success"] == pgd.success.tolist()
    with torch.no_grad():
        assert torch.equal(res.success, deployed(res.adversarial).argmax(1) != y)
    assert float((res.adversarial - x).abs().max()) <= 0.1 + 1e-6


def test_batch_size_invariant_on_a_random_defense():
    clf = _clf()
    deployed = Defended(defenses.create("grid-distort"), clf)
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = clf(x).argmax(1)
    a = Transfer(norm="l2", eps=0.05, steps=5)(deployed, x, labels=y, generator=3)
    b = Transfer(norm="l2", eps=0.05, steps=5, batch_size=2)(deployed, x, labels=y, generator=3)
    torch.testing.assert_close(a.adversarial, b.adversarial, rtol=0, atol=1e-5)
    assert torch.equal(a.success, b.success)
