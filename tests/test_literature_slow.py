"""Literature checks (issue 4, item 10; Athalye et al. 2018): BPDA breaks ``jpeg`` and ``bdr``
(<= 5% robust accuracy) and BPDA+EOT breaks ``rand`` (<= 10%), Linf 8/255, untargeted, on
>= 20 correctly classified images of the shared ImageNet sample, with the ``adaptive`` attack
(PGD with BPDA, plus EOT for the random defense), judged on fresh draws (expected accuracy).

Slow (marked ``slow``). Budgets can be lowered for a quick look with environment variables
``PREPDEFENSE_LIT_N`` (images, default 20), ``PREPDEFENSE_LIT_STEPS`` (PGD steps, default 100)
and ``PREPDEFENSE_LIT_EOT`` (draws for ``rand``, default 30); results are printed so they can
be copied into ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import os

import pytest
import torch

from prepdefense import data, defenses, seeding
from prepdefense.attacks.adaptive import AdaptiveAttack
from prepdefense.defenses import Defended
from prepdefense.metrics import PAPER_LINF_BOUND, linf

pytestmark = pytest.mark.slow

N = int(os.environ.get("PREPDEFENSE_LIT_N", "20"))
STEPS = int(os.environ.get("PREPDEFENSE_LIT_STEPS", "100"))
EOT_DRAWS = int(os.environ.get("PREPDEFENSE_LIT_EOT", "30"))


@pytest.fixture(scope="module")
def sample(model, imagenet_sample_dir):
    return data.protocol_sample(model, imagenet_sample_dir, n=N, seed=0)


@pytest.mark.parametrize(
    "defense_name,eot,max_accuracy",
    [("jpeg", 1, 0.05), ("bdr", 1, 0.05), ("rand", EOT_DRAWS, 0.10)],
)
def test_bpda_breaks_the_literature_defenses(model, sample, defense_name, eot, max_accuracy):
    assert N >= 20 or os.environ.get("PREPDEFENSE_LIT_N"), "the literature check needs >= 20 images"
    defended = Defended(defenses.create(defense_name), model)
    attack = AdaptiveAttack(norm="linf", eps=PAPER_LINF_BOUND, steps=STEPS, eot=eot, draws=10, losses=("ce", "margin"), batch_size=10)
    res = attack(defended, sample.x, labels=sample.labels, targets=None, generator=seeding.make_generator(0))
    info = res.info
    print(
        f"\n{defense_name}: robust accuracy expected {info['robust_accuracy_expected']:.3f} "
        f"{tuple(round(v, 3) for v in info['robust_accuracy_expected_ci95'])}, worst case "
        f"{info['robust_accuracy_worst']:.3f}, over {info['draws']} draws, {N} images, {STEPS} steps, EOT {eot}"
    )
    assert float(linf(res.adversarial, sample.x).max()) <= PAPER_LINF_BOUND + 1e-6
    assert info["robust_accuracy_expected"] <= max_accuracy
