"""Bring your own model (issue 12, item 1): ``torchscript:PATH``, ``package.module:callable``,
``torchvision:``/``timm:`` without their extras, declared input size and classes, ``--mean/--std``,
labels for any number of classes, end to end through ``predict`` and ``attack``."""

from __future__ import annotations

import json

import warnings

import pytest
import torch

from byo_helpers import TINY_NET, cli, cli_json, forget, label_by_model, noise_images, write_module  # noqa: E402
from prepdefense import data, models
from prepdefense.errors import DataError, ModelUnavailableError
from prepdefense.models import Normalize

MOD = "byo_models_tiny_net"


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """The tiny net's module on sys.path and a folder of 6 images it classifies 'correctly'."""
    write_module(tmp_path, MOD, TINY_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    forget(MOD)
    model = models.create(f"{MOD}:tiny_net")
    folder = tmp_path / "images"
    noise_images(folder, 6)
    labels = label_by_model(folder, model)
    yield model, folder, labels
    forget(MOD)


def _script(module: torch.nn.Module, path, example=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in new torch
        scripted = torch.jit.trace(module, example) if example is not None else torch.jit.script(module)
        scripted.save(str(path))
    return path


def test_a_callable_model_declares_its_size_and_classes(tiny):
    model, _, _ = tiny
    assert model.input_size == 32 and model.num_classes == 10 and not model.training
    assert models.create("efficientnet-lite0").num_classes == 1000


def test_torchscript_export_of_the_builtin_model_predicts_exactly_what_it_predicts(model, tmp_path, capsys):
    # Traced TorchScript keeps no Python attributes: the input size is declared by the flag,
    # the number of classes read from the probe.
    path = _script(model, tmp_path / "lite0.pt", torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    loaded = models.create(f"torchscript:{path}", input_size=224)
    assert loaded.input_size == 224 and loaded.num_classes == 1000
    x, labels, _, _ = data.load_images("builtin", size=224)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    builtin = cli_json(capsys, "predict", "--data", "builtin", "--device", "cpu")
    ts = cli_json(capsys, "predict", "--model", f"torchscript:{path}", "--input-size", "224", "--data", "builtin", "--device", "cpu")
    assert ts["accuracy"] == builtin["accuracy"] == 1.0 and ts["n"] == builtin["n"] == 4
    assert ts["model"] == f"torchscript:{path}"


def test_module_defined_model_through_predict_and_attack(tiny, capsys):
    _, folder, _ = tiny
    got = cli_json(capsys, "predict", "--model", f"{MOD}:tiny_net", "--data", str(folder), "--device", "cpu")
    assert got["accuracy"] == 1.0 and got["n"] == 6
    got = cli_json(capsys, "predict", "--model", f"{MOD}:tiny_net", "--data", str(folder), "--defense", "fd+rand",
                   "--device", "cpu")
    assert got["n"] == 6 and got["defense"] == "fd+rand"
    out = cli_json(capsys, "attack", "--model", f"{MOD}:tiny_net", "--data", str(folder), "--defense", "fd",
                   "--attack", "pgd", "--n", "4", "--steps", "3", "--eps", "0.05", "--draws", "2", "--device", "cpu")
    assert out["n"] == 4 and out["clean_accuracy"] == 1.0 and out["model"] == f"{MOD}:tiny_net"
    assert 0.0 <= out["asr"] <= 1.0 and out["l2_rms_max"] <= 0.05 + 1e-4
    card = cli_json(capsys, "evaluate", "--model", f"{MOD}:tiny_net", "--data", str(folder), "--defense", "fd+rand",
                    "--norm", "linf", "--n", "4", "--budget", "quick", "--no-curve", "--device", "cpu")
    assert _card_ok(card, f"{MOD}:tiny_net", 4)


def _card_ok(card, model_name: str, n: int) -> bool:
    """evaluate's card on a user's model: the model named, n images, per-attack figures."""
    assert card["schema_version"] == 1 and card["n"] == n
    assert model_name in json.dumps(card["model"])
    assert card["per_attack"] and all("after" in r for r in card["per_attack"])
    assert 0.0 <= card["ensemble"]["robust_accuracy_expected"] <= card["clean"]["robust_accuracy_expected"] <= 1.0
    return True


def test_tiny_torchscript_model_through_predict_and_attack(tiny, tmp_path, capsys):
    model, folder, _ = tiny
    path = _script(model, tmp_path / "tiny.pt")  # scripted: keeps input_size and num_classes
    loaded = models.create(f"torchscript:{path}")
    assert (loaded.input_size, loaded.num_classes) == (32, 10)
    got = cli_json(capsys, "predict", "--model", f"torchscript:{path}", "--data", str(folder), "--device", "cpu")
    assert got["accuracy"] == 1.0 and got["n"] == 6
    out = cli_json(capsys, "attack", "--model", f"torchscript:{path}", "--data", str(folder), "--defense", "none",
                   "--attack", "fgsm", "--n", "3", "--eps", "0.03", "--untargeted", "--device", "cpu")
    assert out["n"] == 3 and out["clean_accuracy"] == 1.0
    card = cli_json(capsys, "evaluate", "--model", f"torchscript:{path}", "--data", str(folder), "--defense", "jpeg",
                    "--norm", "l2", "--n", "3", "--budget", "quick", "--no-curve", "--device", "cpu")
    assert _card_ok(card, f"torchscript:{path}", 3)


def test_protocol_sample_draws_targets_among_the_models_classes(tiny):
    model, folder, labels = tiny
    sample = data.protocol_sample(model, folder, n=6, seed=3)
    assert sample.targets.max() < 10 and (sample.targets != sample.labels).all()
    targets = data.draw_targets(torch.zeros(4000, dtype=torch.long), torch.Generator().manual_seed(0), num_classes=10)
    counts = torch.bincount(targets, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 350  # uniform over the 9 other classes (~444 each)


def test_labels_for_any_number_of_classes(tmp_path):
    noise_images(tmp_path, 2)
    (tmp_path / "labels.csv").write_text("file,label\nimg0.png,1500\nimg1.png,3\n")
    with pytest.raises(DataError, match="label 1500 is outside 0..999"):  # ImageNet's by default
        data.load_dataset(tmp_path, size=32)
    ds = data.load_dataset(tmp_path, size=32, num_classes=2000)
    assert ds.labels.tolist() == [1500, 3]
    with pytest.raises(DataError, match="outside 0..9 \\(the model's 10 classes\\)"):
        data.load_dataset(tmp_path, size=32, num_classes=10)
    with pytest.raises(DataError, match="ImageNet labels"):
        data.load_dataset("builtin", size=32, num_classes=10)


def test_label_outside_the_models_classes_is_a_one_line_usage_error(tiny, capsys):
    _, folder, _ = tiny
    (folder / "labels.csv").write_text("file,label\nimg0.png,12\n")
    code, _, err = cli(capsys, "predict", "--model", f"{MOD}:tiny_net", "--data", str(folder), "--device", "cpu")
    assert code == 2 and "label 12 is outside 0..9" in err and len(err.strip().splitlines()) == 1


def test_mean_std_wraps_a_model_that_expects_normalised_input(tiny):
    model, _, _ = tiny
    wrapped = models.create(f"{MOD}:tiny_net", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    assert isinstance(wrapped, Normalize) and (wrapped.input_size, wrapped.num_classes) == (32, 10)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model((x - mean) / std))
    with pytest.raises(ValueError, match="both"):
        models.create(f"{MOD}:tiny_net", mean=(0.5,))


def test_declarations_are_checked_by_one_probe(tiny):
    with pytest.raises(ModelUnavailableError, match="--input-size"):
        models.create(f"{MOD}:Undeclared")
    m = models.create(f"{MOD}:Undeclared", input_size=32)
    assert m.num_classes == 10  # read from the probe
    with pytest.raises(ModelUnavailableError, match="declares 7 classes but returns 10"):
        models.create(f"{MOD}:tiny_net", num_classes=7)
    with pytest.raises(ModelUnavailableError, match="not an nn.Module"):
        models.create(f"{MOD}:not_a_model")
    with pytest.raises(ModelUnavailableError, match="fails on a \\(1, 3, 2, 2\\) image"):
        models.create(f"{MOD}:tiny_net", input_size=2)


@pytest.mark.parametrize("spec,extra", [("torchvision:resnet18", "prepdefense[torchvision]"), ("timm:resnet18", "prepdefense[timm]")])
def test_torchvision_and_timm_without_their_extra_name_it_in_one_line(monkeypatch, capsys, spec, extra):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("torchvision", "timm") else real(name, *a))
    with pytest.raises(ModelUnavailableError, match="extra"):
        models.create(spec, weights="w.pth")
    code, _, err = cli(capsys, "predict", "--model", spec, "--weights", "w.pth", "--device", "cpu")
    assert code == 2 and extra in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "torchscript:/nonexistent/model.pt"], "TorchScript file not found"),
        (["--model", "no_such_module_xyz:build"], "module 'no_such_module_xyz' of --model"),
        (["--model", "bad spec:x"], "bad model spec"),
        (["--mean", "0.5"], "--mean and --std go together"),
        (["--mean", "0.5,x", "--std", "0.2"], "--mean '0.5,x'"),
        (["--mean", "0.5", "--std", "0"], "--std must be positive"),
        (["--input-size", "8"], "--input-size must be at least 32"),
        (["--num-classes", "1"], "--num-classes must be at least 2"),
    ],
)
def test_model_flag_errors_are_one_line_before_loading(capsys, argv, message):
    code, _, err = cli(capsys, "predict", *argv, "--device", "cpu")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


