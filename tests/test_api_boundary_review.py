"""What a newcomer's review of the library API found on a toy model (2026-11-30): inputs that
got past the boundary and gave a raw torch error, a wrong number, or an unseeded run. Each
test feeds the case and checks the one-line error, the warning or the right value."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from prepdefense import attacks, defenses, metrics
from prepdefense.attacks.eot import EOT
from prepdefense.draws import image_id
from prepdefense.defenses import Defended
from toy_models import TinyConvNet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def toy():
    net = TinyConvNet().eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, y


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16])
@pytest.mark.parametrize("name, kw", [("pgd", dict(steps=2)), ("square", dict(queries=5)), ("cw", dict(steps=2, binary_search_steps=1))])
def test_integer_labels_of_any_dtype_give_the_int64_result(toy, dtype, name, kw):
    """Was: int32 / uint8 labels passed the check, then torch's loss raised 'expected ... Long'."""
    net, x, y = toy
    attack = attacks.create(name, **kw)
    a = attack(net, x, labels=y.to(dtype), generator=0)
    b = attack(net, x, labels=y, generator=0)
    assert torch.equal(a.adversarial, b.adversarial)
    assert torch.equal(a.success, b.success)


def test_cw_leaves_no_gradient_on_the_users_model(toy):
    """Was: C&W's loss.backward() filled .grad on every parameter of the user's model."""
    net, x, y = toy
    for p in net.parameters():
        p.grad = None
    attacks.create("cw", steps=3, binary_search_steps=1)(net, x, labels=y)
    assert all(p.grad is None for p in net.parameters())
    zeros = [torch.zeros_like(p) for p in net.parameters()]
    for p, z in zip(net.parameters(), zeros):
        p.grad = z.clone()
    attacks.create("cw", steps=3, binary_search_steps=1)(net, x, labels=y)
    assert all(torch.equal(p.grad, z) for p, z in zip(net.parameters(), zeros))


@pytest.mark.parametrize("defense, attack", [(d, a) for d in ("rand", "fd", "jpeg") for a in ("pgd", "bpda", "square")
                                             if a != "square" or d == "rand"])  # square needs no gradient
def test_a_defense_inside_sequential_is_refused_naming_defended(toy, defense, attack):
    """Was: nn.Sequential(rand, net) ran with the generator ignored (and EOT and the verdict
    saw a deterministic model); nn.Sequential(fd, net) gave torch's raw graph error."""
    net, x, y = toy
    kw = {"pgd": dict(steps=1), "bpda": dict(rounds=1), "square": dict(queries=2)}[attack]
    with pytest.raises(ValueError, match=r"Defended\(defense, classifier\)") as err:
        attacks.create(attack, **kw)(nn.Sequential(defenses.create(defense), net), x, labels=y, generator=0)
    assert "\n" not in str(err.value) and "'0'" in str(err.value)


def test_a_random_defended_model_nested_in_a_wrapper_is_refused(toy):
    net, x, y = toy
    wrapper = nn.Sequential(Defended(defenses.create("rand"), net))
    with pytest.raises(ValueError, match="random"):
        attacks.create("pgd", steps=1)(wrapper, x, labels=y, generator=0)


def test_deterministic_differentiable_parts_and_the_top_defended_model_pass(toy):
    net, x, y = toy
    attacks.create("pgd", steps=1)(nn.Sequential(defenses.create("none"), net), x, labels=y)
    attacks.create("pgd", steps=1, eot=2)(Defended(defenses.create("rand"), net), x, labels=y, generator=0)
    attacks.create("pgd", steps=1)(EOT(Defended(defenses.create("rand"), net), 2), x, labels=y, generator=0)


@pytest.mark.parametrize("name, kw", [("deepfool", dict(steps=3)), ("cw", dict(steps=3, binary_search_steps=1)),
                                      ("lbfgs", dict(max_iterations=3, binary_search_steps=1))])
def test_deepfool_cw_lbfgs_draw_a_random_model_from_the_key(toy, name, kw):
    """Was: they called model(x) without the key, so a random defense drew fresh, unseeded."""
    net, x, y = toy
    model = Defended(defenses.create("grid-distort"), net)
    attack = attacks.create(name, **kw)
    runs = [attack(model, x, labels=y, generator=s) for s in (3, 3, 4)]
    evaluations = [r.info.get("function_evaluations") for r in runs]  # L-BFGS may return x itself
    assert torch.equal(runs[0].adversarial, runs[1].adversarial) and evaluations[0] == evaluations[1]
    assert not torch.equal(runs[0].adversarial, runs[2].adversarial) or evaluations[0] != evaluations[2]


