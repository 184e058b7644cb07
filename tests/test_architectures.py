"""Every architecture: the stem / noise-slot interface, parameter counts, forward/backward at real input sizes."""
from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models import inception_v3 as tv_inception_v3

from bench.core.archs import describe_models
from bench.cli.commands import main
from bench.core.data import DatasetError
from bench.core.models import ImageClassifier, Normalize, build_model, count_parameters
from bench.core.registry import MODELS

# Cheap settings for the interface test; anything not listed is built at its defaults.
CHEAP = {
    "wide_resnet": ((3, 32, 32), 10, {"depth": 10, "width": 1}),
    "inception_v3": ((3, 96, 96), 10, {"weights": None}),
    "inception_v3_autoencoder": ((3, 96, 96), 10, {"weights": None}),
}


def _meta_size(name: str) -> tuple[tuple[int, ...], int]:
    """The input shape and classes an architecture is registered for (MNIST-sized when it names none)."""
    info = MODELS.info(name)
    return tuple(info.shape or (1, 28, 28)), int(info.classes or 10)


def _cheap(name: str) -> tuple[ImageClassifier, tuple[int, ...]]:
    shape, classes, kwargs = CHEAP.get(name, (*_meta_size(name), {}))
    torch.manual_seed(0)
    return build_model(name, shape, classes, **kwargs).eval(), shape


