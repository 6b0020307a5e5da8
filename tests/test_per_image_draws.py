"""Draws are data, per image (issue 9, items 1 and 2).

* A random defense's draw for an image depends only on (seed, the image's id, draw index):
  the same key gives identical per-image outputs whatever the batch size, the batch's other
  images or the order; the same holds for whole attacks.
* Every registered defense declares its stages, and ``apply`` equals applying them in turn.
* A draw is data: it can be sliced, saved, loaded and replayed, through ``Defended`` and
  ``EOT`` too, and BPDA runs each stage of the defense exactly once.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prepdefense import attacks, defenses
from prepdefense.attacks.bpda import BPDA
from prepdefense.attacks.eot import EOT
from prepdefense.defenses import Defended
from prepdefense.draws import DRAW_SCHEME, DrawKey, Params, as_key, image_id

SIDE = 32
RANDOM = [n for n in defenses.names() if defenses.create(n).randomized]


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, SIDE, SIDE, generator=g)


def _tiny_model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def _batched(fn, x: torch.Tensor, key: DrawKey, size: int) -> torch.Tensor:
    return torch.cat([fn(x[s : s + size], key.select(slice(s, s + size))) for s in range(0, x.shape[0], size)])


def test_random_defenses_are_listed():
    for name in ("dct-distort", "rand", "crop", "grid-distort", "pd", "tv", "shield"):
        assert name in RANDOM


@pytest.mark.parametrize("name", RANDOM)
def test_batch_size_does_not_change_any_image(name):
    """Batch sizes 1, 3 and 16 give identical per-image outputs (the issue's check)."""
    d = defenses.create(name)
    x = _images(16)
    key = DrawKey.from_seed(7, 16, ids=[image_id(f"img{i}.png") for i in range(16)])
    whole = d(x, generator=key)
    for size in (1, 3):
        assert torch.equal(_batched(lambda xs, k: d(xs, generator=k), x, key, size), whole), size
    # the images' order and company do not matter either: a permuted batch permutes the outputs
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(d(x[perm], generator=key.select(perm)), whole[perm])


@pytest.mark.parametrize("name", RANDOM)
def test_draw_depends_on_seed_id_and_index(name):
    d = defenses.create(name)
    x = _images(4)
    key = DrawKey.from_seed(3, 4)
    a = d(x, generator=key)
    assert not torch.equal(a, d(x, generator=DrawKey.from_seed(4, 4)))  # another seed
    assert not torch.equal(a, d(x, generator=key.child("eot", 1)))  # another draw index
    shifted = DrawKey.from_seed(3, 4, ids=[10, 11, 12, 13])  # other ids
    assert not torch.equal(a, d(x, generator=shifted))


@pytest.mark.parametrize("name", defenses.names() + ["fd+rand", "dct-quant+grid-distort"])
def test_apply_equals_its_declared_stages(name):
    d = defenses.create(name)
    x = _images(3)
    params = d.sample_params(x, DrawKey.from_seed(0, 3))
    if d.stages():
        assert torch.equal(d.apply(x, params), d.apply_stages(x, params))
        for stage_name, stage in d.stages():
            assert isinstance(stage, defenses.Defense), stage_name
    assert (params is None) == (not d.randomized)


def test_draw_saved_and_replayed(tmp_path):
    d = defenses.create("dct-distort")
    x = _images(5)
    params = d.sample_params(x, DrawKey.from_seed(11, 5))
    params.save(tmp_path / "draw.pt")
    loaded = Params.load(tmp_path / "draw.pt")
    assert torch.equal(d.apply(x, loaded), d.apply(x, params))
    # a sub-batch of the draw replays those images
    idx = torch.tensor([1, 3])
    assert torch.equal(d.apply(x[idx], loaded.select(idx)), d.apply(x, params)[idx])
    # the key itself is a record too
    key = DrawKey.from_seed(11, 5).child("verdict", 2)
    assert DrawKey.from_dict(key.to_dict()) == key and key.to_dict()["scheme"] == DRAW_SCHEME


def test_defended_and_eot_draws_are_data():
    model = Defended(defenses.create("fd+rand"), _tiny_model())
    x = _images(4)
    key = DrawKey.from_seed(2, 4)
    params = model.sample_params(x, key)
    assert torch.equal(model.apply(x, params), model(x, generator=key))
    eot = EOT(model, 3, reduce="none")
    per_draw = eot(x, generator=key)
    manual = torch.stack([model(x, generator=key.child("eot", i)) for i in range(3)])
    torch.testing.assert_close(per_draw, manual)  # one classifier call for the draws: float rounding only
    eot_params = eot.sample_params(x, key)
    assert torch.equal(eot.apply(x, eot_params), per_draw)


class _Counting(defenses.Defense):
    """Wraps a defense and counts its ``apply`` calls."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0
        self.randomized, self.differentiable = inner.randomized, inner.differentiable

    def draw(self, x, generator):
        return self.inner.draw(x, generator)

    def apply(self, x, params):
        self.calls += 1
        return self.inner.apply(x, params)


def test_bpda_runs_each_stage_once_from_the_declaration():
    d = defenses.create("dct-distort")
    q, g = _Counting(d.quantize), _Counting(d.distort)
    d.stages = lambda: (("quantize", q), ("distort", g))  # the declaration is all BPDA reads
    x = _images(3).requires_grad_(True)
    out = BPDA(d)(x, generator=DrawKey.from_seed(0, 3))
    assert (q.calls, g.calls) == (1, 1)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad.flatten(1).abs().amax(1) > 0).all()


@pytest.mark.parametrize("attack_name,kw", [
    ("adaptive", dict(norm="linf", eps=8 / 255, steps=3, eot=2, draws=3)),
    ("pgd", dict(steps=3, eot=2)),
    ("bpda-eot", dict(rounds=3, eot=2)),
])
@pytest.mark.parametrize("defense_name", ["dct-distort", "rand", "crop"])
def test_attack_results_do_not_depend_on_batch_size(attack_name, kw, defense_name):
    """The same seed with batch sizes 1, 3 and 16 gives identical attack results."""
    from prepdefense.attacks.bpda import with_bpda

    torch.manual_seed(0)  # test-only: nothing random should read it
    defense = defenses.create(defense_name, **({"ensemble": 2} if defense_name == "crop" else {}))
    model = Defended(defense, _tiny_model())
    if attack_name == "pgd":
        model = with_bpda(model)
    x = _images(16, seed=5)
    labels = model(x, generator=0).argmax(1) if model.randomized else model(x).argmax(1)
    targets = (labels + 1) % 10 if attack_name == "bpda-eot" else None
    ids = [image_id(f"n{i:04d}.jpg") for i in range(16)]
    results = []
    for size in (1, 3, 16):
        attack = attacks.create(attack_name, **kw)
        attack.batch_size = size
        results.append(attack(model, x, labels=labels, targets=targets, generator=123, ids=ids))
    for r in results[1:]:
        torch.testing.assert_close(r.adversarial, results[0].adversarial, rtol=0, atol=1e-5)
        assert torch.equal(r.success.cpu(), results[0].success.cpu())
    if attack_name == "adaptive":
        assert results[1].info["robust_accuracy_worst"] == results[0].info["robust_accuracy_worst"]


def test_as_key_forms():
    assert len(as_key(5, 3)) == 3 and as_key(5, 3) == DrawKey(5, n=3)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert as_key(g1, 2) == as_key(g2, 2)
    with pytest.raises(ValueError, match="draw key for 3 images"):
        as_key(DrawKey(0, n=3), 4)
    with pytest.raises(TypeError):
        as_key("seed", 2)
