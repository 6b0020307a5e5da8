"""``bdr``: bit-depth reduction to 3 bits (Xu et al. 2018; PROTOCOL.md "Baseline defenses")."""

from __future__ import annotations

import torch

from prepdefense import defenses
from prepdefense.defenses.bit_depth import reduce_bit_depth


def test_exact_values_at_3_bits():
    x = torch.tensor([0.0, 0.07, 0.08, 0.2, 0.5, 0.93, 1.0]).view(1, 1, 1, -1)
    # round(x * 7): 0, 0.49 -> 0, 0.56 -> 1, 1.4 -> 1, 3.5 -> 4 (half to even), 6.51 -> 7, 7
    expected = torch.tensor([0, 0, 1, 1, 4, 7, 7], dtype=torch.float32).view(1, 1, 1, -1) / 7
    assert torch.equal(defenses.create("bdr")(x), expected)


def test_levels_and_other_bit_depths():
    x = torch.rand(2, 3, 20, 20)
    assert defenses.create("bdr")(x).unique().numel() <= 8
    assert set(reduce_bit_depth(x, 1).unique().tolist()) <= {0.0, 1.0}
    y = defenses.create("bdr", bits=8)(x)
    assert torch.equal(y, torch.round(x * 255) / 255)


def test_idempotent_and_deterministic():
    d = defenses.create("bdr")
    x = torch.rand(1, 3, 9, 9)
    assert torch.equal(d(d(x)), d(x))
    assert not d.randomized and not d.differentiable
