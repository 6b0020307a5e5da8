"""prepdefense with its peers (issue 12, item 3): defenses inside ART / foolbox / torchattacks
attacks through :mod:`prepdefense.attacks.interop`, and ART / foolbox models under prepdefense's
attacks.

The issue's check: an ART preprocessor built from ``dct-distort`` gives ART's PGD the same
gradient as prepdefense's BPDA on a fixed draw. Then each peer's PGD through its adapter, on the
bare and the defended tiny model, against prepdefense's own PGD at the same budget, all judged
by the same verdict; and prepdefense's PGD / APGD on an ART classifier and a foolbox model that
normalise their input themselves.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prepdefense import attacks, defenses
from prepdefense.attacks.bpda import with_bpda
from prepdefense.attacks.eot import EOT, expectation_gradient
from prepdefense.attacks.interop import (DrawSource, PeerModel, as_art_classifier, as_art_preprocessor,
                                         as_foolbox_model, as_torchattacks_model, from_art_classifier,
                                         from_foolbox_model)
from prepdefense.attacks.interop.adapted import require_peer
from prepdefense.attacks.verdict import evaluate_on_draws
from prepdefense.defenses import Defended
from prepdefense.draws import DrawKey
from prepdefense.models import Normalize

art_classification = pytest.importorskip("art.estimators.classification")
art_evasion = pytest.importorskip("art.attacks.evasion")
fb = pytest.importorskip("foolbox")

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


class TinyNet(nn.Module):
    """32x32, 10 classes, torch's default initialisation under seed 0 (the global RNG is forked
    and restored)."""

    def __init__(self) -> None:
        super().__init__()
        self.input_size, self.num_classes = 32, 10
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.c1, self.c2, self.fc = nn.Conv2d(3, 16, 3, stride=2), nn.Conv2d(16, 32, 3, stride=2), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


@pytest.fixture(scope="module")
def problem():
    net = TinyNet().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    # smooth images (8x8 noise upsampled): the defense changes fewer clean predictions than on white noise
    x = F.interpolate(torch.rand(16, 3, 8, 8, generator=g), size=32, mode="bilinear", align_corners=False)
    return net, x, net(x).argmax(1)


def _onehot(labels: torch.Tensor) -> np.ndarray:
    return np.eye(10, dtype=np.float32)[labels.numpy()]


def _art_classifier(net, pre=None, **kw):
    return art_classification.PyTorchClassifier(
        net, loss=nn.CrossEntropyLoss(), input_shape=(3, 32, 32), nb_classes=10, clip_values=(0.0, 1.0),
        preprocessing_defences=None if pre is None else [pre], device_type="cpu", **kw)


# -- the check: ART's gradient through the preprocessor == prepdefense's BPDA ----------------

def test_art_preprocessor_gives_pgd_the_bpda_gradient_of_a_fixed_draw(problem):
    net, x, y = problem
    dct = defenses.create("dct-distort")
    clf = _art_classifier(net, as_art_preprocessor(dct, generator=7, fixed_draw=True, device_type="cpu"))
    assert clf.all_framework_preprocessing
    theirs = torch.from_numpy(clf.loss_gradient(x.numpy(), _onehot(y)))

    xa = x.clone().requires_grad_(True)
    (ours,) = torch.autograd.grad(F.cross_entropy(with_bpda(Defended(dct, net))(xa, generator=7), y), xa)
    assert ours.abs().max() > 0
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-9)

    # ART's PGD takes that gradient: one step from x (no random start) is x + step * sign(grad)
    pgd = art_evasion.ProjectedGradientDescent(clf, norm=np.inf, eps=8 / 255, eps_step=2 / 255, max_iter=1,
                                               num_random_init=0, batch_size=16, verbose=False)
    assert type(pgd._attack).__name__ == "ProjectedGradientDescentPyTorch"  # the autograd path, not numpy
    adv = torch.from_numpy(pgd.generate(x.numpy(), _onehot(y)))
    torch.testing.assert_close(adv, (x + 2 / 255 * ours.sign()).clamp(0, 1), rtol=0, atol=1e-6)

    # the value is the defense's own on that draw (BPDA changes only the gradient; x + (g(x) - x)
    # rounds in the last bit)
    out, _ = clf.preprocessing_operations[0].forward(x)
    torch.testing.assert_close(out, Defended(dct, nn.Identity())(x, generator=7), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["rand", "fd+rand", "jpeg"])
def test_art_preprocessor_gradient_equals_bpda_for_other_defenses(problem, name):
    """A size-changing defense (rand pads), a chain, a wholly non-differentiable one."""
    net, x, y = problem
    d = defenses.create(name)
    clf = _art_classifier(net, as_art_preprocessor(d, generator=5, fixed_draw=True, device_type="cpu"))
    theirs = torch.from_numpy(clf.loss_gradient(x[:4].numpy(), _onehot(y[:4])))
    xa = x[:4].clone().requires_grad_(True)
    (ours,) = torch.autograd.grad(F.cross_entropy(with_bpda(Defended(d, net))(xa, generator=5), y[:4]), xa)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-9)
    assert clf.predict(x[:4].numpy()).shape == (4, 10)


def test_art_preprocessor_eot_averages_the_per_draw_gradients(problem):
    net, x, y = problem
    dct = defenses.create("dct-distort")
    pre = as_art_preprocessor(dct, eot=4, generator=3, fixed_draw=True, device_type="cpu")
    clf = _art_classifier(net, pre)
    theirs = torch.from_numpy(clf.loss_gradient(x.numpy(), _onehot(y)))

    def per_draw_ce(z):  # (r, N, K) -> (r, N)
        return F.cross_entropy(z.flatten(0, 1), y.repeat(z.shape[0]), reduction="none").view(z.shape[0], -1)

    _, ours, _ = expectation_gradient(with_bpda(Defended(dct, net)), x, DrawKey(3, n=16), 4, per_draw_ce)
    torch.testing.assert_close(theirs, ours / x.shape[0], rtol=1e-4, atol=1e-10)  # ART's loss is a mean over images
    # predict sees one draw per image; ART's numpy-chain path (estimate_forward) is one draw too
    assert clf.predict(x.numpy()).shape == (16, 10)
    assert pre.estimate_forward(x.clone().requires_grad_(True)).shape == x.shape
    assert pre.forward(x.clone().requires_grad_(True))[0].shape == (64, 3, 32, 32)


def test_art_preprocessor_eot_class_gradient_is_the_average_over_draws(problem):
    """ART's ``class_gradient`` sums each class's outputs over the longer (N * eot) batch; through
    the preprocessor it is the EOT average, not ``eot`` times it: equal to the mean of the
    per-draw class gradients, taken one draw at a time with ``eot=1``."""
    net, x, _ = problem
    x = x[:4]
    dct = defenses.create("dct-distort")
    pre = as_art_preprocessor(dct, eot=4, generator=3, fixed_draw=True, device_type="cpu")
    averaged = _art_classifier(net, pre)
    theirs = averaged.class_gradient(x.numpy(), label=2)
    per_draw = []
    for j in range(4):  # draw j of the EOT batch is the call key's ("eot", j) child
        one = as_art_preprocessor(dct, generator=pre.source.key(x.shape[0]).child("eot", j), device_type="cpu")
        per_draw.append(_art_classifier(net, one).class_gradient(x.numpy(), label=2))
    np.testing.assert_allclose(theirs, np.mean(per_draw, axis=0), rtol=1e-4, atol=1e-8)
    values, _ = pre.forward(x.clone().requires_grad_(True))  # the class_gradient path (y None): scaled
    assert torch.equal(values, pre._views(x, 4))  # same values as without the scaling: only the gradient changes
    every_class = averaged.class_gradient(x.numpy())  # label None: ART's loop over the classes
    np.testing.assert_allclose(every_class[:, 2], theirs[:, 0], rtol=1e-5, atol=1e-8)


def test_art_preprocessor_refuses_what_it_cannot_express():
    with pytest.raises(ValueError, match="as_art_classifier"):
        as_art_preprocessor("crop")  # an ensemble defense averages the classifier's softmax
    with pytest.raises(ValueError, match="needs a defense"):
        as_art_preprocessor("none")
    with pytest.raises(ValueError, match="eot must be at least 1"):
        as_art_preprocessor("fd", eot=0)
    with pytest.raises(ValueError, match="fixed draw needs a seed"):
        as_art_preprocessor("rand", fixed_draw=True)
    with pytest.raises(ImportError, match=r"prepdefense\[art\]"):
        require_peer("art_not_installed_xyz", "art", "as_art_preprocessor")


# -- each peer's PGD through its adapter against prepdefense's own ----------------------------------

def _peer_pgds(net, x, y, defense, eps, steps):
    import torchattacks

    step = 2.5 * eps / steps
    out = {}
    _, out["foolbox"], _ = fb.attacks.LinfPGD(abs_stepsize=step, steps=steps, random_start=False)(
        as_foolbox_model(net, defense, generator=1), x, y, epsilons=eps)
    out["torchattacks"] = torchattacks.PGD(as_torchattacks_model(net, defense, generator=2), eps=eps, alpha=step,
                                           steps=steps, random_start=False)(x, y)
    pre = None if defense == "none" else as_art_preprocessor(defense, generator=3, device_type="cpu")
    art_pgd = art_evasion.ProjectedGradientDescent(_art_classifier(net, pre), norm=np.inf, eps=eps, eps_step=step,
                                                   max_iter=steps, num_random_init=0, batch_size=16, verbose=False)
    out["art"] = torch.from_numpy(art_pgd.generate(x.numpy(), _onehot(y)))
    return out


@pytest.mark.parametrize("defense,eps", [("none", 0.002), ("dct-distort", 0.01)])
def test_peer_pgd_through_each_adapter_matches_ours(problem, defense, eps):
    pytest.importorskip("torchattacks")
    net, x, y = problem
    steps = 10
    deployed = net if defense == "none" else Defended(defenses.create(defense), net)
    ours = attacks.create("pgd", eps=eps, steps=steps, step_size=2.5 * eps / steps, random_start=False)(
        with_bpda(deployed), x, labels=y, generator=0).adversarial
    key = DrawKey(5, n=x.shape[0])  # one verdict (10 fresh draws) for every library's images

    def verdict(adv):
        return evaluate_on_draws(deployed, adv, y, None, draws=10, key=key)

    clean, mine = verdict(x)["asr_expected"], verdict(ours)
    assert mine["asr_expected"] >= clean + 0.1, (clean, mine["asr_expected"])  # the attack does something
    assert mine["asr_expected"] <= 0.9  # ... and is not trivially total
    for name, adv in _peer_pgds(net, x, y, defense, eps, steps).items():
        assert (adv - x).abs().max() <= eps + 1e-6, name
        theirs = verdict(adv)
        if defense == "none":  # deterministic: the same path image by image (one image of float slack)
            assert int((theirs["fooled"] != mine["fooled"]).sum()) <= 1, name
        else:  # fresh draws per step in each library: the same strength within 0.1 of ASR
            assert abs(theirs["asr_expected"] - mine["asr_expected"]) <= 0.1, (name, theirs["asr_expected"], mine["asr_expected"])


def test_peer_model_eot_and_fixed_draws_are_prepdefense_eot(problem):
    net, x, y = problem
    peer = as_torchattacks_model(net, "dct-distort", eot=3, generator=11, fixed_draw=True)
    ref = EOT(with_bpda(Defended(defenses.create("dct-distort"), net)), 3)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(F.cross_entropy(peer(xa), y), xa)
    (gb,) = torch.autograd.grad(F.cross_entropy(ref(xb, generator=11), y), xb)
    torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    # a seeded stream: a fresh draw per call, the same stream from the same seed
    a, b = PeerModel(net, "rand", generator=4), PeerModel(net, "rand", generator=4)
    first = a(x)
    assert torch.equal(first, b(x)) and not torch.equal(first, a(x))
    # a fixed DrawKey is for exactly its images
    with pytest.raises(ValueError, match="fixed draw key is for 16 images"):
        DrawSource(DrawKey(0, n=16)).key(8)


def test_art_classifier_holds_an_ensemble_defense(problem):
    net, x, y = problem
    clf = as_art_classifier(net, "crop", generator=0, device_type="cpu")
    assert clf.predict(x[:4].numpy()).shape == (4, 10)
    assert clf.loss_gradient(x[:4].numpy(), _onehot(y[:4])).shape == (4, 3, 32, 32)


# -- prepdefense's attacks on ART and foolbox models -----------------------------------------------

@pytest.mark.parametrize("attack", ["pgd", "apgd-ce"])
def test_our_attacks_on_art_and_foolbox_models_with_their_own_normalisation(problem, attack):
    net, x, y = problem
    reference = Normalize(net, MEAN, STD).eval()  # what both peers' models compute
    art_clf = _art_classifier(net, preprocessing=(np.array(MEAN, dtype=np.float32).reshape(3, 1, 1),
                                                  np.array(STD, dtype=np.float32).reshape(3, 1, 1)))
    fmodel = fb.PyTorchModel(net, bounds=(0, 255), device="cpu",
                             preprocessing=dict(mean=[255 * m for m in MEAN], std=[255 * s for s in STD], axis=-3))
    kw = dict(eps=0.003, steps=5) if attack == "pgd" else dict(eps=0.003, steps=5, restarts=1)
    ours = attacks.create(attack, **kw)(reference, x, labels=y, generator=0)
    assert 0 < int(ours.success.sum()) < x.shape[0]
    for wrapped in (from_art_classifier(art_clf), from_foolbox_model(fmodel, net)):
        assert wrapped.num_classes == 10 and wrapped.input_size == 32
        torch.testing.assert_close(wrapped(x), reference(x), rtol=1e-4, atol=1e-5)
        theirs = attacks.create(attack, **kw)(wrapped, x, labels=y, generator=0)
        assert int((theirs.success != ours.success).sum()) <= 1
        torch.testing.assert_close(theirs.adversarial, ours.adversarial, rtol=0, atol=1e-3)


def test_evaluate_runs_on_art_and_foolbox_models(problem):
    """`evaluate`'s ensemble on a peer's model (its own normalisation) gives the verdict it gives
    on the same torch model (issue 12, item 3)."""
    from prepdefense.attacks import ensemble

    net, x, y = problem
    reference = Normalize(net, MEAN, STD).eval()
    art_clf = _art_classifier(net, preprocessing=(np.array(MEAN, dtype=np.float32).reshape(3, 1, 1),
                                                  np.array(STD, dtype=np.float32).reshape(3, 1, 1)))
    fmodel = fb.PyTorchModel(net, bounds=(0, 1), device="cpu", preprocessing=dict(mean=list(MEAN), std=list(STD), axis=-3))
    kw = dict(labels=y[:6], norm="linf", eps=0.003, budget="smoke", generator=0, with_curve=False, checks=False)
    ours = ensemble.evaluate(reference, x[:6], **kw)
    for wrapped in (from_art_classifier(art_clf), from_foolbox_model(fmodel, net)):
        theirs = ensemble.evaluate(wrapped, x[:6], **kw)
        assert theirs.n == ours.n == 6 and [r["attack"] for r in theirs.per_attack] == [r["attack"] for r in ours.per_attack]
        assert abs(theirs.robust["robust_accuracy_worst"] - ours.robust["robust_accuracy_worst"]) <= 1 / 6 + 1e-9


def test_from_art_classifier_averages_an_eot_preprocessor_and_refuses_numpy_chains(problem):
    net, x, y = problem
    art_preprocessor = pytest.importorskip("art.defences.preprocessor")
    pre = as_art_preprocessor("dct-distort", eot=2, generator=5, fixed_draw=True, device_type="cpu")
    wrapped = from_art_classifier(_art_classifier(net, pre))
    xa = x.clone().requires_grad_(True)
    assert wrapped(xa).shape == (16, 10)  # the 2 draws per image averaged back to one row
    with pytest.raises(ValueError, match="every preprocessing step"):
        from_art_classifier(_art_classifier(net, art_preprocessor.JpegCompression(clip_values=(0, 1), channels_first=True)))
    with pytest.raises(TypeError, match="foolbox model"):
        from_foolbox_model(net)


def test_foolbox_model_in_other_bounds_and_importing_needs_no_peer(problem):
    net, x, _ = problem
    fmodel = as_foolbox_model(net, "fd", bounds=(0, 255))
    assert tuple(fmodel.bounds) == (0, 255)
    torch.testing.assert_close(fmodel(255 * x), Defended(defenses.create("fd"), net)(x), rtol=1e-5, atol=1e-6)
    import subprocess
    import sys

    code = ("import sys, prepdefense.attacks.interop, prepdefense.attacks; "
            "print(sorted(m for m in ('art', 'foolbox', 'torchattacks') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.slow
def test_peer_pgd_on_the_default_model_through_dct_distort(model, imagenet_sample_dir):
    """ART's and foolbox's PGD through the adapters against ours on EfficientNet-Lite0 and 8
    sample images, one verdict of 10 fresh draws: the same strength within 0.15 of ASR."""
    from prepdefense import data

    for p in model.parameters():
        p.requires_grad_(False)
    s = data.protocol_sample(model, imagenet_sample_dir, n=8, seed=0, batch_size=8)
    x, y = s.x, s.labels
    eps, steps = 2 / 255, 10
    step = 2.5 * eps / steps
    deployed = Defended(defenses.create("dct-distort"), model)
    ours = attacks.create("pgd", eps=eps, steps=steps, step_size=step, random_start=False)(
        with_bpda(deployed), x, labels=y, generator=0).adversarial
    _, fadv, _ = fb.attacks.LinfPGD(abs_stepsize=step, steps=steps, random_start=False)(
        as_foolbox_model(model, "dct-distort", generator=1), x, y, epsilons=eps)
    clf = art_classification.PyTorchClassifier(
        model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=1000, clip_values=(0.0, 1.0),
        preprocessing_defences=[as_art_preprocessor("dct-distort", generator=3, device_type="cpu")], device_type="cpu")
    aadv = torch.from_numpy(art_evasion.ProjectedGradientDescent(
        clf, norm=np.inf, eps=eps, eps_step=step, max_iter=steps, num_random_init=0, batch_size=8, verbose=False
    ).generate(x.numpy(), np.eye(1000, dtype=np.float32)[y.numpy()]))
    key = DrawKey(5, n=x.shape[0])
    mine = evaluate_on_draws(deployed, ours, y, None, draws=10, key=key)["asr_expected"]
    clean = evaluate_on_draws(deployed, x, y, None, draws=10, key=key)["asr_expected"]
    assert mine >= clean + 0.1, (clean, mine)
    for name, adv in (("foolbox", fadv), ("art", aadv)):
        theirs = evaluate_on_draws(deployed, adv, y, None, draws=10, key=key)["asr_expected"]
        print(f"{name}: ASR {theirs:.3f} vs ours {mine:.3f} (clean {clean:.3f})")
        assert abs(theirs - mine) <= 0.15, (name, theirs, mine)