@pytest.mark.parametrize("x_dtype, model_dtype", [(torch.float64, torch.float32), (torch.float16, torch.float32),
                                                 (torch.float32, torch.float64)])
def test_a_dtype_mismatch_names_both_dtypes(toy, x_dtype, model_dtype):
    net, x, y = toy
    with pytest.raises(TypeError, match=f"x has dtype {x_dtype}.*{model_dtype}"):
        attacks.create("pgd", steps=1)(net.to(model_dtype), x.to(x_dtype), labels=y)


def test_a_model_that_casts_its_input_itself_is_not_refused(toy):
    net, x, y = toy

    class Casting(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t):
            return self.net(t.float())

    res = attacks.create("pgd", steps=1)(Casting(), x.double(), labels=y)
    assert res.adversarial.dtype == torch.float64


def test_probabilities_instead_of_logits_get_a_warning(toy):
    net, x, y = toy
    with pytest.warns(UserWarning, match="probability"):
        attacks.create("pgd", steps=1)(nn.Sequential(net, nn.Softmax(dim=1)), x, labels=y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attacks.create("pgd", steps=1)(net, x, labels=y)
        attacks.create("pgd", steps=1)(nn.Sequential(net, nn.LogSoftmax(dim=1)), x, labels=y)


def test_names_as_ids_follow_the_images(toy):
    """Was: ids=['a.png', 'b.png'] (what data.load_images returns) gave 'too many dimensions'."""
    net, x, y = toy
    model = Defended(defenses.create("rand"), net)
    pgd = attacks.create("pgd", steps=2, eot=2)
    by_name = pgd(model, x, labels=y, generator=0, ids=["a.png", "b.png"])
    by_id = pgd(model, x, labels=y, generator=0, ids=torch.tensor([image_id("a.png"), image_id("b.png")]))
    swapped = pgd(model, x.flip(0), labels=y.flip(0), generator=0, ids=["b.png", "a.png"])
    assert torch.equal(by_name.adversarial, by_id.adversarial)
    assert torch.equal(by_name.adversarial, swapped.adversarial.flip(0))


@pytest.mark.parametrize("ids, error", [([1.5, 2.0], TypeError), (torch.tensor([1.0, 2.0]), TypeError), ([0, -1], ValueError),
                                        ([0], ValueError), ("ab", TypeError), ([True, False], TypeError)])
def test_bad_ids_are_refused(toy, ids, error):
    net, x, y = toy
    with pytest.raises(error, match="ids must be"):
        attacks.create("pgd", steps=1)(net, x, labels=y, ids=ids)


@pytest.mark.parametrize("name, kw, match", [
    ("pgd", dict(steps=0), "steps must be >= 1"), ("bim", dict(steps=0), "steps must be >= 1"),
    ("mi-fgsm", dict(steps=0), "steps must be >= 1"), ("pgd", dict(steps=2.7), "whole number"),
    ("apgd-ce", dict(steps=2.5), "whole number"), ("square", dict(queries=True), "whole number"),
    ("cw", dict(binary_search_steps=0.5), "whole number"), ("pgd", dict(eps=8), r"eps=8 .*8/255"),
    ("apgd-ce", dict(norm="l2", eps=17.9), r"RMS 0\.05"), ("square", dict(eps=float("inf")), "unbounded"),
    ("fgsm", dict(eps=-0.1), "positive"), ("pgd", dict(eps="0.03"), "must be a number"),
    ("bpda", dict(rounds=0), "rounds must be >= 1"), ("deepfool", dict(candidates=1), "candidates must be >= 2"),
])
def test_hyperparameters_are_checked_when_the_attack_is_built(name, kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        attacks.create(name, **kw)


def test_integral_floats_and_numpy_numbers_are_accepted():
    import numpy as np

    assert attacks.create("pgd", steps=4.0, eps=np.float32(0.03)).steps == 4
    assert attacks.create("bpda", eps=None).eps == metrics.PAPER_L2_BOUND


@pytest.mark.parametrize("name", ["cw", "deepfool", "lbfgs"])
def test_batch_size_is_common_to_all_attacks(toy, name):
    net, x, y = toy
    kw = {"cw": dict(steps=2, binary_search_steps=1), "deepfool": dict(steps=2), "lbfgs": dict(max_iterations=2, binary_search_steps=1)}[name]
    whole = attacks.create(name, **kw)(net, x, labels=y)
    one = attacks.create(name, batch_size=1, **kw)(net, x, labels=y)
    assert one.adversarial.shape == x.shape
    if name != "lbfgs":  # L-BFGS-B optimises the batch's joint objective, so its batch matters
        torch.testing.assert_close(one.adversarial, whole.adversarial, atol=1e-4, rtol=0)  # float rounding of tanh space


def test_distances_refuse_0_255_images_and_accuracy_refuses_one_column():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="divide 0..255"):
        metrics.l2_rms(x * 255, x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        metrics.linf(x, torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="one column"):
        metrics.accuracy(torch.tensor([[1], [2]]), torch.tensor([1, 2]))
    assert metrics.accuracy(torch.tensor([1, 2]), torch.tensor([1, 0])) == 0.5
    with pytest.raises(TypeError, match=r"shape \(2,\), got list"):
        metrics.accuracy(torch.zeros(2, 5), [1, 2])


def test_defended_refuses_a_name_with_the_fix(toy):
    net, _, _ = toy
    with pytest.raises(TypeError, match=r"defenses\.create\('fd'\)"):
        Defended("fd", net)
    with pytest.raises(TypeError, match="got int"):
        Defended(3, net)


def test_a_normalised_batch_is_told_to_undo_the_normalisation(toy):
    net, x, y = toy
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with pytest.raises(ValueError, match="undo the normalisation"):
        attacks.create("pgd", steps=1)(net, (x - mean) / std, labels=y)


def test_peer_model_with_a_defense_is_attacked_not_refused(toy):
    """A PeerModel (the peer adapters' model) runs its defense behind BPDA and takes
    generator=: the nested-defense check must not refuse it."""
    from prepdefense.attacks.interop.adapted import PeerModel

    net, x, y = toy
    for defense in ("jpeg", "dct-distort"):
        res = attacks.create("pgd", steps=1)(PeerModel(net, defense, generator=1), x, labels=y, generator=0)
        assert res.adversarial.shape == x.shape


def test_gradient_free_attacks_take_a_fixed_non_differentiable_defense_anywhere(toy):
    net, x, y = toy
    model = nn.Sequential(defenses.create("fd"), net)
    attacks.create("square", queries=3)(model, x, labels=y, generator=0)
    attacks.create("spsa", steps=1, samples=2)(model, x, labels=y, generator=0)
    with pytest.raises(ValueError, match="random") as err:  # a random one stays refused: its draws go unseeded
        attacks.create("square", queries=3)(nn.Sequential(defenses.create("rand"), net), x, labels=y, generator=0)
    assert "not differentiable" not in str(err.value)


def test_a_wrapped_defended_model_is_told_to_pass_it_unwrapped(toy):
    net, x, y = toy
    with pytest.raises(ValueError, match="pass the Defended model itself"):
        attacks.create("pgd", steps=1)(nn.DataParallel(Defended(defenses.create("rand"), net)), x, labels=y)


def test_a_shape_error_is_not_blamed_on_the_dtype(toy):
    """The fd table is a float64 buffer: a failing pass for another reason must keep torch's own error."""
    _, x, y = toy

    class NeedsFour(nn.Module):
        def forward(self, t):
            return t.flatten(1) @ torch.ones(5, 10)

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        attacks.create("square", queries=2)(Defended(defenses.create("fd"), NeedsFour()), x, labels=y)


def test_counts_given_as_tensors_or_to_the_ensemble_and_adapters_are_checked(toy):
    from prepdefense.attacks.ensemble import EnsembleAttack
    from prepdefense.attacks.interop.adapted import PeerModel
    from prepdefense.validation import check_int

    net, _, _ = toy
    assert check_int(torch.tensor(3.0), "steps") == 3
    with pytest.raises(ValueError, match="whole number"):
        check_int(torch.tensor(2.5), "steps")
    with pytest.raises(ValueError, match="whole number"):
        attacks.create("spsa", samples=2, queries=300.9)
    with pytest.raises(ValueError, match="whole number"):
        PeerModel(net, "rand", eot=2.9)
    with pytest.raises(ValueError, match="whole number"):
        EnsembleAttack("apgd-ce", eot=2.5)


def test_evaluate_refuses_a_radius_in_0_255_units_as_a_usage_error(capsys):
    from prepdefense.cli.main import main

    assert main(["evaluate", "--defense", "jpeg", "--norm", "linf", "--eps", "8", "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert "--eps" in err and "8/255" in err and "Traceback" not in err