class AddConstant(nn.Module):
    """A stand-in noise layer that records what it sees."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.seen: list[torch.Size] = []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.seen.append(h.shape)
        return h + self.value


def test_cheap_settings_name_registered_architectures():
    """A renamed architecture must fail here, not silently fall back to its expensive defaults."""
    assert set(CHEAP) <= set(MODELS.names())


@pytest.mark.parametrize("name", MODELS.names())
def test_stem_and_noise_slot_interface(name):
    model, shape = _cheap(name)
    assert isinstance(model, ImageClassifier) and isinstance(model.normalize, Normalize)
    assert isinstance(model.stem, nn.Conv2d) and model.stem.bias is None
    assert model.stem.in_channels == shape[0]
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = model(x)
        h = model.pre_noise(x)
        assert h.shape[1] == model.stem.out_channels
        assert torch.allclose(model.post_noise(h), clean, atol=1e-5)
        model.noise = AddConstant(0.0)
        assert torch.allclose(model(x), clean, atol=1e-5) and model.noise.seen == [h.shape]
        model.noise = AddConstant(5.0)
        assert not torch.allclose(model(x), clean, atol=1e-3)  # the slot really sits in the forward pass


def _expected_wrn(depth: int, width: int, classes: int) -> int:
    """Parameter count of a pre-activation WRN from its definition (conv, BN, 1x1 shortcuts, FC)."""
    n = (depth - 4) // 6
    widths = [16, 16 * width, 32 * width, 64 * width]
    total = 3 * 16 * 9
    for group in range(3):
        for i in range(n):
            cin, cout = (widths[group] if i == 0 else widths[group + 1]), widths[group + 1]
            total += 2 * cin + cin * cout * 9 + 2 * cout + cout * cout * 9 + (cin * cout if cin != cout else 0)
    return total + 2 * widths[3] + widths[3] * classes + classes


def test_parameter_counts_match_the_paper():
    counts = {name: count for name, _, _, count, _ in describe_models()}
    assert counts["wide_resnet"] == _expected_wrn(28, 10, 10) == 36_479_194  # "WRN-28-10, 36.5M"
    assert 23_000_000 <= counts["inception_v3"] <= 27_000_000
    autoencoder = 3 * 32 * 100 + (32 * 32 * 64 + 32) + (32 * 64 * 25 + 64) + (32 + 32 + 3)
    assert counts["inception_v3_autoencoder"] - counts["inception_v3"] == autoencoder
    paper_cnn = 32 * 25 + (64 * 32 * 25 + 64) + (64 * 7 * 7 * 1024 + 1024) + (1024 * 10 + 10)
    assert counts["mnist_cnn"] == counts["madry_mnist_cnn"] == paper_cnn
    assert counts["resnet_small"] == _expected_wrn(16, 2, 10)


def test_wide_resnet_is_configurable():
    model = build_model("wide_resnet", (3, 32, 32), 100, depth=16, width=4)
    assert count_parameters(model) == _expected_wrn(16, 4, 100)
    assert model.stem.out_channels == 16 and len(model.body.blocks) == 6
    with pytest.raises(ValueError, match="6n \\+ 4"):
        build_model("wide_resnet", (3, 32, 32), 10, depth=27)


def test_list_models_prints_parameter_counts(capsys):
    assert main(["list", "--models"]) == 0
    out = capsys.readouterr().out
    assert "36,479,194" in out and "wide_resnet" in out and "inception_v3_autoencoder" in out
    assert "default for cifar10, cifar100, svhn" in out


@pytest.mark.parametrize("name", ["mnist_cnn", "madry_mnist_cnn", "resnet_small"])
def test_small_models_train_at_real_size(name):
    shape, classes = _meta_size(name)
    model = build_model(name, shape, classes)
    x = torch.rand(4, *shape)
    loss = nn.functional.cross_entropy(model(x), torch.arange(4) % classes)
    loss.backward()
    assert model.stem.weight.grad is not None and model.stem.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_wide_resnet_28_10_forward_backward_at_32x32():
    model = build_model("wide_resnet", (3, 32, 32), 10)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, 10)
    logits.sum().backward()
    assert x.grad.abs().sum() > 0 and model.stem.weight.grad.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["inception_v3", "inception_v3_autoencoder"])
def test_inception_forward_backward_at_299(name):
    model = build_model(name, (3, 299, 299), 1000, weights=None)
    x = torch.rand(1, 3, 299, 299, requires_grad=True)
    model.eval()  # batch norm with a single image
    logits = model(x)
    assert logits.shape == (1, 1000)
    logits.sum().backward()
    assert x.grad.abs().sum() > 0 and model.stem.weight.grad.abs().sum() > 0


def test_autoencoder_decoder_is_tied_to_the_current_stem():
    model, _ = _cheap("inception_v3_autoencoder")
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        h = model.pre_noise(x)
        recon = model.body.reconstruct(h)
        assert recon.shape == x.shape and float(recon.min()) >= 0 and float(recon.max()) <= 1
        # A defense may swap the stem for another conv (PixelDP's divided conv): the decoder follows it.
        replacement = nn.Conv2d(3, 32, 10, stride=2, padding=4, bias=False)
        replacement.weight.copy_(model.stem.weight * 3)
        model.stem = replacement
        assert model.body.first_conv() is replacement
        assert not torch.allclose(model.body.reconstruct(h), recon)
    assert "stem.weight" in model.state_dict() and not any("_first" in k for k in model.state_dict())


def test_autoencoder_trains_only_itself_in_front_of_a_frozen_classifier():
    model, _ = _cheap("inception_v3_autoencoder")
    model.train()
    assert not model.body.classifier.training and model.body.conv2.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"stem.weight", "body.conv2.weight", "body.conv2.bias", "body.conv3.weight", "body.conv3.bias",
                         "body.decode3_bias", "body.decode2_bias", "body.decode1_bias"}
    model(torch.rand(2, 3, 96, 96)).sum().backward()
    assert model.stem.weight.grad.abs().sum() > 0  # gradients flow through the frozen classifier
    unfrozen = build_model("inception_v3_autoencoder", (3, 96, 96), 10, weights=None, freeze_classifier=False)
    assert count_parameters(unfrozen) - count_parameters(model) == count_parameters(build_model(
        "inception_v3", (3, 96, 96), 10, weights=None))


def _fake_pretrained_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    reference = tv_inception_v3(weights=None, aux_logits=True, init_weights=True)
    for module in reference.modules():  # non-trivial batch-norm statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return reference.state_dict()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    # Randomly initialised Inception logits can be huge: compare relative to their scale.
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_weights_are_loaded_with_the_input_transform_folded_in(tmp_path, suffix):
    state = _fake_pretrained_state()
    path = tmp_path / f"inception_v3{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    reference = tv_inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    reference.load_state_dict(state)
    reference.eval()
    ours = build_model("inception_v3", (3, 96, 96), 1000, weights=str(path)).eval()
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    imagenet = Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # what torchvision's weights expect
    with torch.no_grad():
        expected = reference(imagenet(x))
        assert _relative_error(ours(x), expected) < 1e-4
    # The auto-encoder variant keeps Inception-v3 unchanged behind the decoder.
    wrapped = build_model("inception_v3_autoencoder", (3, 96, 96), 1000, weights=str(path)).eval()
    with torch.no_grad():
        assert _relative_error(wrapped.body.classifier(x), expected) < 1e-4


def test_missing_or_corrupt_weights_give_clear_messages(tmp_path, monkeypatch):
    monkeypatch.setenv("PIXELDP_BENCH_WEIGHTS", str(tmp_path / "none"))
    monkeypatch.setenv("PIXELDP_BENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    from bench.core.archs import inception

    inception._warn_missing.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.device("cpu"):
            inception.inception_net(10, "auto")
    assert any("inception_v3_google-0cc3c7bd.pth" in str(w.message) and "random initialization" in str(w.message)
               for w in caught)
    with pytest.raises(DatasetError, match="does not exist"):
        inception.inception_net(10, str(tmp_path / "nope.pth"))
    bad = tmp_path / "inception_v3.pth"
    bad.write_bytes(b"truncated")
    with pytest.raises(DatasetError, match=str(bad)):
        inception.inception_net(10, str(bad))
