"""Square Attack (Andriushchenko et al. 2020): the ball, reproducibility, batch invariance, EOT
acceptance, a non-differentiable defense as deployed, and its strength on the default model
(issue 10, item 2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prepdefense import attacks, defenses
from prepdefense.attacks.square import Square, eta_pattern, p_schedule
from prepdefense.defenses import Defended


def _tiny(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 10))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m.eval()


def _batch(n=6, seed=1, size=12):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_schedule_and_pattern():
    assert p_schedule(0.8, 0, 1000) == 0.8
    assert p_schedule(0.8, 1000, 10000) == pytest.approx(0.8 / 16)
    assert p_schedule(0.8, 999, 1000) == pytest.approx(0.8 / 512)
    for s in (1, 3, 5, 8):
        eta = eta_pattern(s)
        assert eta.shape == (s, s) and float(eta.norm()) == pytest.approx(1.0)
    assert float(eta_pattern(5)[:2].sum()) > 0 > float(eta_pattern(5)[2:].sum())  # two halves of opposite sign


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.05)])
def test_stays_in_the_ball_and_improves(norm, eps):
    m = _tiny()
    x = _batch(8)
    y = m(x).argmax(1)
    res = Square(norm=norm, eps=eps, queries=150)(m, x, labels=y, generator=0)
    d = res.adversarial - x
    if norm == "linf":
        assert float(d.abs().max()) <= eps + 1e-6
    else:
        assert float((d.flatten(1).norm(dim=1) / x[0].numel() ** 0.5).max()) <= eps + 1e-6
    assert res.adversarial.min() >= 0 and res.adversarial.max() <= 1
    with torch.no_grad():
        assert torch.equal(res.success, m(res.adversarial).argmax(1) != y)
        margin = lambda z: z.gather(1, y[:, None]).squeeze(1) - z.scatter(1, y[:, None], -1e9).amax(1)  # noqa: E731
        assert (margin(m(res.adversarial)) <= margin(m(x)) + 1e-6).all()  # never worse than the start
    assert max(res.info["queries"]) <= 150


def test_reproducible_and_batch_size_invariant():
    m = _tiny()
    x = _batch(5)
    y = m(x).argmax(1)
    for norm in ("linf", "l2"):
        whole = Square(norm=norm, eps=0.05, queries=40)(m, x, labels=y, generator=2)
        again = Square(norm=norm, eps=0.05, queries=40)(m, x, labels=y, generator=2)
        split = Square(norm=norm, eps=0.05, queries=40, batch_size=2)(m, x, labels=y, generator=2)
        assert torch.equal(whole.adversarial, again.adversarial)
        torch.testing.assert_close(split.adversarial, whole.adversarial, rtol=0, atol=1e-6)
        assert whole.info["queries"] == split.info["queries"]
        other = Square(norm=norm, eps=0.05, queries=40)(m, x, labels=y, generator=3)
        assert not torch.equal(other.adversarial, whole.adversarial)


def test_works_through_a_non_differentiable_defense_and_targeted():
    """No gradient is needed: jpeg (no gradient) is attacked as deployed, and odd image sizes work."""
    m = _tiny()
    model = Defended(defenses.create("jpeg"), m)
    x = _batch(3, size=13)
    with torch.no_grad():
        y = model(x).argmax(1)
        t = model(x).topk(2, dim=1).indices[:, 1]
    res = attacks.create("square", eps=0.1, queries=30)(model, x, labels=y, targets=t, generator=0)
    assert res.adversarial.shape == x.shape and float((res.adversarial - x).abs().max()) <= 0.1 + 1e-6
    with torch.no_grad():
        assert torch.equal(res.success, model(res.adversarial).argmax(1) == t)


def test_eot_acceptance_on_a_random_defense():
    """Each query averages ``eot`` draws of the key; the run repeats and ignores the batch."""
    m = _tiny()
    model = Defended(defenses.create("grid-distort"), m)
    x = _batch(4)
    with torch.no_grad():
        y = model(x, generator=0).argmax(1)
    kw = dict(eps=0.05, queries=15, eot=3)
    a = Square(**kw)(model, x, labels=y, generator=1)
    b = Square(batch_size=3, **kw)(model, x, labels=y, generator=1)
    torch.testing.assert_close(a.adversarial, b.adversarial, rtol=0, atol=1e-6)
    assert all(0 <= f <= 1 for f in a.info["attack_draw_success_frequency"])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="queries"):
        Square(queries=0)
    with pytest.raises(ValueError, match="p_init"):
        Square(p_init=0)


@pytest.mark.slow
def test_fools_the_default_model_at_8_of_255(model, imagenet_sample_dir, capsys):
    """The issue's check: Square alone at Linf 8/255 fools >= 80% of 10 images in 1000 queries."""
    from prepdefense import data

    torch.set_num_threads(1)
    s = data.protocol_sample(model, imagenet_sample_dir, n=10, seed=0, batch_size=10)
    res = Square(norm="linf", eps=8 / 255, queries=1000)(model, s.x, labels=s.labels, generator=0)
    with capsys.disabled():
        print(f"\nSquare Linf 8/255, 1000 queries: fooled {int(res.success.sum())}/10; queries used {res.info['queries']}")
    assert float((res.adversarial - s.x).abs().max()) <= 8 / 255 + 1e-6
    assert int(res.success.sum()) >= 8
