"""ImageNet: torchvision's Inception-v3, alone or behind PixelDP's tied auto-encoder (the noise goes inside it)."""
from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import inception_v3 as tv_inception_v3

from bench.core.data import DatasetError, data_root
from bench.core.models import ImageClassifier, Normalize
from bench.core.registry import MODELS

__all__ = ["IMAGENET_SHAPE", "TiedAutoencoderBody", "find_weights", "inception_net", "inception_v3",
           "inception_v3_autoencoder", "read_state_dict", "weight_folders"]

IMAGENET_SHAPE = (3, 299, 299)
WEIGHT_URL = "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"
WEIGHT_FILES = ("inception_v3.safetensors", "inception_v3_google-0cc3c7bd.pth", "inception_v3.pth")


def weight_folders() -> list[Path]:
    """Where pretrained Inception-v3 weights are looked for, in order."""
    env = os.environ.get("PIXELDP_BENCH_WEIGHTS")
    folders = [Path(env).expanduser()] if env else []
    return folders + [data_root() / "imagenet", Path(torch.hub.get_dir()) / "checkpoints"]


def find_weights() -> Path | None:
    """The first pretrained weight file found in `weight_folders()`, or None."""
    for folder in weight_folders():
        for name in WEIGHT_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


@functools.cache
def _warn_missing() -> None:
    warnings.warn(
        f"no pretrained Inception-v3 weights found (looked for {' or '.join(WEIGHT_FILES)} in "
        f"{', '.join(map(str, weight_folders()))}); starting from random initialization. Download {WEIGHT_URL} "
        f"into {data_root() / 'imagenet'} (or pass arch_params.weights = PATH) to defend the pretrained model.",
        stacklevel=3)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a plain torch state dict (loaded with weights_only=True, no pickled code)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DatasetError(f"cannot read Inception-v3 weights {path}: the file is corrupt, truncated or not a "
                           f"state dict ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise DatasetError(f"Inception-v3 weights {path} hold a {type(state).__name__}, not a state dict")
    return state


def inception_net(classes: int, weights: str | None) -> tuple[nn.Module, bool]:
    """torchvision's Inception3 without the auxiliary head, native input (x - 0.5) / 0.5; (net, loaded?).

    Args:
        classes: outputs of the final FC (pretrained FC weights are kept only when classes == 1000).
        weights: "auto" (load if a file is found, else warn), None / "none" (random init) or a path.
    """
    net = tv_inception_v3(weights=None, aux_logits=False, transform_input=False, init_weights=True,
                          num_classes=classes)
    if weights in (None, "none") or next(net.parameters()).is_meta:
        return net, False
    path = find_weights() if weights == "auto" else Path(weights).expanduser()
    if path is None:
        _warn_missing()
        return net, False
    if not path.is_file():
        raise DatasetError(f"Inception-v3 weights file {path} does not exist; download {WEIGHT_URL} there")
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("AuxLogits.")}
    if classes != 1000:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if classes == 1000 or not k.startswith("fc.")]
    if missing or unexpected:
        raise DatasetError(f"{path} is not an Inception-v3 state dict (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]})")
    return net, True


@MODELS.register("inception_v3", shape=IMAGENET_SHAPE, classes=1000)
def inception_v3(shape: Sequence[int], classes: int, *, weights: str | None = "auto") -> ImageClassifier:
    """Inception-v3 (Szegedy et al. 2016; ~23.8M parameters), pretrained weights loaded when available.

    The stem is Inception's first 3x3/2 conv (no bias). Its native input 2x - 1 is folded into
    the model: normalize subtracts 0.5 only and the stem's weights are doubled, which is exact
    because that conv is linear and unpadded; so the stem's sensitivity is in pixel units.
    """
    net, _ = inception_net(classes, weights)
    first_block = net.get_submodule("Conv2d_1a_3x3")
    stem = first_block.get_submodule("conv")
    if not isinstance(stem, nn.Conv2d):
        raise TypeError(f"torchvision's Inception-v3 changed: its first conv is a {type(stem).__name__}")
    with torch.no_grad():
        stem.weight.mul_(2.0)
    first_block.conv = nn.Identity()  # the body keeps that block's batch norm and ReLU
    return ImageClassifier(Normalize([0.5] * shape[0], [1.0] * shape[0]), stem, net)


def _padding(conv: nn.Conv2d) -> tuple[int, ...]:
    """A conv's explicit padding; 'same' or 'valid' (strings) have no fixed transpose here."""
    if isinstance(conv.padding, str):
        raise ValueError(f"cannot invert a conv with padding={conv.padding!r}; give it explicit integer padding")
    return conv.padding


def _transpose_padding(size: int, out: int, conv: nn.Conv2d) -> int:
    """output_padding that makes conv_transpose2d invert `conv`'s size: out -> size."""
    stride, padding, kernel = conv.stride[0], _padding(conv)[0], conv.kernel_size[0]
    extra = size - ((out - 1) * stride - 2 * padding + kernel)
    if not 0 <= extra < stride:
        raise ValueError(f"cannot invert a {kernel}x{kernel}/{stride} conv from {out} back to {size} pixels")
    return extra