FAKE_TORCHVISION = '''
import torch
from torch import nn


def get_model(name, weights=None, num_classes=1000):
    assert weights is None, "nothing may download"
    if name != "tiny":
        raise ValueError(f"Unknown model {name}")
    torch_gen = torch.Generator().manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=torch_gen))
    return net
'''

FAKE_TIMM = '''
from torchvision.models import get_model


def create_model(name, pretrained=False, num_classes=1000):
    assert not pretrained, "nothing may download"
    net = get_model(name, num_classes=num_classes)
    net.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "input_size": (3, 48, 48)}
    return net
'''


@pytest.fixture
def fake_extras(tmp_path, monkeypatch):
    """Stand-ins for torchvision and timm (not installed here): the same entry points, tiny nets."""
    (tmp_path / "torchvision" / "models").mkdir(parents=True)
    (tmp_path / "torchvision" / "__init__.py").write_text("")
    (tmp_path / "torchvision" / "models" / "__init__.py").write_text(FAKE_TORCHVISION)
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "__init__.py").write_text(FAKE_TIMM)
    monkeypatch.syspath_prepend(str(tmp_path))
    forget("torchvision", "torchvision.models", "timm")
    import torchvision.models as tvm

    net = tvm.get_model("tiny", num_classes=10)
    weights = tmp_path / "tiny.pth"
    torch.save(net.state_dict(), weights)
    yield net, weights
    forget("torchvision", "torchvision.models", "timm")


