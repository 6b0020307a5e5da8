"""`Defended(..., defend_at=S)` (issue 15, item 3): the defense runs at side S, the model at
its own input size; draws are made for the defended size; BPDA keeps the setting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prepdefense import defenses
from prepdefense.attacks.bpda import with_bpda
from prepdefense.defenses.defended import Defended, resize_images


class SizedModel(nn.Module):
    """A classifier that accepts only its declared input size."""

    def __init__(self, input_size: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.input_size = input_size
        self.fc = nn.Linear(3 * input_size * input_size, classes)
        torch.manual_seed(0)

    def forward(self, x):
        assert x.shape[-2:] == (self.input_size, self.input_size), x.shape
        return self.fc(x.flatten(1))


@pytest.fixture
def x():
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["dct-distort", "jpeg", "tv", "rand"])
def test_defended_at_a_larger_side_equals_the_composition(name, x):
    model = SizedModel()
    d = defenses.create(name)
    deployed = Defended(d, model, defend_at=24)
    params = deployed.sample_params(x, 7)
    if params is not None and "mask" in params:  # tv draws its mask for the defended size
        assert params["mask"].shape[-2:] == (24, 24)
    expected = model(resize_images(d.run(resize_images(x, (24, 24)), params), (16, 16)))
    assert torch.allclose(deployed.apply(x, params), expected)
    assert torch.equal(deployed(x, generator=7), deployed.apply(x, params))


def test_default_defends_at_the_input_size(x):
    model = SizedModel()
    d = defenses.create("jpeg")
    assert torch.equal(Defended(d, model)(x), model(d(x)))


def test_without_a_declared_size_the_output_goes_back_to_the_input_size(x):
    seen = []

    class Any(nn.Module):
        def forward(self, t):
            seen.append(tuple(t.shape[-2:]))
            return t.mean(dim=(2, 3))

    Defended(defenses.create("jpeg"), Any(), defend_at=(20, 28))(x)
    assert seen == [(16, 16)]


def test_bpda_keeps_defend_at_and_the_gradient_flows(x):
    model = SizedModel()
    deployed = with_bpda(Defended(defenses.create("dct-distort"), model, defend_at=24))
    assert deployed.defend_at == (24, 24)
    xr = x.clone().requires_grad_(True)
    deployed(xr, generator=3).sum().backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0


def test_resize_is_identity_at_the_same_size_and_rejects_bad_sides(x):
    assert resize_images(x, (16, 16)) is x
    with pytest.raises(ValueError, match="defend_at"):
        Defended(defenses.create("jpeg"), SizedModel(), defend_at=0)


@pytest.mark.parametrize("name", ["tv", "rand", "dct-distort"])
def test_eot_over_a_model_defended_at_another_side(name, x):
    """EOT batches the draws of a chunk itself: it must defend at ``defend_at`` too."""
    from prepdefense.attacks.eot import EOT

    model = SizedModel()
    deployed = Defended(defenses.create(name), model, defend_at=24)
    eot = EOT(deployed, 3, reduce="none")
    params = eot.sample_params(x, 5)
    z = eot.apply(x, params)
    assert z.shape == (3, x.shape[0], 5)
    for k in range(3):
        assert torch.allclose(z[k], deployed.apply(x, params[str(k)]), atol=1e-6)


# --------------------------------------------------------------------------------------------
# --defend-at S on the command line (predict, attack, evaluate)
# --------------------------------------------------------------------------------------------
STRICT = ["--model", "toy_models:strict_tiny_convnet", "--device", "cpu"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from byo_helpers import label_by_model, noise_images
    from toy_models import TinyConvNet

    f = tmp_path_factory.mktemp("defend-at-images")
    noise_images(f, 8, side=64, seed=3)
    label_by_model(f, TinyConvNet().eval())
    return f


def test_predict_defends_at_the_given_side(folder, capsys):
    from byo_helpers import cli_json
    from prepdefense import data
    from toy_models import StrictTinyConvNet

    out = cli_json(capsys, "predict", *STRICT, "--data", str(folder), "--defense", "none", "--defend-at", "48")
    assert out["defend_at"] == 48 and out["n"] == 8
    x, y = data.load_images(folder, size=48)[:2]
    with torch.no_grad():
        expected = (StrictTinyConvNet()(resize_images(x, (32, 32))).argmax(1) == y).float().mean().item()
    assert out["accuracy"] == pytest.approx(expected)


def test_evaluate_attacks_at_the_defended_side(folder, tmp_path, capsys):
    from byo_helpers import cli_json

    args = ["evaluate", *STRICT, "--data", str(folder), "--defense", "jpeg", "--norm", "linf", "--n", "4", "--budget", "quick",
            "--no-checks", "--no-curve"]
    card = cli_json(capsys, *args, "--defend-at", "48", "--out", str(tmp_path / "at48"))
    assert card["defense"]["defend_at"] == [48, 48] and card["threat_model"]["image_shape"] == [3, 48, 48]
    ex = torch.load(tmp_path / "at48" / "adversarial.pt", weights_only=False)
    assert ex["adversarial"].shape == (4, 3, 48, 48)
    # The sample is picked by the bare model at its own side: the same images as without it.
    plain = cli_json(capsys, *args)
    assert plain["defense"]["defend_at"] is None and plain["data"]["ids"] == card["data"]["ids"]
    # Every attack (transfer too: the bare model behind the same resize) ran on the 48-px images,
    # and the classifier's passes are counted through the resize.
    assert all(not r.get("skipped") for r in card["per_attack"])
    assert card["passes"]["classifier_images_attacks"] > 0 and card["passes"]["classifier_images"] > 0
    assert any("48 px" in note for note in card["notes"])


def test_attack_transfer_and_checks_at_the_defended_side(folder, tmp_path, capsys):
    from byo_helpers import cli, cli_json

    saved = tmp_path / "adv.npz"
    out = cli_json(capsys, "attack", *STRICT, "--data", str(folder), "--defense", "jpeg", "--attack", "transfer", "--n", "3",
                   "--steps", "2", "--defend-at", "48", "--diagnostics", "full", "--diag-n", "2", "--save-adv", str(saved))
    assert out["defend_at"] == 48 and "diagnostics" in out
    # judge reads the side from the file and judges the 48-px images the same way.
    report = cli_json(capsys, "judge", *STRICT, "--adv", str(saved), "--defense", "jpeg")
    assert report["defend_at"] == 48 and report["n"] == 3 and any("48 px" in n for n in report["notes"])
    assert report["accuracy"] == pytest.approx(out["accuracy"])
    # Another side than the images' is refused in one line.
    code, _, err = cli(capsys, "judge", *STRICT, "--adv", str(saved), "--defense", "jpeg", "--defend-at", "40")
    assert code != 0 and "defense runs at 40x40" in err and len(err.strip().splitlines()) == 1


def test_defend_at_usage_error(folder, capsys):
    from byo_helpers import cli

    code, _, err = cli(capsys, "evaluate", *STRICT, "--data", str(folder), "--defense", "jpeg", "--norm", "linf", "--n", "2",
                       "--defend-at", "4")
    assert code == 2 and "--defend-at" in err and len(err.strip().splitlines()) == 1


def test_transfer_source_keeps_the_resize():
    from prepdefense.attacks.transfer import source_classifier
    from toy_models import StrictTinyConvNet

    net = StrictTinyConvNet()
    deployed = Defended(defenses.create("jpeg"), net, defend_at=48)
    src = source_classifier(deployed)
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(src(x), net(resize_images(x, (32, 32))))
    assert source_classifier(Defended(defenses.create("jpeg"), net)) is net