class TiedAutoencoderBody(nn.Module):
    """Rest of the PixelDP ImageNet auto-encoder after its first conv, then the classifier.

    Encoder: (stem: conv 10x10x32 /2) -> ReLU -> conv 8x8x32 /2 -> ReLU -> conv 5x5x64 /2 -> ReLU;
    decoder: the three transposed convs with the SAME (tied) weights in reverse order, their own
    biases, ReLUs and a final sigmoid, back to an image in [0, 1] that the classifier reads
    (Lecuyer et al. 2019, Sec. IV-A).
    """

    def __init__(self, stem: nn.Conv2d, classifier: nn.Module, image_size: Sequence[int],
                 channels: Sequence[int] = (32, 32, 64), kernels: Sequence[int] = (10, 8, 5),
                 freeze_classifier: bool = True):
        super().__init__()
        # Tuples, not submodules: model.stem owns the first conv's weight and the decoder only reads
        # it. A defense may swap model.stem for another conv (e.g. PixelDP's divided conv), so the
        # decoder follows the owning model's current stem (see `bind` and `first_conv`).
        self._first = (stem,)
        self._owner: tuple[nn.Module, ...] = ()
        self.image_size = tuple(image_size)
        self.conv2 = nn.Conv2d(channels[0], channels[1], kernels[1], stride=2, padding=(kernels[1] - 1) // 2)
        self.conv3 = nn.Conv2d(channels[1], channels[2], kernels[2], stride=2, padding=(kernels[2] - 1) // 2)
        self.decode3_bias = nn.Parameter(torch.zeros(channels[1]))
        self.decode2_bias = nn.Parameter(torch.zeros(channels[0]))
        self.decode1_bias = nn.Parameter(torch.zeros(stem.in_channels))
        self.classifier = classifier
        self.freeze_classifier = freeze_classifier
        if freeze_classifier:
            for parameter in classifier.parameters():
                parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> TiedAutoencoderBody:
        """Train mode for the auto-encoder; a frozen classifier stays in eval mode (batch-norm statistics kept)."""
        super().train(mode)
        if self.freeze_classifier:
            self.classifier.eval()
        return self

    def bind(self, owner: nn.Module) -> None:
        """Remember the ImageClassifier whose `stem` is this auto-encoder's first conv."""
        self._owner = (owner,)

    def first_conv(self) -> nn.Conv2d:
        """The encoder's first conv: the owner's current stem when it is a conv, else the original one."""
        stem = getattr(self._owner[0], "stem", None) if self._owner else None
        return stem if isinstance(stem, nn.Conv2d) else self._first[0]

    def reconstruct(self, h: torch.Tensor) -> torch.Tensor:
        """Stem activations (N, 32, h, w), noised or not -> reconstructed images (N, C, H, W)."""
        stem = self.first_conv()
        # The kernel the stem really applies (a conv may rescale its raw weight, e.g. PixelDP's
        # DividedConv2d), so the last decoder layer is exactly the stem's adjoint.
        effective_weight = getattr(stem, "effective_weight", None)
        stem_weight = effective_weight() if callable(effective_weight) else stem.weight
        h1 = F.relu(h)
        h2 = F.relu(self.conv2(h1))
        code = F.relu(self.conv3(h2))
        d2 = F.relu(F.conv_transpose2d(code, self.conv3.weight, self.decode3_bias, stride=self.conv3.stride,
                                       padding=_padding(self.conv3),
                                       output_padding=_transpose_padding(h2.shape[-1], code.shape[-1], self.conv3)))
        d1 = F.relu(F.conv_transpose2d(d2, self.conv2.weight, self.decode2_bias, stride=self.conv2.stride,
                                       padding=_padding(self.conv2),
                                       output_padding=_transpose_padding(h1.shape[-1], d2.shape[-1], self.conv2)))
        # A sigmoid maps the reconstruction back into the [0, 1] pixel box, as in the original code.
        return torch.sigmoid(F.conv_transpose2d(
            d1, stem_weight, self.decode1_bias, stride=stem.stride, padding=_padding(stem),
            output_padding=_transpose_padding(self.image_size[-1], d1.shape[-1], stem)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.reconstruct(h))


@MODELS.register("inception_v3_autoencoder", shape=IMAGENET_SHAPE, classes=1000)
def inception_v3_autoencoder(shape: Sequence[int], classes: int, *, weights: str | None = "auto",
                             channels: Sequence[int] = (32, 32, 64), kernels: Sequence[int] = (10, 8, 5),
                             freeze_classifier: bool = True) -> ImageClassifier:
    """PixelDP's ImageNet model: a tied conv auto-encoder in front of an unmodified (pretrained) Inception-v3.

    The noise layer goes after the auto-encoder's first conv (the stem), so a pretrained
    Inception-v3 is defended without changing its structure (Lecuyer et al. 2019, Sec. III-B).
    `model.body.reconstruct(h)` gives the auto-encoder's output, for its reconstruction pre-training.
    With `freeze_classifier` (default) Inception-v3's weights and batch-norm statistics stay as
    loaded and only the auto-encoder trains (gradients still flow through the classifier).
    """
    if shape[1] != shape[2]:
        raise ValueError(f"the auto-encoder expects square images, got {shape[1]}x{shape[2]}")
    net, _ = inception_net(classes, weights)
    classifier = nn.Sequential(Normalize([0.5] * shape[0], [0.5] * shape[0]), net)
    stem = nn.Conv2d(shape[0], channels[0], kernels[0], stride=2, padding=(kernels[0] - 1) // 2, bias=False)
    body = TiedAutoencoderBody(stem, classifier, shape[1:], channels, kernels, freeze_classifier)
    # Pixels in [0, 1] go in unnormalized: the stem's sensitivity is its weights' norm.
    model = ImageClassifier(Normalize([0.0] * shape[0], [1.0] * shape[0]), stem, body)
    body.bind(model)
    return model