def test_torchvision_and_timm_architectures_load_a_local_state_dict(fake_extras):
    net, weights = fake_extras
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    tv = models.create("torchvision:tiny", weights=str(weights), num_classes=10)
    assert isinstance(tv, Normalize) and (tv.input_size, tv.num_classes) == (224, 10)
    imagenet_mean, imagenet_std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(tv(x), net((x - imagenet_mean) / imagenet_std))
    tm = models.create("timm:tiny", weights=str(weights), num_classes=10)  # timm: the model's own cfg
    assert (tm.input_size, tm.num_classes) == (48, 10)
    with torch.no_grad():
        torch.testing.assert_close(tm(x), net((x - 0.5) / 0.25))
    own = models.create("timm:tiny", weights=str(weights), num_classes=10, mean=(0.0,), std=(1.0,), input_size=40)
    assert own.input_size == 40
    with torch.no_grad():
        torch.testing.assert_close(own(x), net(x))
    with pytest.raises(ModelUnavailableError, match="needs a local weights file"):
        models.create("torchvision:tiny")
    with pytest.raises(ModelUnavailableError, match="not a compatible state dict"):
        models.create("torchvision:tiny", weights=str(weights))  # 1000 classes: the state dict has 10
    with pytest.raises(ModelUnavailableError, match="no architecture 'nope'"):
        models.create("torchvision:nope", weights=str(weights))


def test_timm_model_through_predict(fake_extras, tmp_path, capsys):
    _, weights = fake_extras
    folder = tmp_path / "images"
    noise_images(folder, 4, side=60)
    label_by_model(folder, models.create("timm:tiny", weights=str(weights), num_classes=10))
    got = cli_json(capsys, "predict", "--model", "timm:tiny", "--weights", str(weights), "--num-classes", "10",
                   "--data", str(folder), "--device", "cpu")
    assert got["accuracy"] == 1.0 and got["n"] == 4


def test_traced_model_with_declared_size_through_randomness_and_learn_table(tiny, tmp_path, capsys):
    """A traced TorchScript file keeps no attributes: ``--input-size``/``--num-classes`` declare
    them on ``randomness`` and ``learn-table`` too, as on the other commands."""
    model, folder, _ = tiny
    path = _script(model, tmp_path / "traced.pt", example=torch.rand(1, 3, 32, 32))
    declared = ["--model", f"torchscript:{path}", "--input-size", "32", "--num-classes", "10", "--device", "cpu"]
    row = cli_json(capsys, "randomness", *declared, "--data", str(folder), "--defense", "jpeg")
    assert row["accuracy"] is not None and row["n"] == 6 and row["model"] == f"torchscript:{path}"
    out = tmp_path / "table.json"
    summary = cli_json(capsys, "learn-table", *declared, "--data", str(folder), "--out", str(out), "--n", "2",
                       "--exclude-n", "0", "--exclude-usability-n", "0", "--steps", "50", "--binary-steps", "1", "--initial-const",
                       "10", "--batch-size", "2")
    assert out.is_file() and summary
    code, _, err = cli(capsys, "randomness", "--model", f"torchscript:{path}", "--data", str(folder), "--defense", "jpeg",
                       "--device", "cpu", "--mean", "0.5")
    assert code == 2 and "--std" in err
