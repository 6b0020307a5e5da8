"""``rand``: Xie et al.'s random resize + pad (PROTOCOL.md "Baseline defenses"; issue 3, item 4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from prepdefense import defenses
from prepdefense.defenses.random_resize_pad import padded_side
from prepdefense.seeding import make_generator


def test_padded_sizes():
    assert padded_side(299) == 331 and padded_side(224) == 248
    d = defenses.create("rand")
    assert d.changes_size and d.randomized
    assert d(torch.rand(2, 3, 299, 299), generator=make_generator(0)).shape == (2, 3, 331, 331)
    assert d(torch.rand(3, 3, 224, 224), generator=make_generator(0)).shape == (3, 3, 248, 248)


def test_pad_value_and_nearest_resize():
    d = defenses.create("rand")
    x = torch.rand(4, 3, 224, 224)
    params = d.sample_params(x, make_generator(3))
    y = d.apply(x, params)
    for n in range(4):
        s, sw = int(params["height"][n]), int(params["width"][n])
        t, l = int(params["top"][n]), int(params["left"][n])
        assert 224 <= s < 248 and 224 <= sw < 248
        assert 0 <= t < 248 - s and 0 <= l < 248 - sw
        inside = torch.zeros(248, 248, dtype=torch.bool)
        inside[t:t + s, l:l + sw] = True
        assert torch.all(y[n][:, ~inside] == 0.5)
        ref = F.interpolate(x[n:n + 1], size=(s, sw), mode="nearest")[0]
        assert torch.equal(y[n][:, t:t + s, l:l + sw], ref)


def test_size_and_offset_distribution():
    d = defenses.create("rand")
    n = 6400
    x = torch.zeros(1, 1, 1, 1).expand(n, 3, 299, 299)  # sample_params only reads the shape
    p = d.sample_params(x, make_generator(99))
    sizes = p["height"]
    assert int(sizes.min()) >= 299 and int(sizes.max()) <= 330
    counts = torch.bincount(sizes - 299, minlength=32).numpy()
    chi2 = ((counts - n / 32) ** 2 / (n / 32)).sum()
    limit = stats.chi2.ppf(1 - 1e-4, df=31)
    print(f"resize sizes chi2 {chi2:.1f} (limit {limit:.1f} at p=1e-4)")
    assert chi2 < limit
    # Offsets: uniform on 0 .. P-s-1, so top / (P - s) is uniform on [0, 1) in expectation 0.5 - 1/(2(P-s)).
    frac = (p["top"].double() + 0.5) / (331 - sizes).double()
    assert abs(float(frac.mean()) - 0.5) < 5 * (1 / 12) ** 0.5 / n**0.5
    assert torch.all(p["top"] < 331 - sizes) and torch.all(p["top"] >= 0)


def test_gradient_flows():
    d = defenses.create("rand")
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    d(x, generator=make_generator(0)).sum().backward()
    assert x.grad is not None and float(x.grad.sum()) > 0


def test_minimum_size_is_the_real_one_and_the_message_says_so():
    """Issue 11, item 5: the canvas round(S*331/299) exceeds S exactly from S = 5 on."""
    from prepdefense.defenses.random_resize_pad import MIN_SIDE

    assert MIN_SIDE == 5
    assert all(padded_side(s) <= s for s in range(1, MIN_SIDE))
    assert all(padded_side(s) > s for s in range(MIN_SIDE, 4097))
    d = defenses.create("rand")
    g = torch.Generator().manual_seed(0)
    for h, w in ((4, 4), (4, 40), (40, 4), (1, 1)):
        with pytest.raises(ValueError) as e:
            d(torch.rand(1, 3, h, w), generator=g)
        msg = str(e.value)
        assert f"input {h}x{w} is too small" in msg and "at least 5" in msg and "\n" not in msg
    for h, w in ((5, 5), (5, 9)):  # the smallest accepted inputs work
        y = d(torch.rand(2, 3, h, w), generator=g)
        assert y.shape == (2, 3, padded_side(h), padded_side(w))
