"""Model zoo and registry: shapes, input gradients, in-model normalisation, WRN name parsing, FLOPs."""

import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastcollab.errors import FastcollabError
from fastcollab.models import Normalize, create_model, list_models, register_model, registry

EXPECTED = {"resnet18", "preact-resnet18", "wrn-34-10", "wrn-28-10", "mobilenetv2", "vgg16", "smallcnn"}
BIG = {"wrn-34-10", "wrn-28-10"}
CHEAP = sorted(EXPECTED - BIG)
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def test_registry_lists_every_family():
    assert EXPECTED <= set(list_models())
    assert list_models() == sorted(list_models())
    assert "torchvision" not in sys.modules


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_forward_shape_and_input_gradient(name):
    torch.manual_seed(0)
    model = create_model(name)
    assert model.arch == name and model.num_classes == 10 and model.normalization is None
    if name == "wrn-28-10":  # same code as wrn-34-10 (tested below); keep the suite cheap
        assert model.fc.out_features == 10 and len(model.block1) == 4
        return
    model.eval()
    seen = []
    model.normalize.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    assert len(seen) == 1 and seen[0] is x  # the in-model normalisation is the first layer
    assert out.shape == (2, 10) and out.dtype == torch.float32 and torch.isfinite(out).all()
    out[:, 0].sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", CHEAP)
def test_hundred_classes_and_train_mode(name):
    model = create_model(name, num_classes=100).train()
    out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 100) and model.num_classes == 100


def test_big_models_have_hundred_class_heads():
    for name in sorted(BIG):
        assert create_model(name, num_classes=100).fc.out_features == 100


@pytest.mark.parametrize("name", ["smallcnn", "vgg16", "mobilenetv2"])
def test_larger_inputs_work(name):
    assert create_model(name).eval()(torch.rand(2, 3, 40, 48)).shape == (2, 10)


@pytest.mark.parametrize("name", ["smallcnn", "wrn-10-1"])
def test_normalize_is_applied_inside_the_model(name):
    torch.manual_seed(1)
    normed = create_model(name, normalize=(MEAN, STD))
    torch.manual_seed(1)
    plain = create_model(name)
    assert normed.normalization == (MEAN, STD)
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        # Give BN real running statistics (fresh ones make some nets nearly input-independent in eval mode).
        warm = torch.rand(16, 3, 32, 32)
        normed.train()(warm)
        plain.train()((warm - mean) / std)
        normed.eval()
        plain.eval()
        a = normed(x)
        torch.testing.assert_close(a, plain((x - mean) / std), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(a, plain(x), atol=1e-3)
        # The statistics are buffers: a checkpoint restores them into a model built without them.
        fresh = create_model(name).eval()
        assert not torch.allclose(fresh(x), a, atol=1e-3)
        fresh.load_state_dict(normed.state_dict())
        torch.testing.assert_close(fresh(x), a)
    assert "normalize.mean" in normed.state_dict() and "normalize.std" in normed.state_dict()


def test_normalize_none_is_exact_identity():
    n = Normalize()
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(n(x), x)


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = create_model("resnet18", normalize=(MEAN, STD)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_wrn_name_parsing():
    m = create_model("wrn-16-4", num_classes=100)
    assert (m.depth, m.width, m.arch, m.num_classes) == (16, 4, "wrn-16-4", 100)
    assert len(m.block1) == 2 and m.fc.in_features == 256
    assert create_model("WRN-10-1").arch == "wrn-10-1"
    m34 = create_model("wrn-34-10")
    assert (m34.depth, m34.width, len(m34.block3)) == (34, 10, 5)
    assert 45e6 < sum(p.numel() for p in m34.parameters()) < 47e6


@pytest.mark.parametrize("name", ["wrn-15-2", "wrn-4-2", "wrn-33-10", "wrn-16-0"])
def test_wrn_bad_depth_or_width(name):
    with pytest.raises(FastcollabError, match="WideResNet") as e:
        create_model(name)
    assert "\n" not in str(e.value)


def test_unknown_model_lists_available_names():
    with pytest.raises(FastcollabError) as e:
        create_model("resnet19")
    msg = str(e.value)
    assert "resnet19" in msg and "\n" not in msg
    for name in EXPECTED:
        assert name in msg
    assert "wrn-{depth}-{width}" in msg


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 1},
        {"num_classes": 2.5},
        {"normalize": ((0.5, 0.5, 0.5), (0.0, 1.0, 1.0))},
        {"normalize": ((0.5, 0.5), (1.0, 1.0))},
        {"normalize": "imagenet"},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(FastcollabError):
        create_model("smallcnn", **kwargs)


def test_register_model(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_model("tiny-test-net")
    class Tiny(torch.nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.normalize = Normalize()
            self.fc = torch.nn.Linear(3, num_classes)

        def forward(self, x):
            return self.fc(self.normalize(x).mean(dim=(2, 3)))

    assert "tiny-test-net" in list_models()
    m = create_model("tiny-test-net", num_classes=3, normalize=((0.5,), (0.25,)))
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 3) and m.arch == "tiny-test-net"
    with pytest.raises(FastcollabError, match="already registered"):
        register_model("smallcnn")(Tiny)


def test_smallcnn_flops_in_budget():
    model = create_model("smallcnn").eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 3, 32, 32))
    flops = counter.get_total_flops()
    assert 20e6 <= flops <= 50e6, flops
    import fastcollab.models.smallcnn as mod

    assert f"{flops / 1e6:.1f} MFLOP" in mod.__doc__


def test_smallcnn_has_batchnorm_modes():
    model = create_model("smallcnn")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x = torch.rand(8, 3, 32, 32)
    model.train()
    a = model(x)
    model.eval()
    b = model(x)
    assert not torch.allclose(a, b)
